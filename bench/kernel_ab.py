"""A/B of kernel build variants (engine.cpp's TF_* tuning macros) on the default model's decode.

Each variant is compiled separately (the build cache keys on the flags), every variant opens its
own FastBackend on the same packed model, and the variants are timed round-robin in one process
so that drifts of this shared machine hit all of them alike. Prints medians; writes nothing.

    .venv/bin/python bench/kernel_ab.py PACKED_DIR THREADS "TF_PREFETCH=0" "TF_PREFETCH=1024" ...
(a variant is `+`-joined NAME=VALUE macros; "" is the default build)
"""

from __future__ import annotations

import ctypes
import statistics
import sys

import tightfit.runtime.engine as engine
from tightfit.formats.packed import load_packed
from tightfit.runtime.kernels import build
from tightfit.runtime.speed import random_prompt, time_once


def main(path: str, threads: int, variants: list[str], rounds: int = 7, new_tokens: int = 64) -> None:
    packed = load_packed(path)
    backends = []
    for v in variants:
        lib = ctypes.CDLL(str(build.build(build.NATIVE_FLAGS + tuple(f"-D{d}" for d in v.split("+") if d))))
        engine.load = lambda lib=lib: lib  # FastBackend picks up this build
        backends.append(engine.FastBackend(packed, max_positions=512, threads=threads))
    prompt = random_prompt(backends[0].vocab_size, 256)
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v, b in zip(variants, backends):
            tok_s = time_once(b, prompt, new_tokens)[1]
            if r:  # round 0 warms up
                runs[v].append(tok_s)
    for v in variants:
        print(f"{v or '(default)':45s} decode median {statistics.median(runs[v]):6.1f} tok/s  runs {[round(x) for x in runs[v]]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])

"""A/B of kernel build variants (the TF_* tuning macros in runtime/kernels/tuning.h and outliers.h) on a packed
model's decode, or (--all-logits) on scoring a window: the logits of every one of its tokens, as
evaluation runs the engine (`FastBackend.forward_all`).

Each variant is compiled and loaded through `build.load(defines=...)`, as the engine loads its
default build (ctypes declarations and ABI check included; the build cache keys on the macros);
every variant opens its own FastBackend on the same packed model, and the variants are timed
round-robin in one process so that drifts of this shared machine hit all of them alike. Prints
medians; writes nothing.

    .venv/bin/python bench/kernel_ab.py --packed PACKED_DIR --threads 2 "" "TF_PREFETCH=0" "TF_PREFETCH=512"
    .venv/bin/python bench/kernel_ab.py --packed PACKED_DIR --all-logits "" "TF_ROW_BLOCK_BYTES=1099511627776"
(a variant is `+`-joined NAME=VALUE macros; "" is the default build; `--build-only` compiles and
loads the variants and times nothing)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from unittest import mock

import tightfit.runtime.engine as engine
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.runtime.kernels import build
from tightfit.runtime.speed import random_prompt, time_round_robin


def defines(variant: str) -> tuple[str, ...]:
    """"TF_PREFETCH=0+TF_DECODE_TILES=2" -> ("TF_PREFETCH=0", "TF_DECODE_TILES=2"); "" -> ()."""
    return tuple(d for d in variant.split("+") if d)


def load_variants(variants: list[str]) -> dict[str, ctypes.CDLL]:
    """Every variant's kernel library, built (or found in the cache) and loaded by build.load."""
    return {v: build.load(defines=defines(v)) for v in variants}


def backend_on(lib: ctypes.CDLL, packed: PackedModel, **kwargs) -> engine.FastBackend:
    """A FastBackend that runs the kernel library `lib` (one variant's build) instead of the default."""
    with mock.patch.object(engine, "load", lambda portable=False: lib):
        return engine.FastBackend(packed, **kwargs)


def time_all_logits(backends: dict[str, engine.FastBackend], window: list[int], rounds: int) -> dict[str, list[float]]:
    """Tokens/s of forward_all on `window` from an empty cache, each backend once per round,
    round-robin; the first round warms up."""
    out: dict[str, list[float]] = {key: [] for key in backends}
    for rnd in range(rounds):
        for key, backend in backends.items():
            backend.reset()
            t = time.perf_counter()
            backend.forward_all(window)
            if rnd:
                out[key].append(len(window) / (time.perf_counter() - t))
    return out


def main(path: str, threads: int, variants: list[str], rounds: int = 7, new_tokens: int = 64,
         all_logits: int = 0) -> None:
    packed = load_packed(path)
    positions = max(512, all_logits)
    backends = [backend_on(lib, packed, max_positions=positions, threads=threads) for lib in load_variants(variants).values()]
    if all_logits:
        runs = time_all_logits(dict(zip(variants, backends)), random_prompt(backends[0].vocab_size, all_logits), rounds)
        for v in variants:
            print(f"{v or '(default)':45s} all-logits median {statistics.median(runs[v]):7.1f} tok/s  "
                  f"runs {[round(x) for x in runs[v]]}")
        return
    prompt = random_prompt(backends[0].vocab_size, 256)
    runs = time_round_robin(dict(zip(variants, backends)), prompt, new_tokens, rounds - 1)  # a warm-up round first
    for v in variants:
        tok_s = runs[v].decode_tok_s
        print(f"{v or '(default)':45s} decode median {statistics.median(tok_s):6.1f} tok/s  runs {[round(x) for x in tok_s]}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", metavar="VARIANT", help='`+`-joined NAME=VALUE macros; "" is the default build')
    ap.add_argument("--packed", help="packed model directory (required unless --build-only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds; the first warms up")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--all-logits", type=int, default=0, metavar="TOKENS",
                    help="time scoring a window of TOKENS tokens (every token's logits) instead of decode")
    ap.add_argument("--build-only", action="store_true", help="compile and load every variant, time nothing")
    args = ap.parse_args()
    if args.build_only:
        for v, lib in load_variants(args.variants).items():
            print(f"{v or '(default)':45s} built, ABI {lib.tf_abi_version()}, AVX-512 {bool(lib.tf_has_avx512())}")
    elif not args.packed:
        ap.error("--packed is required unless --build-only")
    else:
        main(args.packed, args.threads, args.variants, rounds=args.rounds, new_tokens=args.new_tokens,
             all_logits=args.all_logits)

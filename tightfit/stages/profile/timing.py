"""How the profile stage times things: one kernel call (on random weights, streamed from memory),
the whole packed model's decode on the engine, the read bandwidth; and the identity of what is
timed (machine, CPU, kernel sources) that keys the cached timings."""

from __future__ import annotations

import hashlib
import math
import statistics
import time

import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.artifacts import Choice, Unquantized
from tightfit.formats.packed import PackedModel
from tightfit.runtime import kernels
from tightfit.runtime.kernels.build import cpu_fingerprint, source_hash
from tightfit.stages.profile.table import ProfileConfig


def kernel_hash() -> str:
    """sha256 of the engine sources: identifies the kernels' version."""
    return source_hash()


def machine_id() -> str:
    """Short hash of the CPU model and instruction sets (`cpu_fingerprint`)."""
    return hashlib.sha256(cpu_fingerprint().encode()).hexdigest()[:16]


def cpu_name() -> str:
    return cpu_fingerprint().split("|", 1)[0]


def _random_matrix(shape: tuple[int, int], fmt: Choice) -> kernels.KernelMatrix:
    """A [N, K] matrix in the layout the engine gives fmt (see FastBackend._matrix)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # [N, K] fp32
    if kernels.has_kernel(fmt):
        return kernels.from_quantized(quantize_rtn_any(w, fmt, clip_search=False))
    return kernels.from_dense(w.half() if isinstance(fmt, Unquantized) else w)


def streamed_copies(w: kernels.KernelMatrix, megabytes: int) -> list[kernels.KernelMatrix]:
    """w and copies of it, at least `megabytes` MB together (at most 65536 matrices)."""
    count = max(1, min(65536, math.ceil(megabytes * 1e6 / max(w.nbytes, 1))))
    return [w] + [w.clone() for _ in range(count - 1)]


def time_call_ms(w: kernels.KernelMatrix | list[kernels.KernelMatrix], m: int, config: ProfileConfig) -> float:
    """Median ms of one [m, K] x W^T call: a warm-up, then `repeats` timed calls of enough
    back-to-back reps to last min_repeat_s each (w: a matrix, or copies the reps cycle through)."""
    first = kernels.time_matmul(w, m, threads=config.threads, reps=1)  # warm-up: pages, caches, thread pool
    probe = kernels.time_matmul(w, m, threads=config.threads, reps=3)
    reps = max(1, min(10_000, math.ceil(config.min_repeat_s / max(min(first, probe), 1e-9))))
    runs = [kernels.time_matmul(w, m, threads=config.threads, reps=reps) for _ in range(config.repeats)]
    return 1e3 * statistics.median(runs)

def measure_model_decode(packed: PackedModel, config: ProfileConfig) -> tuple[float, float, float]:
    """(decode ms per token, ms per token in the decoder blocks' linear layers, ms per token in
    the head) of a packed model on the engine: a short prompt, then greedy tokens; medians over
    fixed_repeats runs after a warm-up. The last two are the engine's own phase timers over the
    decode steps only."""
    from tightfit.runtime.engine import FastBackend
    from tightfit.runtime.speed import random_prompt

    backend = FastBackend(packed, max_positions=config.fixed_prompt + config.fixed_new_tokens, threads=config.threads,
                          kv_bits=config.kv_bits)
    prompt = random_prompt(backend.vocab_size, config.fixed_prompt, 0)
    decode, linear, head = [], [], []
    for run in range(config.fixed_repeats + 1):  # the first is a warm-up
        backend.reset()
        token = int(backend.forward(prompt).argmax())
        backend.phase_seconds()  # drop the prefill's
        t0 = time.perf_counter()
        for _ in range(config.fixed_new_tokens):
            token = int(backend.forward([token]).argmax())
        seconds = time.perf_counter() - t0
        phases = backend.phase_seconds()
        if run:
            decode.append(1e3 * seconds / config.fixed_new_tokens)
            linear.append(1e3 * sum(phases[p] for p in backend.LINEAR_PHASES) / config.fixed_new_tokens)
            head.append(1e3 * phases["head"] / config.fixed_new_tokens)
    return statistics.median(decode), statistics.median(linear), statistics.median(head)


def measure_bandwidth_gb_s(config: ProfileConfig) -> float:
    from tightfit.runtime.speed import measure_bandwidth

    return measure_bandwidth(config.threads, megabytes=config.bandwidth_mb)

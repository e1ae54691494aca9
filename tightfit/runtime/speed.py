"""Measure a backend's speed honestly: warm-up, fixed threads, medians of repeats, and the roofline.

Decoding one token reads every weight once, so its ceiling is the machine's read bandwidth divided
by the bytes read per token (weights + the KV cache read by attention). `measure_bandwidth` times
tightfit's own streaming-read kernel over a buffer far larger than the caches, in the same process
as the measurement it is compared with.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from tightfit.runtime.backend import Backend


@dataclass(frozen=True)
class SpeedReport:
    """Medians over `repeats` runs of: prefill `prompt_tokens`, then decode `new_tokens` greedily.

    prefill_tok_s, decode_tok_s: tokens per second; decode_ms: milliseconds per decoded token
    weight_bytes: bytes of weights read per decoded token (0 when unknown)
    bandwidth_gb_s: measured read bandwidth with the same threads (0 when not measured)
    roofline_fraction: decode_tok_s * bytes per token / bandwidth (0 when unknown)
    peak_rss_mb: the process's peak resident memory so far
    """

    threads: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms: float
    prefill_runs: tuple[float, ...]
    decode_runs: tuple[float, ...]
    weight_bytes: int
    bandwidth_gb_s: float
    roofline_tok_s: float
    roofline_fraction: float
    peak_rss_mb: float

    def to_json(self) -> dict:
        return asdict(self)


def measure_bandwidth(threads: int, *, megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: median of `repeats` passes over a `megabytes` buffer."""
    from tightfit.runtime import kernels

    buf = torch.ones(megabytes << 20, dtype=torch.uint8)
    kernels.read_seconds(buf, 1, threads)  # fault the pages in, warm up
    runs = [buf.numel() / kernels.read_seconds(buf, 1, threads) / 1e9 for _ in range(repeats)]
    return statistics.median(runs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_speed(
    backend: Backend,
    *,
    prompt_tokens: int = 256,
    new_tokens: int = 128,
    repeats: int = 5,
    threads: int = 1,
    weight_bytes: int = 0,
    bandwidth_gb_s: float = 0.0,
    seed: int = 0,
) -> SpeedReport:
    """Time prefill and greedy decode on a fixed random prompt (speed does not depend on the text)."""
    if prompt_tokens + new_tokens > backend.max_positions:
        raise ValueError(f"{prompt_tokens} + {new_tokens} tokens exceed the KV cache of {backend.max_positions}")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, backend.vocab_size, (prompt_tokens,), generator=g).tolist()
    prefill, decode = [], []
    for run in range(repeats + 1):  # run 0 warms up
        backend.reset()
        t0 = time.perf_counter()
        logits = backend.forward(prompt)
        t1 = time.perf_counter()
        token = int(logits.argmax())
        for _ in range(new_tokens):
            token = int(backend.forward([token]).argmax())
        t2 = time.perf_counter()
        if run:
            prefill.append(prompt_tokens / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))
    decode_tok_s = statistics.median(decode)
    # weights only: at these context lengths the KV cache read by attention is small beside them
    roofline = bandwidth_gb_s * 1e9 / weight_bytes if weight_bytes and bandwidth_gb_s else 0.0
    return SpeedReport(
        threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
        prefill_tok_s=statistics.median(prefill), decode_tok_s=decode_tok_s, decode_ms=1e3 / decode_tok_s,
        prefill_runs=tuple(prefill), decode_runs=tuple(decode), weight_bytes=weight_bytes,
        bandwidth_gb_s=bandwidth_gb_s, roofline_tok_s=roofline,
        roofline_fraction=decode_tok_s / roofline if roofline else 0.0, peak_rss_mb=peak_rss_mb(),
    )

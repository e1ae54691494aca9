"""Measure a backend's speed honestly: warm-up, fixed threads, medians of repeats, and the roofline.

Backends compared with each other are timed round-robin in one process (`time_round_robin`): each
round runs every backend once, so drifts of a shared machine hit all of them alike.

Decoding one token reads every weight once, so its ceiling is the machine's read bandwidth divided
by the bytes read per token (weights + the KV cache read by attention). `measure_bandwidth` times
tightfit's own streaming-read kernel over a buffer far larger than the caches, in the same process
as the measurement it is compared with.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

from tightfit.runtime.backend import Backend

K = TypeVar("K", bound=Hashable)


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


def random_prompt(vocab_size: int, tokens: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (tokens,), generator=g).tolist()


def time_once(backend: Backend, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one run from an empty cache: the prompt, then greedy tokens."""
    if len(prompt) + new_tokens > backend.max_positions:
        raise ValueError(f"{len(prompt)} + {new_tokens} tokens exceed the KV cache of {backend.max_positions}")
    backend.reset()
    t0 = time.perf_counter()
    token = int(backend.forward(prompt).argmax())
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = int(backend.forward([token]).argmax())
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


@dataclass(frozen=True)
class TimedRuns:
    """One backend's timed runs in round order (warm-up excluded): tokens per second of each."""

    prefill_tok_s: tuple[float, ...]
    decode_tok_s: tuple[float, ...]


def time_round_robin(backends: Mapping[K, Backend], prompt: list[int], new_tokens: int, repeats: int, *,
                     max_rounds: Mapping[K, int] | None = None,
                     on_round: Callable[[int], None] = lambda _: None) -> dict[K, TimedRuns]:
    """Time every backend `repeats` times with `time_once`, round-robin: a warm-up round, then
    `repeats` rounds, each running every backend once in the mapping's order.

    max_rounds: timed rounds of a backend when fewer than `repeats` (a slow one: it sits out the
    later rounds). on_round(r) after round r, 0 being the warm-up.
    """
    limit = dict(max_rounds or {})
    runs: dict[K, list[tuple[float, float]]] = {key: [] for key in backends}
    for rnd in range(repeats + 1):  # round 0 warms up
        for key, backend in backends.items():
            if rnd > limit.get(key, repeats):
                continue
            r = time_once(backend, prompt, new_tokens)
            if rnd:
                runs[key].append(r)
        on_round(rnd)
    return {key: TimedRuns(prefill_tok_s=tuple(r[0] for r in rs), decode_tok_s=tuple(r[1] for r in rs))
            for key, rs in runs.items()}


def report(*, threads: int, prompt_tokens: int, new_tokens: int, prefill: Sequence[float], decode: Sequence[float],
           weight_bytes: int = 0, bandwidth_gb_s: float = 0.0) -> SpeedReport:
    """A SpeedReport from runs timed elsewhere (e.g. interleaved with other engines)."""
    decode_tok_s = statistics.median(decode)
    roofline = bandwidth_gb_s * 1e9 / weight_bytes if weight_bytes and bandwidth_gb_s else 0.0
    return SpeedReport(
        threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=len(decode),
        prefill_tok_s=statistics.median(prefill), decode_tok_s=decode_tok_s, decode_ms=1e3 / decode_tok_s,
        prefill_runs=tuple(prefill), decode_runs=tuple(decode), weight_bytes=weight_bytes,
        bandwidth_gb_s=bandwidth_gb_s, roofline_tok_s=roofline,
        roofline_fraction=decode_tok_s / roofline if roofline else 0.0, peak_rss_mb=peak_rss_mb(),
    )


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
    prompt = random_prompt(backend.vocab_size, prompt_tokens, seed)
    runs = time_round_robin({0: backend}, prompt, new_tokens, repeats)[0]
    return report(threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill=runs.prefill_tok_s,
                  decode=runs.decode_tok_s, weight_bytes=weight_bytes, bandwidth_gb_s=bandwidth_gb_s)

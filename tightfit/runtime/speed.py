"""Measure a backend's speed honestly: warm-up, fixed threads, medians of repeats, and the roofline.

Backends compared with each other are timed round-robin in one process (`time_round_robin`): each
round runs every backend once, so drifts of a shared machine hit all of them alike.

Decoding one token reads every weight once, so its ceiling is the machine's read bandwidth divided
by the bytes read per token (weights + the KV cache read by attention). `measure_bandwidth` times
tightfit's own streaming-read kernel over a buffer far larger than the caches, in the same process
as the measurement it is compared with. The read bandwidth of a shared machine drifts by tens of
percent within seconds, so `BandwidthProbe` measures it again right before every timed run, and a
run's roofline fraction is taken against the bandwidth of its own moment.
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
    bandwidth_runs: the read bandwidth probed right before each run (empty when probed once); then
        bandwidth_gb_s and roofline_tok_s are their medians' and roofline_fraction is the median
        of every run's decode over its own moment's roofline
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
    bandwidth_runs: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def measure_bandwidth(threads: int, *, megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: median of `repeats` passes over a `megabytes` buffer."""
    probe = BandwidthProbe(threads, megabytes=megabytes, passes=1)
    return statistics.median(probe() for _ in range(repeats))


class BandwidthProbe:
    """The read bandwidth now, in GB/s: the best of `passes` reads of a `megabytes` buffer (far
    larger than the caches) that stays allocated and faulted in between calls, so a probe costs
    only its reads (~20 ms per pass of 1 GB) and can run before every timed run."""

    def __init__(self, threads: int, *, megabytes: int = 1024, passes: int = 2) -> None:
        from tightfit.runtime import kernels

        self._read = kernels.read_seconds
        self.threads, self.passes = threads, passes
        self._buf = torch.ones(megabytes << 20, dtype=torch.uint8)
        self._read(self._buf, 1, threads)  # fault the pages in, warm up

    def __call__(self) -> float:
        return max(self._buf.numel() / self._read(self._buf, 1, self.threads) / 1e9 for _ in range(self.passes))


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
    bandwidth_gb_s: tuple[float, ...] = ()  # probed right before each run (empty without a probe)


def time_round_robin(backends: Mapping[K, Backend], prompt: list[int], new_tokens: int, repeats: int, *,
                     max_rounds: Mapping[K, int] | None = None,
                     on_round: Callable[[int], None] = lambda _: None,
                     before_run: Callable[[K], None] = lambda _: None,
                     probe: Callable[[], float] | None = None) -> dict[K, TimedRuns]:
    """Time every backend `repeats` times with `time_once`, round-robin: a warm-up round, then
    `repeats` rounds, each running every backend once in the mapping's order.

    max_rounds: timed rounds of a backend when fewer than `repeats` (a slow one: it sits out the
    later rounds). on_round(r) after round r, 0 being the warm-up. before_run(key) before every run
    of that backend, warm-up included (e.g. to set up the conditions it is timed in). probe (e.g. a
    BandwidthProbe): called right before every timed run, its value kept beside the run's times.
    """
    limit = dict(max_rounds or {})
    runs: dict[K, list[tuple[float, float, float]]] = {key: [] for key in backends}
    for rnd in range(repeats + 1):  # round 0 warms up
        for key, backend in backends.items():
            if rnd > limit.get(key, repeats):
                continue
            before_run(key)
            bandwidth = probe() if probe is not None and rnd else 0.0
            r = time_once(backend, prompt, new_tokens)
            if rnd:
                runs[key].append((*r, bandwidth))
        on_round(rnd)
    return {key: TimedRuns(prefill_tok_s=tuple(r[0] for r in rs), decode_tok_s=tuple(r[1] for r in rs),
                           bandwidth_gb_s=tuple(r[2] for r in rs) if probe is not None else ())
            for key, rs in runs.items()}


def report(*, threads: int, prompt_tokens: int, new_tokens: int, prefill: Sequence[float], decode: Sequence[float],
           weight_bytes: int = 0, bandwidth_gb_s: float = 0.0, bandwidth_runs: Sequence[float] = ()) -> SpeedReport:
    """A SpeedReport from runs timed elsewhere (e.g. interleaved with other engines). The roofline
    takes bandwidth_runs (one probe per decode run, TimedRuns.bandwidth_gb_s) where given, else
    the one bandwidth_gb_s."""
    decode_tok_s = statistics.median(decode)
    if bandwidth_runs:
        assert len(bandwidth_runs) == len(decode), "one bandwidth probe per run"
        bandwidth_gb_s = statistics.median(bandwidth_runs)
    roofline = bandwidth_gb_s * 1e9 / weight_bytes if weight_bytes and bandwidth_gb_s else 0.0
    if bandwidth_runs and weight_bytes:
        fraction = statistics.median(d * weight_bytes / (b * 1e9) for d, b in zip(decode, bandwidth_runs))
    else:
        fraction = decode_tok_s / roofline if roofline else 0.0
    return SpeedReport(
        threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=len(decode),
        prefill_tok_s=statistics.median(prefill), decode_tok_s=decode_tok_s, decode_ms=1e3 / decode_tok_s,
        prefill_runs=tuple(prefill), decode_runs=tuple(decode), weight_bytes=weight_bytes,
        bandwidth_gb_s=bandwidth_gb_s, roofline_tok_s=roofline, roofline_fraction=fraction, peak_rss_mb=peak_rss_mb(),
        bandwidth_runs=tuple(bandwidth_runs),
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
    probe: Callable[[], float] | None = None,
    seed: int = 0,
) -> SpeedReport:
    """Time prefill and greedy decode on a fixed random prompt (speed does not depend on the text);
    the roofline from `probe` before every run where given, else from bandwidth_gb_s."""
    prompt = random_prompt(backend.vocab_size, prompt_tokens, seed)
    runs = time_round_robin({0: backend}, prompt, new_tokens, repeats, probe=probe)[0]
    return report(threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill=runs.prefill_tok_s,
                  decode=runs.decode_tok_s, weight_bytes=weight_bytes, bandwidth_gb_s=bandwidth_gb_s,
                  bandwidth_runs=runs.bandwidth_gb_s)

"""The round-robin timing loop: its order of runs, warm-up and per-backend round limits."""

from __future__ import annotations

import pytest
import torch

from tightfit.runtime.speed import BandwidthProbe, measure_speed, report, time_round_robin


class _Recorder:
    """A Backend that logs every reset (one per timed run) under its name."""

    vocab_size = 8
    max_positions = 64

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.position = name, log, 0

    def reset(self) -> None:
        self.log.append(self.name)
        self.position = 0

    def truncate(self, n: int) -> None:
        self.position = n

    def forward(self, ids) -> torch.Tensor:
        self.position += len(ids)
        return torch.zeros(self.vocab_size)


def test_rounds_run_every_backend_once_in_order_after_a_warm_up():
    log: list[str] = []
    backends = {k: _Recorder(k, log) for k in ("a", "b", "slow")}
    rounds: list[int] = []
    runs = time_round_robin(backends, [1, 2, 3], 4, 3, max_rounds={"slow": 1}, on_round=rounds.append)
    assert log == ["a", "b", "slow", "a", "b", "slow", "a", "b", "a", "b"]
    assert rounds == [0, 1, 2, 3]
    assert [len(runs[k].decode_tok_s) for k in backends] == [3, 3, 1]
    assert all(len(r.prefill_tok_s) == len(r.decode_tok_s) and min(r.decode_tok_s) > 0 for r in runs.values())


def test_measure_speed_is_one_backend_round_robin():
    log: list[str] = []
    report = measure_speed(_Recorder("a", log), prompt_tokens=3, new_tokens=2, repeats=4)
    assert log == ["a"] * 5 and report.repeats == 4 and len(report.prefill_runs) == 4


def test_a_run_longer_than_the_cache_is_refused():
    with pytest.raises(ValueError, match="exceed the KV cache of 64"):
        time_round_robin({"a": _Recorder("a", [])}, list(range(60)), 8, 1)


def test_a_probe_runs_right_before_every_timed_run_and_its_values_stay_with_the_runs():
    log: list[str] = []
    backends = {k: _Recorder(k, log) for k in ("a", "b")}
    values = iter([10.0, 20.0, 30.0, 40.0])

    def probe() -> float:
        log.append("probe")
        return next(values)

    runs = time_round_robin(backends, [1, 2], 2, 2, probe=probe)
    assert log == ["a", "b", "probe", "a", "probe", "b", "probe", "a", "probe", "b"]  # none before the warm-up round
    assert runs["a"].bandwidth_gb_s == (10.0, 30.0) and runs["b"].bandwidth_gb_s == (20.0, 40.0)
    assert time_round_robin(backends, [1], 1, 1)["a"].bandwidth_gb_s == ()


def test_the_roofline_fraction_is_taken_run_by_run_against_each_runs_own_bandwidth():
    # 1 GB per token: run r decodes d tok/s against b GB/s, fraction d / b
    r = report(threads=2, prompt_tokens=1, new_tokens=1, prefill=[1.0] * 3, decode=[10.0, 20.0, 30.0],
               weight_bytes=10**9, bandwidth_runs=[20.0, 20.0, 100.0])
    assert r.roofline_fraction == pytest.approx(0.5)  # median of 0.5, 1.0, 0.3; not 20 / 20
    assert r.bandwidth_gb_s == 20.0 and r.roofline_tok_s == pytest.approx(20.0) and r.bandwidth_runs == (20.0, 20.0, 100.0)
    one = report(threads=2, prompt_tokens=1, new_tokens=1, prefill=[1.0], decode=[10.0], weight_bytes=10**9, bandwidth_gb_s=40.0)
    assert one.roofline_fraction == pytest.approx(0.25) and one.bandwidth_runs == ()


def test_a_bandwidth_probe_reads_its_buffer_and_reports_gb_s():
    probe = BandwidthProbe(1, megabytes=8, passes=2)
    assert 0.1 < probe() < 10_000

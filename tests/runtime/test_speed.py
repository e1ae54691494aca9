"""The round-robin timing loop: its order of runs, warm-up and per-backend round limits."""

from __future__ import annotations

import pytest
import torch

from tightfit.runtime.speed import measure_speed, time_round_robin


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

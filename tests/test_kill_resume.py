"""SIGKILL a real `tightfit compress` at seeded random moments (loading, calibration, the quantized
blocks, packing) and run it again: the packed folder is byte-identical to an uninterrupted run.

After each kill the output folder is absent, or the previous one, or the complete new one: never
a partial one. After each rerun nothing is left beside it (no work folder, no temp folders).
The trials are tests/kill_resume_trials.py (bench/kill_resume.py writes the slow variant up as
bench/results/kill_resume.md).

Default run: a plain rerun (the determinism this needs) and 3 kills; `-m slow`: 24 kills, 6 per
phase. Each trial's kill point and outcome is printed as a table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kill_resume_trials import FAST_SEED, FAST_TRIALS, SLOW_SEED, SLOW_TRIALS, Outcome, run_trials, table


def _trials(n: int, seed: int, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path, capsys) -> list[Outcome]:
    trials = run_trials(n, seed, tiny_model_dir, tiny_text_file, tmp_path)
    with capsys.disabled():
        print("\n" + table(trials))
    assert trials.problems() == []
    assert all(o.rerun_identical and o.out_after_kill != "partial" and not o.debris for o in trials.outcomes)
    assert trials.killed(), "no trial killed the process: the test tested nothing"
    return trials.outcomes


def test_killed_compress_reruns_to_the_same_bytes(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    _trials(FAST_TRIALS, FAST_SEED, tiny_model_dir, tiny_text_file, tmp_path, capsys)


@pytest.mark.slow
def test_killed_compress_reruns_to_the_same_bytes_24_trials(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    outcomes = _trials(SLOW_TRIALS, SLOW_SEED, tiny_model_dir, tiny_text_file, tmp_path, capsys)
    killed = {o.killed_in for o in outcomes}
    assert {"load", "calibration", "blocks"} <= killed, f"kills landed only in {sorted(killed)}"
    assert any(o.blocks_saved and o.rerun_resumed for o in outcomes), "no rerun resumed from a finished block"


def test_every_broken_promise_is_named():
    kept = Outcome(3, "pack", 0.01, "pack", 2, True, "previous", True, True, ())
    assert kept.problems() == []
    broken = [
        (dict(out_after_kill="absent"), "trial 3: a kill while replacing an existing packed folder left none"),
        (dict(out_after_kill="partial"), "trial 3: a kill in pack left a partial packed folder"),
        (dict(rerun_identical=False), "trial 3: the rerun after a kill in pack wrote other bytes"),
        (dict(debris=(".out.work",)), "trial 3: debris beside --out: .out.work"),
    ]
    for change, problem in broken:
        assert dataclasses.replace(kept, **change).problems() == [problem]
    assert dataclasses.replace(kept, replaced_previous=False, out_after_kill="absent").problems() == []

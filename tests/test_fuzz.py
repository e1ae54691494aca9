"""Hostile inputs never crash tightfit: seeded mutations of packed folders, transformers folders and
GGUF files (tests/fuzz_inputs.py), each read by a `tightfit` command in a subprocess
(tests/fuzz_runner.py), end in exit 0 or in one `tightfit: error:` line: no traceback, no signal, no
hang past the deadline, no output after an error. The default run takes CASES seeds; bench/fuzz.py
runs 10,000 and commits the counts."""

from __future__ import annotations

import collections
import os
import signal
import threading
from pathlib import Path

import pytest

from fuzz_inputs import GGUF_KINDS, PACKED_KINDS, SOURCE_KINDS, build_seeds, make_case
from fuzz_runner import FAILURES, Result, Worker, fuzz, judge, run_case, run_fresh

CASES = 150  # about 40 s on a 2-core machine; bench/fuzz.py runs the long count
DEADLINE = 120.0  # seconds per case; a case takes well under one
CHECKSUM_ERRORS = ("does not match", "truncated or corrupted", "is incomplete", "does not list")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory):
    return build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


def test_hostile_inputs_end_in_one_line_errors(seeds, tmp_path: Path) -> None:
    worker = Worker(DEADLINE, cwd=tmp_path)
    try:
        results = list(fuzz(range(CASES), seeds, tmp_path, worker))
    finally:
        worker.close()

    failures = [f"seed {c.seed} {c.target}/{c.kind} ({c.detail}) `tightfit {' '.join(c.argv[:1])}`: {r.outcome}: {r.line}"
                for c, r in results if r.outcome in FAILURES]
    assert not failures, "\n".join(failures)
    kinds = collections.Counter((c.target, c.kind) for c, _ in results)
    expected = ({("packed", k) for k in PACKED_KINDS} | {("safetensors", k) for k in SOURCE_KINDS}
                | {("gguf", k) for k in GGUF_KINDS})
    assert expected <= set(kinds), f"kinds never drawn: {expected - set(kinds)}"
    outcomes = collections.Counter(r.outcome for _, r in results)
    assert outcomes["ok"] and outcomes["error"], outcomes
    # resealed folders get past the checksums: the checks behind them (config vs tensors, formats) answer too
    deep = [r.line for c, r in results if c.sealed and r.outcome == "error" and not any(s in r.line for s in CHECKSUM_ERRORS)]
    assert len(deep) >= 10, deep


def test_the_worker_answers_as_a_fresh_process(seeds, tmp_path: Path) -> None:
    """The cheap path is faithful: the same cases in `python -m tightfit.cli` end the same way, same error line."""
    worker = Worker(DEADLINE, cwd=tmp_path)
    compared = collections.Counter()
    try:
        for n in range(40):
            case = make_case(n, seeds, tmp_path / f"case-{n}")
            if compared[case.target] >= 1 or case.argv[0] == "info":
                continue
            in_worker = run_case(worker, case.argv, tmp_path / f"case-{n}", case.out)
            fresh = run_fresh(case.argv, tmp_path / f"case-{n}", case.out, DEADLINE)
            assert (fresh.outcome, fresh.line) == (in_worker.outcome, in_worker.line), (case, fresh, in_worker)
            compared[case.target] += 1
    finally:
        worker.close()
    assert set(compared) == {"packed", "safetensors", "gguf"}


def test_the_worker_reports_a_signal_and_a_hang_and_carries_on(seeds, tmp_path: Path) -> None:
    """The runner's own signal and deadline paths: a worker killed mid-case, one past its deadline, then a
    new worker that answers."""
    argv = ("generate", str(seeds.packed[0]), "the cat", "--max-tokens", "2", "--temperature", "0")
    worker = Worker(DEADLINE, cwd=tmp_path)
    try:
        timer = threading.Timer(0.5, lambda: os.kill(worker._proc.pid, signal.SIGSEGV))
        timer.start()
        assert run_case(worker, argv, tmp_path, None) == Result("signal", -signal.SIGSEGV, "killed by signal 11")
        worker.timeout = 0.01
        assert run_case(worker, argv, tmp_path, None).outcome == "timeout"
        worker.timeout = DEADLINE
        assert run_case(worker, argv, tmp_path, None).outcome == "ok"
    finally:
        worker.close()


@pytest.mark.parametrize("rc, out, err, outcome", [
    (0, "text\n", "tightfit: loading x\n", "ok"),
    (2, "", "tightfit: loading x\ntightfit: error: bad\n", "error"),
    (2, "", "q: 50%|##  | 1/2\ntightfit: error: bad\n", "error"),
    (1, "", "Traceback (most recent call last):\n  File ...\nValueError: x\n", "traceback"),
    (-11, "", "", "signal"),
    (None, "", "", "timeout"),
    (2, "half a sent", "tightfit: error: bad\n", "partial_output"),
    (2, "", "tightfit: error: bad\ntightfit: error: again\n", "bad_error"),
    (2, "", "some library noise\ntightfit: error: bad\n", "bad_error"),
    (1, "", "tightfit: error: bad\n", "bad_error"),
])
def test_the_judge(rc, out, err, outcome) -> None:
    assert judge(rc, out, err, None).outcome == outcome


def test_the_judge_sees_a_published_output_after_an_error(tmp_path: Path) -> None:
    (tmp_path / ".out.work").mkdir()  # finished blocks, kept for a resume: allowed
    assert judge(2, "", "tightfit: error: bad\n", tmp_path / "out").outcome == "error"
    (tmp_path / ".out.123.tmp").mkdir()
    assert judge(2, "", "tightfit: error: bad\n", tmp_path / "out").outcome == "partial_output"

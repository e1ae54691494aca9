"""Fuzzing at length: N seeded hostile inputs (default 10,000) through the `tightfit` command, counted
per input, mutation and outcome. The cases and the contract are those of tests/test_fuzz.py, which
runs the first 150 seeds by default (tests/fuzz_inputs.py makes the cases, tests/fuzz_runner.py runs
them in worker subprocesses and judges each).

    python bench/fuzz.py [--cases 10000] [--start 0] [--workers W] [--deadline 120]

Writes bench/results/fuzz.json and fuzz.md. Exits 1 if any case broke the contract; the folders of
those cases are kept under --work and listed, and `--start SEED --cases 1` replays one.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from common import machine_info, machine_line, write_results  # noqa: E402
from fuzz_inputs import build_seeds  # noqa: E402
from fuzz_runner import FAILURES, OUTCOMES, Worker, fuzz  # noqa: E402


def _shape_of(line: str) -> str:
    """An error line with paths, numbers and quoted values blanked, so that alike errors count together."""
    line = re.sub(r"(/[^\s:,()']+)+", "PATH", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    return re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e[-+]?\d+)?", "N", line)[:160]


def run(numbers: list[int], seeds, work: Path, workers: int, deadline: float) -> list[tuple]:
    """(case, result) for every seed number, run by `workers` worker subprocesses side by side."""
    results: list[tuple] = []
    lock = threading.Lock()

    def drive(share: list[int]) -> None:
        worker = Worker(deadline, cwd=work)
        try:
            for pair in fuzz(share, seeds, work, worker):
                with lock:
                    results.append(pair)
                    if len(results) % 500 == 0:
                        print(f"{len(results)} / {len(numbers)} cases", file=sys.stderr, flush=True)
        finally:
            worker.close()

    threads = [threading.Thread(target=drive, args=(numbers[i::workers],)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda pair: pair[0].seed)


def report(results: list[tuple], args, seconds: float, machine: dict) -> tuple[dict, str]:
    rows: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for case, result in results:
        rows[(case.target, case.kind, case.sealed)][result.outcome] += 1
    totals = collections.Counter(r.outcome for _, r in results)
    errors = collections.Counter(_shape_of(r.line) for _, r in results if r.outcome == "error")
    failures = [{"seed": c.seed, "input": c.target, "mutation": c.kind, "sealed": c.sealed, "detail": c.detail,
                 "command": ["tightfit", *c.argv], "outcome": r.outcome, "rc": r.rc, "line": r.line}
                for c, r in results if r.outcome in FAILURES]
    payload = {
        "machine": machine, "cases": len(results), "first_seed": args.start, "workers": args.workers,
        "deadline_s": args.deadline, "seconds": round(seconds, 1), "outcomes": {o: totals[o] for o in OUTCOMES},
        "rows": [{"input": t, "mutation": k, "sealed": s, "cases": sum(c.values()), **{o: c[o] for o in OUTCOMES}}
                 for (t, k, s), c in sorted(rows.items())],
        "common_errors": errors.most_common(20), "failures": failures,
    }
    head = "| input | mutation | resealed | cases | " + " | ".join(OUTCOMES) + " |"
    lines = [
        "# Fuzzing: hostile inputs through the `tightfit` command", "",
        machine_line(machine, 1) + f" {args.workers} worker process(es).", "",
        f"{len(results)} seeded cases (seeds {args.start}..{args.start + len(results) - 1}) in {seconds / 60:.1f} min; "
        f"deadline {args.deadline:.0f} s per case. Contract: exit 0, or exit 2 with one `tightfit: error:` line; "
        "no traceback, no signal, no hang, no output after an error (tests/fuzz_runner.py). Packed folders are "
        "resealed (checksums recomputed) half of the time, so that the checks behind the checksums are reached.", "",
        f"**{sum(totals[f] for f in FAILURES)} cases broke the contract** "
        f"({', '.join(f'{o} {totals[o]}' for o in OUTCOMES)}).", "",
        head, "|" + "---|" * (4 + len(OUTCOMES)),
    ]
    for row in payload["rows"]:
        lines.append(f"| {row['input']} | {row['mutation']} | {'yes' if row['sealed'] else 'no'} | {row['cases']} | "
                     + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
    lines += ["", "Most frequent error lines (paths, numbers and quoted values blanked):", ""]
    lines += [f"- {n} x `{shape}`" for shape, n in errors.most_common(20)]
    if failures:
        lines += ["", "Failures (folders kept under the work directory):", ""]
        lines += [f"- seed {f['seed']} {f['input']}/{f['mutation']}: {f['outcome']}: {f['line']}" for f in failures[:50]]
    return payload, "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of seeded cases (default 10,000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                        help="worker processes side by side (default: half the cores, at most 4)")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a case may take (default 120)")
    parser.add_argument("--work", type=Path, default=None, help="folder for seeds and cases (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write bench/results")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tightfit-fuzz-"))
    (work / "seeds").mkdir(parents=True, exist_ok=True)
    print(f"building the seed inputs in {work / 'seeds'}", file=sys.stderr)
    seeds = build_seeds(work / "seeds")
    started = time.monotonic()
    results = run(list(range(args.start, args.start + args.cases)), seeds, work, args.workers, args.deadline)
    payload, markdown = report(results, args, time.monotonic() - started, machine_info())
    print(markdown)
    if not args.no_write:
        for path in write_results("fuzz", payload, markdown):
            print(f"wrote {path}", file=sys.stderr)
    if payload["failures"]:
        print(f"failing cases kept in {work}", file=sys.stderr)
        return 1
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

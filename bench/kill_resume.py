"""Kill and resume at length: N `tightfit compress` runs of a tiny model SIGKILLed at seeded random
moments (a quarter each in load, calibration, the quantized blocks and packing), each run again to
the end and its packed folder compared byte for byte with an uninterrupted run's. The trials are
those of tests/test_kill_resume.py (tests/kill_resume_trials.py runs them; the defaults are its slow
variant's 24 trials, seed 1).

    python bench/kill_resume.py [--trials 24] [--seed 1] [--note TEXT ...] [--no-write]

Writes bench/results/kill_resume.{json,md}. Run it alone: the delays are seeded, but which phase
each kill lands in moves with the machine's load (say so with --note when it could not run alone).
Exits 1 if a trial found a broken promise or no trial killed the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from common import machine_info, machine_line, write_results  # noqa: E402
from kill_resume_trials import (  # noqa: E402
    PHASES,
    SLOW_SEED,
    SLOW_TRIALS,
    TrialError,
    Trials,
    command_line,
    run_trials,
    table,
)
from tiny_models import build_tiny_model, build_tiny_tokenizer, write_tiny_text  # noqa: E402


def summary(trials: Trials) -> dict:
    outcomes = trials.outcomes
    return {"trials": len(outcomes), "killed": trials.killed(),
            "aimed": {p: sum(o.aimed == p for o in outcomes) for p in PHASES},
            "all_reruns_identical": all(o.rerun_identical for o in outcomes),
            "out_after_kill": trials.out_after_kill(),
            "resumed_from_blocks": sum(o.rerun_resumed for o in outcomes), "problems": trials.problems()}


def payload_of(trials: Trials, machine: dict, load_before: tuple[float, ...], seconds: float, notes: list[str]) -> dict:
    t = trials.timeline
    return {"machine": machine, "command": command_line(), "seed": trials.seed,
            "timeline": {"starts": t.starts, "published": t.published, "exit": t.exit},
            "outcomes": [dataclasses.asdict(o) for o in trials.outcomes], "table": table(trials),
            "summary": summary(trials), "load_average_before": list(load_before), "wall_s": round(seconds, 1),
            "notes": notes}


def markdown(payload: dict) -> str:
    s = payload["summary"]
    yes = {True: "yes", False: "no"}
    lines = [
        "# Kill and resume: SIGKILLed `tightfit compress` runs rerun to the same bytes", "",
        machine_line(payload["machine"], 1) + " Load average before the run: "
        + ", ".join(f"{x:.2f}" for x in payload["load_average_before"]) + ".", "",
        f"{s['trials']} trials, seed {payload['seed']} (aimed at " + ", ".join(f"{p} {n}" for p, n in s["aimed"].items())
        + f"), in {payload['wall_s'] / 60:.1f} min. Each starts `{payload['command']}` (MODEL a tiny random llama, "
        "TEXT the tiny test corpus), SIGKILLs it at a seeded random moment of its aimed phase, checks what is left at "
        "OUT, runs it again to the end and compares every byte of every file of the packed folder with an "
        "uninterrupted run's. Every other trial starts with the packed folder of an earlier run at OUT. "
        "Trials and checks: tests/kill_resume_trials.py, shared with tests/test_kill_resume.py.", "",
        "```", payload["table"], "```", "",
        "## Summary", "",
        f"- Trials: {s['trials']}; the kill landed before the process finished in {s['killed']}.",
        f"- All reruns byte-identical to the uninterrupted run: {yes[s['all_reruns_identical']]}.",
        "- OUT after a kill: " + ", ".join(f"{state} {n}" for state, n in s["out_after_kill"].items())
        + " (partial: neither the previous folder whole nor the new one whole).",
        f"- Reruns that resumed from finished blocks: {s['resumed_from_blocks']}.",
        "- Broken promises: " + ("none." if not s["problems"] else ""),
    ]
    lines += [f"  - {p}" for p in s["problems"]]
    if payload.get("notes"):
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=SLOW_TRIALS, help=f"kill-and-rerun trials (default {SLOW_TRIALS})")
    p.add_argument("--seed", type=int, default=SLOW_SEED, help=f"seed of the kill delays (default {SLOW_SEED})")
    p.add_argument("--work", type=Path, default=None, help="folder for the model and the trials (default: a temporary "
                   "one, removed after a clean run)")
    p.add_argument("--note", action="append", default=[], help="a caveat printed under the summary and stored in the "
                   "JSON (e.g. that the machine was shared during the run); repeatable")
    p.add_argument("--no-write", action="store_true", help="print the report, do not write bench/results")
    a = p.parse_args(argv)
    if a.trials < 1:
        p.error("--trials must be at least 1")
    work = a.work or Path(tempfile.mkdtemp(prefix="tightfit-kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        p.error(f"--work {work} is not empty")
    load_before = os.getloadavg()
    started = time.monotonic()
    model = build_tiny_model("llama", build_tiny_tokenizer(), work / "llama")
    text = write_tiny_text(work / "corpus.txt")
    (work / "trials").mkdir()
    try:
        trials = run_trials(a.trials, a.seed, model, text, work / "trials",
                            progress=lambda o: print(f"trial {o.trial}: killed in {o.killed_in}", file=sys.stderr, flush=True))
    except TrialError as e:
        print(f"kill_resume.py: error: {str(e).splitlines()[0]} (logs kept in {work})", file=sys.stderr)
        return 1
    payload = payload_of(trials, machine_info(), load_before, time.monotonic() - started, a.note)
    md = markdown(payload)
    print(md)
    if not a.no_write:
        print("written:", *write_results("kill_resume", payload, md))
    ok = not payload["summary"]["problems"] and trials.killed() > 0
    if not ok:
        print(f"kill_resume.py: trials kept in {work}", file=sys.stderr)
    elif a.work is None:
        shutil.rmtree(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

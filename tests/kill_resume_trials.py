"""SIGKILL a real `tightfit compress` at seeded random moments (loading, calibration, the quantized
blocks, packing) and run it again: is the packed folder byte-identical to an uninterrupted run's?

The one copy of the trials that tests/test_kill_resume.py asserts on and bench/kill_resume.py
writes up. Each trial records what it found (`Outcome`); `Outcome.problems` names every broken
promise: after a kill the output folder is absent, or the previous one, or the complete new one,
never a partial one (and never absent where a previous one stood); the rerun writes the reference
bytes; nothing is left beside the output folder (no work folder, no temp folders). Nothing in the
packed folder legitimately differs between runs (the manifest holds no timings), so every byte of
every file is compared. A run that should finish and does not, or a plain rerun that writes other
bytes, raises TrialError: no trial could mean anything then.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tightfit

REPO = Path(tightfit.__file__).resolve().parents[1]
PHASES = ("blocks", "pack", "load", "calibration")  # trial i is aimed at PHASES[i % 4]
# The first stderr line of each phase after "load" (which starts with the process).
MARKERS = {"calibration": "tightfit: calibration text", "blocks": "quantize gptq", "pack": "tightfit: packing to"}
OUT_STATES = ("absent", "previous", "new", "partial")  # what a kill left at --out
POLL_S = 0.005
TIMEOUT_S = 240
FAST_TRIALS, FAST_SEED = 3, 0  # the default test
SLOW_TRIALS, SLOW_SEED = 24, 1  # `-m slow` and bench/kill_resume.py: 6 kills per phase


class TrialError(Exception):
    """A run that should have finished did not, or compress is not deterministic even unkilled."""


def _command(model: Path, text: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tightfit.cli", "--threads", "1", "compress", str(model), "--format", "w4g64",
            "--calib-text", str(text), "--calib-samples", "4", "--calib-len", "32", "--no-eval", "--out", str(out)]


def command_line() -> str:
    """The compress command every trial runs, as a person would type it (MODEL, TEXT, OUT for the paths)."""
    return "tightfit " + " ".join(_command(Path("MODEL"), Path("TEXT"), Path("OUT"))[3:])


def _start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as f:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=f, env=env, cwd=log.parent)


def _phase_seen(log: Path) -> str:
    """The phase the process has reached, by the markers it printed."""
    text = log.read_text(errors="replace")
    return next((p for p in ("pack", "blocks", "calibration") if MARKERS[p] in text), "load")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(command: list[str], log: Path) -> None:
    proc = _start(command, log)
    if proc.wait(timeout=TIMEOUT_S) != 0:
        raise TrialError(f"compress exited {proc.returncode}: {log.read_text(errors='replace')}")


@dataclass(frozen=True)
class Timeline:
    """Seconds from the start of an uninterrupted run to each phase's first marker, to the moment
    its packed folder appeared (the end of "pack"), and to its exit."""

    starts: dict[str, float]
    published: float
    exit: float

    def window(self, phase: str) -> tuple[float, float]:
        order = ["load", "calibration", "blocks", "pack"]
        ends = [self.starts[p] for p in order[1:]] + [self.published]
        return self.starts[phase], ends[order.index(phase)]


def _reference_run(command: list[str], log: Path, out: Path) -> Timeline:
    proc = _start(command, log)
    t0, starts, published = time.monotonic(), {"load": 0.0}, None
    while proc.poll() is None:
        text = log.read_text(errors="replace")
        for phase, marker in MARKERS.items():
            if phase not in starts and marker in text:
                starts[phase] = time.monotonic() - t0
        if published is None and out.exists():
            published = time.monotonic() - t0
        time.sleep(POLL_S)
    if proc.returncode != 0:
        raise TrialError(f"the uninterrupted compress exited {proc.returncode}: {log.read_text(errors='replace')}")
    exit_s = time.monotonic() - t0
    if set(starts) != {"load", *MARKERS}:
        raise TrialError(f"markers missing from the run's output: {log.read_text()}")
    return Timeline(starts=starts, published=exit_s if published is None else published, exit=exit_s)


@dataclass(frozen=True)
class Outcome:
    trial: int
    aimed: str
    delay_s: float
    killed_in: str  # the phase reached when the kill landed ("exited" if it finished first)
    blocks_saved: int
    replaced_previous: bool  # a packed folder of an earlier run stood at --out when the trial started
    out_after_kill: str  # one of OUT_STATES
    rerun_identical: bool  # every byte of every file of the rerun's packed folder is the reference's
    rerun_resumed: bool
    debris: tuple[str, ...]  # what the rerun left beside --out besides the two logs

    def problems(self) -> list[str]:
        """Each promise this trial found broken, in a sentence; empty when it kept them all."""
        found = []
        if self.out_after_kill == "absent" and self.replaced_previous:
            found.append(f"trial {self.trial}: a kill while replacing an existing packed folder left none")
        if self.out_after_kill == "partial":
            found.append(f"trial {self.trial}: a kill in {self.killed_in} left a partial packed folder")
        if not self.rerun_identical:
            found.append(f"trial {self.trial}: the rerun after a kill in {self.killed_in} wrote other bytes")
        if self.debris:
            found.append(f"trial {self.trial}: debris beside --out: {', '.join(self.debris)}")
        return found


def _after_kill(out: Path, reference: dict[str, bytes]) -> str:
    """What a kill left at --out (OUT_STATES)."""
    if not out.exists():
        return "absent"
    if (out / "previous.txt").exists():
        whole = _files(out) == {**reference, "previous.txt": (out / "previous.txt").read_bytes()}
        return "previous" if whole else "partial"
    return "new" if _files(out) == reference else "partial"


def _kill_and_rerun(i: int, seed: int, timeline: Timeline, model: Path, text: Path, root: Path,
                    reference: dict[str, bytes]) -> Outcome:
    """Trial i: start compress, SIGKILL it at a random moment of its aimed phase, check what is on
    disk, run it again to the end and compare every byte with the reference."""
    rng = random.Random(seed * 1000 + i)
    aimed = PHASES[i % len(PHASES)]
    start, end = timeline.window(aimed)
    delay = rng.uniform(0, end - start)
    folder = root / f"trial{i:02d}"
    folder.mkdir()
    out = folder / "out"
    previous = (i + i // len(PHASES)) % 2 == 1  # every other trial replaces an existing packed folder, each phase both ways
    if previous:
        out.mkdir()
        for name, data in reference.items():
            (out / name).write_bytes(data)
        (out / "previous.txt").write_text("the packed model of an earlier run")
    command = _command(model, text, out)
    proc = _start(command, folder / "killed.log")
    t0 = time.monotonic()
    while aimed != "load" and MARKERS[aimed] not in (folder / "killed.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - t0 > TIMEOUT_S:
            break
        time.sleep(POLL_S)
    time.sleep(delay)
    killed_in = _phase_seen(folder / "killed.log")
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=TIMEOUT_S)
    if rc != -signal.SIGKILL:
        if rc != 0:
            raise TrialError(f"trial {i}: compress exited {rc}: {(folder / 'killed.log').read_text(errors='replace')}")
        killed_in = "exited"
    blocks = len(list((folder / ".out.work" / "quantize").glob("block_*.json")))
    state = _after_kill(out, reference)

    _run(command, folder / "rerun.log")
    debris = tuple(sorted(p.name for p in folder.iterdir() if p.name not in ("killed.log", "out", "rerun.log")))
    resumed = "resuming from finished blocks" in (folder / "rerun.log").read_text(errors="replace")
    return Outcome(i, aimed, delay, killed_in, blocks, previous, state, out.is_dir() and _files(out) == reference,
                   resumed, debris)


@dataclass(frozen=True)
class Trials:
    """An uninterrupted reference run's timeline and every trial's outcome."""

    seed: int
    timeline: Timeline
    outcomes: list[Outcome]

    def problems(self) -> list[str]:
        return [p for o in self.outcomes for p in o.problems()]

    def killed(self) -> int:
        """Trials whose kill landed before the process finished (the others tested a plain rerun only)."""
        return sum(o.killed_in != "exited" for o in self.outcomes)

    def out_after_kill(self) -> dict[str, int]:
        counts = collections.Counter(o.out_after_kill for o in self.outcomes)
        return {state: counts[state] for state in OUT_STATES}


def run_trials(n: int, seed: int, model: Path, text: Path, root: Path,
               progress: Callable[[Outcome], None] | None = None) -> Trials:
    """An uninterrupted reference run of compressing `model` (calibrated on `text`), a plain rerun
    that must write the same bytes, then n kill-and-rerun trials, each in root/trialNN."""
    reference_out = root / "reference" / "out"
    reference_out.parent.mkdir()
    command = _command(model, text, reference_out)
    timeline = _reference_run(command, reference_out.parent / "run.log", reference_out)
    reference = _files(reference_out)
    if not {"manifest.json", "model.safetensors", "config.json", "tokenizer.json"} <= reference.keys():
        raise TrialError(f"the packed folder lacks files: it holds {sorted(reference)}")
    _run(command, reference_out.parent / "rerun.log")  # a plain rerun, replacing the folder: the same bytes
    if _files(reference_out) != reference:
        raise TrialError("compress is not deterministic: a plain rerun wrote other bytes")

    outcomes = []
    for i in range(n):
        outcomes.append(_kill_and_rerun(i, seed, timeline, model, text, root, reference))
        if progress:
            progress(outcomes[-1])
    return Trials(seed, timeline, outcomes)


def table(trials: Trials) -> str:
    """The trials as the test prints them: the reference's phases, then one line per trial."""
    outcomes, timeline = trials.outcomes, trials.timeline
    identical = sum(o.rerun_identical for o in outcomes)
    said = "every rerun" if identical == len(outcomes) else f"{identical} of {len(outcomes)} reruns"
    lines = [f"kill and resume: {len(outcomes)} trials, {said} byte-identical to the uninterrupted run "
             f"(its phases start at " + ", ".join(f"{p} {s:.2f}s" for p, s in timeline.starts.items())
             + f"; published {timeline.published:.2f}s, exit {timeline.exit:.2f}s)",
             f"{'trial':>5} {'aimed at':<12} {'delay s':>7} {'killed in':<12} {'blocks saved':>12} {'--out after kill':<16} resumed"]
    for o in outcomes:
        lines.append(f"{o.trial:>5} {o.aimed:<12} {o.delay_s:>7.3f} {o.killed_in:<12} {o.blocks_saved:>12} "
                     f"{o.out_after_kill:<16} {'yes' if o.rerun_resumed else 'no'}")
    return "\n".join(lines)

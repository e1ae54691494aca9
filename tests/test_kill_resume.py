"""SIGKILL a real `tightfit compress` at seeded random moments (loading, calibration, the quantized
blocks, packing) and run it again: the packed folder is byte-identical to an uninterrupted run.

After each kill the output folder is absent, or the previous one, or the complete new one: never
a partial one. After each rerun nothing is left beside it (no work folder, no temp folders).
Nothing in the packed folder legitimately differs between runs (the manifest holds no timings), so
every byte of every file is compared.

Default run: a plain rerun (the determinism this needs) and 3 kills; `-m slow`: 24 kills, 6 per
phase. Each trial's kill point and outcome is printed as a table.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import tightfit

REPO = Path(tightfit.__file__).resolve().parents[1]
PHASES = ("blocks", "pack", "load", "calibration")  # trial i is aimed at PHASES[i % 4]
# The first stderr line of each phase after "load" (which starts with the process).
MARKERS = {"calibration": "tightfit: calibration text", "blocks": "quantize gptq", "pack": "tightfit: packing to"}
POLL_S = 0.005
TIMEOUT_S = 240


def _command(model: Path, text: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tightfit.cli", "--threads", "1", "compress", str(model), "--format", "w4g64",
            "--calib-text", str(text), "--calib-samples", "4", "--calib-len", "32", "--no-eval", "--out", str(out)]


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
    assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text(errors="replace")


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
    assert proc.returncode == 0, log.read_text(errors="replace")
    exit_s = time.monotonic() - t0
    assert set(starts) == {"load", *MARKERS}, f"markers missing from the run's output: {log.read_text()}"
    return Timeline(starts=starts, published=exit_s if published is None else published, exit=exit_s)


@dataclass
class Outcome:
    trial: int
    aimed: str
    delay_s: float
    killed_in: str  # the phase reached when the kill landed ("exited" if it finished first)
    blocks_saved: int
    out_after_kill: str  # absent / previous / new
    rerun_resumed: bool


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
        assert rc == 0, (folder / "killed.log").read_text(errors="replace")
        killed_in = "exited"
    blocks = len(list((folder / ".out.work" / "quantize").glob("block_*.json")))

    if not out.exists():
        state = "absent"
        assert not previous, "a kill while replacing an existing packed folder left none"
    elif (out / "previous.txt").exists():
        state = "previous"
        assert _files(out) == {**reference, "previous.txt": (out / "previous.txt").read_bytes()}
    else:
        state = "new"
        assert _files(out) == reference, "a kill left a partial packed folder"

    _run(command, folder / "rerun.log")
    assert _files(out) == reference, f"trial {i}: the rerun after a kill in {killed_in} wrote other bytes"
    assert sorted(p.name for p in folder.iterdir()) == ["killed.log", "out", "rerun.log"], "debris beside --out"
    resumed = "resuming from finished blocks" in (folder / "rerun.log").read_text(errors="replace")
    return Outcome(i, aimed, delay, killed_in, blocks, state, resumed)


def _table(outcomes: list[Outcome], timeline: Timeline) -> str:
    lines = [f"kill and resume: {len(outcomes)} trials, every rerun byte-identical to the uninterrupted run "
             f"(its phases start at " + ", ".join(f"{p} {s:.2f}s" for p, s in timeline.starts.items())
             + f"; published {timeline.published:.2f}s, exit {timeline.exit:.2f}s)",
             f"{'trial':>5} {'aimed at':<12} {'delay s':>7} {'killed in':<12} {'blocks saved':>12} {'--out after kill':<16} resumed"]
    for o in outcomes:
        lines.append(f"{o.trial:>5} {o.aimed:<12} {o.delay_s:>7.3f} {o.killed_in:<12} {o.blocks_saved:>12} "
                     f"{o.out_after_kill:<16} {'yes' if o.rerun_resumed else 'no'}")
    return "\n".join(lines)


def _trials(n: int, seed: int, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path, capsys) -> list[Outcome]:
    reference_out = tmp_path / "reference" / "out"
    reference_out.parent.mkdir()
    command = _command(tiny_model_dir, tiny_text_file, reference_out)
    timeline = _reference_run(command, reference_out.parent / "run.log", reference_out)
    reference = _files(reference_out)
    assert {"manifest.json", "model.safetensors", "config.json", "tokenizer.json"} <= reference.keys()
    _run(command, reference_out.parent / "rerun.log")  # a plain rerun, replacing the folder: the same bytes
    assert _files(reference_out) == reference, "compress is not deterministic: a plain rerun wrote other bytes"

    outcomes = [_kill_and_rerun(i, seed, timeline, tiny_model_dir, tiny_text_file, tmp_path, reference) for i in range(n)]
    with capsys.disabled():
        print("\n" + _table(outcomes, timeline))
    assert any(o.killed_in != "exited" for o in outcomes), "no trial killed the process: the test tested nothing"
    return outcomes


def test_killed_compress_reruns_to_the_same_bytes(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    _trials(3, 0, tiny_model_dir, tiny_text_file, tmp_path, capsys)


@pytest.mark.slow
def test_killed_compress_reruns_to_the_same_bytes_24_trials(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    outcomes = _trials(24, 1, tiny_model_dir, tiny_text_file, tmp_path, capsys)
    killed = {o.killed_in for o in outcomes}
    assert {"load", "calibration", "blocks"} <= killed, f"kills landed only in {sorted(killed)}"
    assert any(o.blocks_saved and o.rerun_resumed for o in outcomes), "no rerun resumed from a finished block"

"""Decode speed beside a busy neighbour (issue 15, item 6): the engine's own threads and barrier
(spin, yield, then sleep; decode on one thread where that is measured to be faster: Pace in
runtime/kernels/threads.h) against OpenMP's parallel region and barrier (the build with
TF_BARRIER=0, the engine before), at 1 and 2 threads, on a quiet machine and with a CPU-bound
neighbour process.

The neighbour is a Python busy loop this script starts itself (one core's worth of work, never
longer than --neighbour-seconds) and kills when the runs that want it are done, by its pid, in a
`finally`. Every (build, threads, condition) case is timed round-robin in one process
(`time_round_robin`; a warm-up round first): in each round the quiet cases run, then the neighbour
starts and the contended ones run, so drifts of the machine hit every case alike. Decode tok/s are
medians over the rounds; builds come from `build.load(defines=...)` as in bench/kernel_ab.py.

Targets: with the neighbour, 2 threads decode at >= 80 % of 1 thread (both with the neighbour, the
new barrier); on the quiet machine the new barrier's 2-thread decode within 5 % of the old one's.

    .venv/bin/python bench/neighbour.py [--packed DIR] [--rounds 7] [--new-tokens 64]
Default model: smollm2-135m, w4g32-sym with a w8g32-sym embedding/head (bench/speed.py's file, built
once into .cache/). Run it alone (a few minutes): any other process is a second neighbour. Results:
bench/results/neighbour.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from common import machine_info, machine_line, write_results  # noqa: E402
from kernel_ab import backend_on, defines  # noqa: E402

from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.model import DEFAULT_MODEL  # noqa: E402
from tightfit.runtime.kernels import build  # noqa: E402
from tightfit.runtime.speed import random_prompt, time_round_robin  # noqa: E402

BUILDS = {"TF_BARRIER=0": "OpenMP region and barrier (old)", "": "own threads and barrier (new)"}  # variant macros -> label
OLD, NEW = "TF_BARRIER=0", ""
TARGET_CONTENDED = 0.80  # 2 threads with the neighbour / 1 thread with the neighbour, new barrier
TARGET_QUIET = 0.95      # new / old barrier, 2 threads, quiet machine
# the neighbour: busy until its deadline, or until its parent (this script) is gone, killed or not
SPINNER = ("import os, time\nparent, end = os.getppid(), time.monotonic() + {seconds}\n"
           "while time.monotonic() < end and os.getppid() == parent:\n    pass\n")


@dataclass(frozen=True)
class Case:
    """One timed configuration: a kernel build (its macros), engine threads, neighbour or not."""

    build: str
    threads: int
    neighbour: bool


class Neighbour:
    """A CPU-bound process beside the engine: a Python busy loop that ends by itself after `seconds`
    at the latest, or when this process is gone; `want(True)` starts it (if not running),
    `want(False)` kills it. Only the process this object started is ever killed, by its pid."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None

    def want(self, running: bool) -> None:
        if running and self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", SPINNER.format(seconds=self.seconds)])
            time.sleep(0.2)  # past the interpreter's start-up: busy from here on
        elif not running:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def default_packed() -> Path:
    """bench/speed.py's smollm2-135m w4g32-sym file (w8g32-sym embedding/head), built once into .cache/."""
    setup = speed.SpeedSetup(tightfit=speed.with_head("w8g32-sym", "w4g32-sym"), llama_types=(), shipped_type="",
                             pairs=(), transformers=False)
    return speed.tightfit_models(DEFAULT_MODEL, setup)["w4g32-sym"]


def run(packed_dir: Path, builds: list[str], rounds: int, prompt_tokens: int, new_tokens: int,
        neighbour_seconds: float) -> dict:
    packed = load_packed(packed_dir)
    libs = {b: build.load(defines=defines(b)) for b in builds}
    load_before = os.getloadavg()[0]  # other processes already running: a second neighbour
    cases = [Case(b, t, n) for n in (False, True) for b in builds for t in (1, 2)]  # quiet cases first in a round
    backends = {c: backend_on(libs[c.build], packed, max_positions=prompt_tokens + new_tokens, threads=c.threads)
                for c in cases}
    prompt = random_prompt(backends[cases[0]].vocab_size, prompt_tokens)
    neighbour = Neighbour(neighbour_seconds)
    try:
        runs = time_round_robin(backends, prompt, new_tokens, rounds - 1, before_run=lambda c: neighbour.want(c.neighbour),
                                on_round=lambda r: (neighbour.stop(), print(f"round {r} of {rounds - 1} done", flush=True)))
    finally:
        neighbour.stop()
    rows = [{**asdict(c), "label": BUILDS.get(c.build, c.build or "default"), "decode_tok_s": statistics.median(r.decode_tok_s),
             "decode_runs": list(r.decode_tok_s)} for c, r in runs.items()]
    return {"packed": str(packed_dir), "load_average_before": load_before, "builds": builds, "rounds": rounds, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
            "rows": rows, "targets": targets(rows) if OLD in builds and NEW in builds else {}}


def tok_s(rows: list[dict], build_: str, threads: int, neighbour: bool) -> float:
    return next(r["decode_tok_s"] for r in rows if (r["build"], r["threads"], r["neighbour"]) == (build_, threads, neighbour))


def targets(rows: list[dict]) -> dict:
    """The issue's two targets (new barrier), with the 1-thread quiet reference beside the one the first uses."""
    two = tok_s(rows, NEW, 2, True)
    contended = two / tok_s(rows, NEW, 1, True)
    quiet = tok_s(rows, NEW, 2, False) / tok_s(rows, OLD, 2, False)
    return {"contended_2t_over_1t": contended, "contended_2t_over_1t_quiet": two / tok_s(rows, NEW, 1, False),
            "contended_met": contended >= TARGET_CONTENDED, "quiet_new_over_old": quiet, "quiet_met": quiet >= TARGET_QUIET,
            "old_contended_2t_over_1t": tok_s(rows, OLD, 2, True) / tok_s(rows, OLD, 1, True)}


def markdown(result: dict, machine: dict) -> str:
    lines = [f"# Decode beside a busy neighbour ({Path(result['packed']).name})", "",
             machine_line(machine, "1 and 2"), "",
             f"Prompt {result['prompt_tokens']} tokens, then {result['new_tokens']} decoded; medians of "
             f"{result['rounds'] - 1} round-robin rounds after a warm-up. Neighbour: one Python busy loop started by "
             f"the script for the contended runs. Load average (1 min) before the runs: {result['load_average_before']:.1f} "
             f"(near 0 on a machine left to this script; several: the 'quiet' runs shared it with other busy processes). "
             f"OpenMP environment: {result['omp_env'] or 'none set'}. The new build's "
             "2-thread engine runs a decode step on one thread where that has been faster lately (Pace, "
             "runtime/kernels/threads.h).", "",
             "| barrier | threads | quiet tok/s | with neighbour tok/s | runs with neighbour |", "|---|---:|---:|---:|---|"]
    for b in result["builds"]:
        for t in (1, 2):
            quiet = next(r for r in result["rows"] if (r["build"], r["threads"], r["neighbour"]) == (b, t, False))
            busy = next(r for r in result["rows"] if (r["build"], r["threads"], r["neighbour"]) == (b, t, True))
            lines.append(f"| {quiet['label']} | {t} | {quiet['decode_tok_s']:.1f} | {busy['decode_tok_s']:.1f} | "
                         f"{', '.join(f'{x:.0f}' for x in busy['decode_runs'])} |")
    tg = result["targets"]
    if tg:
        lines += ["", f"- With the neighbour, new barrier: 2 threads at {tg['contended_2t_over_1t']:.0%} of 1 thread with "
                  f"the neighbour (the target's reference; {tg['contended_2t_over_1t_quiet']:.0%} of 1 thread quiet); "
                  f"target >= {TARGET_CONTENDED:.0%}: {'met' if tg['contended_met'] else 'NOT met'}. The old barrier: "
                  f"{tg['old_contended_2t_over_1t']:.0%}.",
                  f"- Quiet machine, 2 threads: new barrier at {tg['quiet_new_over_old']:.1%} of the old one; target >= "
                  f"{TARGET_QUIET:.0%}: {'met' if tg['quiet_met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", type=Path, help="packed model directory (default: smollm2-135m w4g32-sym, built once)")
    ap.add_argument("--builds", nargs="+", default=list(BUILDS), metavar="VARIANT",
                    help='kernel builds as `+`-joined NAME=VALUE macros ("" the default build); default: old and new barrier')
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds; the first warms up")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--neighbour-seconds", type=float, default=300, help="the neighbour's longest life (it is killed sooner)")
    ap.add_argument("--no-write", action="store_true", help="print only (trial runs)")
    args = ap.parse_args()
    result = run(args.packed or default_packed(), args.builds, args.rounds, args.prompt, args.new_tokens,
                 args.neighbour_seconds)
    machine = machine_info()
    text = markdown(result, machine)
    print(text)
    if not args.no_write:
        for path in write_results("neighbour", {"machine": machine, **result}, text):
            print("wrote", path)


if __name__ == "__main__":
    main()

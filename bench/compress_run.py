"""One `tightfit compress` run measured from outside: wall time per stage, peak RSS, result (issue 11).

The command runs in a child process exactly as a user types it (`--json` added); its peak RSS is
the OS's counter for that child (wait4's ru_maxrss, which includes every page the child touched,
file-backed ones too). With --memory-limit the child runs in its own cgroup (v1 memory controller,
root only) capped at that many GB: a run below the model's fp32 size shows that a big model is
compressed one block at a time. The stage times and the evaluation come from the report the CLI
writes. Results go to bench/results/compress_<name>.{json,md}.

    .venv/bin/python bench/compress_run.py --name qwen15-w4g128 -- qwen2.5-coder-1.5b --format w4g128 \
        --calib-dtype bf16 --windows 16 --out out/qwen15-w4g128
Run it alone: on 2 cores any other process slows it. When it could not run alone, say so with
`--note TEXT` (repeatable): the notes are stored in the JSON and printed under the table.
`--report-only --name NAME [--note TEXT ...]` runs nothing: it re-renders compress_NAME.md from
compress_NAME.json, with the notes given (they replace the stored ones; none given keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")


def _limited(limit_gb: float) -> tuple[Path, callable]:
    """A fresh memory cgroup capped at limit_gb (swap included when the kernel accounts it), and
    the preexec function that moves the child into it."""
    if not (CGROUP / "cgroup.procs").exists() or not os.access(CGROUP, os.W_OK):
        raise SystemExit(f"compress_run.py: --memory-limit needs a writable cgroup v1 memory controller at {CGROUP}")
    group = CGROUP / f"tightfit-bench-{os.getpid()}"
    group.mkdir()
    limit = str(int(limit_gb * 1e9))
    (group / "memory.limit_in_bytes").write_text(limit)
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(limit)
    return group, lambda: (group / "cgroup.procs").write_text(str(os.getpid()))


def run(args: list[str], limit_gb: float | None) -> dict:
    """The compress command in a child: its report, wall seconds, peak RSS, exit status."""
    report = Path(tempfile.mkdtemp()) / "report.json"
    command = [sys.executable, "-m", "tightfit.cli", "compress", *args, "--json", str(report)]
    group, preexec = _limited(limit_gb) if limit_gb else (None, None)
    start = time.perf_counter()
    child = subprocess.Popen(command, preexec_fn=preexec)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    failcnt = None
    if group is not None:
        failcnt = int((group / "memory.failcnt").read_text())
        group.rmdir()
    return {
        "command": "tightfit compress " + " ".join(args), "exit_status": os.waitstatus_to_exitcode(status),
        "wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "memory_limit_gb": limit_gb,
        "limit_hits": failcnt, "report": json.loads(report.read_text()) if report.is_file() else None,
    }


def fp16_bytes(model: str) -> int:
    """The model's parameters in fp16, read from its files' headers (no weight is loaded)."""
    from tightfit.model import open_weights

    return open_weights(model).nbytes() // 2


def markdown(name: str, payload: dict) -> str:
    """The run's table and caveats, from its results JSON (what `main` writes) alone."""
    r = payload["report"] or {}
    ev, seconds = r.get("evaluation") or {}, r.get("seconds") or {}
    fp16 = payload["fp16_bytes"]
    lines = [f"# compress run: {name}", "", machine_line(payload["machine"]), "",
             f"Command: `{payload['command']}`", "",
             "| wall min | peak RSS GB | fp16 GB | RSS / fp16 | memory limit GB | exit | "
             + " | ".join(f"{k} s" for k in seconds) + " | bpw | KL | top-1 | PPL |",
             "|---" * (10 + len(seconds)) + "|"]
    summary = r.get("summary") or {}
    limit = payload["memory_limit_gb"]
    cells = [f"{payload['wall_seconds'] / 60:.1f}", f"{payload['peak_rss_bytes'] / 1e9:.2f}", f"{fp16 / 1e9:.2f}",
             f"{payload['peak_rss_bytes'] / fp16:.2f}", "-" if not limit else f"{limit:g}",
             str(payload["exit_status"]), *(f"{v:.0f}" for v in seconds.values()),
             *(f"{d[k]:.{n}f}" if k in d else "-" for d, k, n in
               ((summary, "bits_per_weight", 3), (ev, "kl", 4), (ev, "top1", 3), (ev, "ppl", 3)))]  # "-": not evaluated
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS is the child's ru_maxrss (every page it touched, the model file's included)."]
    if limit:
        lines.append(f"The child ran in a cgroup capped at {limit:g} GB; the kernel refused "
                     f"{payload['limit_hits']} allocations over it (page cache it reclaimed instead).")
    if payload["grid_caveat"]:
        lines.append(payload["grid_caveat"])
    if payload.get("notes"):
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def report_only(name: str, notes: list[str]) -> tuple[Path, Path]:
    """Re-render compress_NAME.md from compress_NAME.json; notes given replace the stored ones."""
    import common

    return common.rewrite_results(f"compress_{name}", notes, lambda payload: markdown(name, payload), "compress_run.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file name: bench/results/compress_NAME.{json,md}")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB", help="run the child in a cgroup capped at GB")
    p.add_argument("--note", action="append", default=[], help="a caveat printed under the table and stored in the "
                   "JSON (e.g. that the machine was shared during the run, so the seconds are high); repeatable")
    p.add_argument("--report-only", action="store_true", help="run nothing: re-render compress_NAME.md from its JSON, "
                   "with the --note given (they replace the stored notes; none given keeps them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of `tightfit compress`")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.report_only:
        if args or a.memory_limit is not None:
            p.error("--report-only runs nothing: give no compress arguments and no --memory-limit")
        paths = report_only(a.name, a.note)
        print(paths[1].read_text())
        print("written:", *paths)
        return 0
    if not args:
        p.error("give the compress arguments after --")
    from tightfit.model import BUILTIN_MODELS

    model = args[0]
    caveat = next((b.grid_caveat for b in BUILTIN_MODELS if b.name == model), "")
    result = run(args, a.memory_limit)
    payload = {"machine": machine_info(), "fp16_bytes": fp16_bytes(model), "grid_caveat": caveat, **result,
               "notes": a.note}
    md = markdown(a.name, payload)
    paths = write_results(f"compress_{a.name}", payload, md)
    print(md)
    print("written:", *paths)
    return 0 if result["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

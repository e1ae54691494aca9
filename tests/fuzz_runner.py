"""Runs `tightfit` commands on hostile inputs (tests/fuzz_inputs.py) in a subprocess and judges how each ended.

The contract every case must keep: exit 0, or exit 2 with one `tightfit: error: ...` line last on
stderr (the lines before it only `tightfit: ...` stage messages and progress bars); never a Python
traceback, never a signal, never past the deadline; after an error nothing on stdout and no output
folder (a compress keeps only its work folder of finished blocks, `.OUT.work/`, for a resume).

A fresh `python -m tightfit.cli` costs about 4 s of imports per case, so cases run in a worker
process instead: it calls `tightfit.cli.main` for one case after another exactly as
`python -m tightfit.cli` does (`sys.exit(main())`), with the case's own files as its stdout and
stderr (file descriptors 1 and 2, so native code writes there too) and an exception escaping
main() printed as Python prints it (exit code 1). A signal still kills the worker, and a hang
still passes the deadline: the parent records that outcome for the case and starts a new worker.
`run_fresh` runs one case as its own `python -m tightfit.cli` process, to check the worker agrees.

Usage of this file as a script: `python tests/fuzz_runner.py --worker` (the worker; jobs on stdin).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from fuzz_inputs import Case

REPO = Path(__file__).resolve().parents[1]
FAILURES = ("traceback", "signal", "timeout", "partial_output", "bad_error")  # outcomes that break the contract
OUTCOMES = ("ok", "error", *FAILURES)
PROGRESS_BAR = re.compile(r"^[^:]+: +\d+%\|")  # tqdm's, e.g. "quantize rtn w4g32:  50%|█████     | 1/2 [...]"


@dataclass(frozen=True)
class Result:
    outcome: str  # one of OUTCOMES
    rc: int | None  # exit code, negative for a signal, None past the deadline
    line: str  # the error line, or what broke the contract


def environment(threads: int = 1) -> dict[str, str]:
    """The environment of every command: this checkout first on the path, `threads` CPU threads."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}


def judge(rc: int | None, stdout: str, stderr: str, out: Path | None) -> Result:
    """How a command ended, against the contract in the module docstring."""
    if rc is None:
        return Result("timeout", rc, "still running at the deadline")
    if rc < 0:
        return Result("signal", rc, f"killed by signal {-rc}")
    if "Traceback (most recent call last)" in stderr:
        return Result("traceback", rc, stderr.strip().splitlines()[-1])
    if rc == 0:
        return Result("ok", rc, "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tightfit: error: ")]
    stage = [line for line in lines if line.startswith("tightfit: ") or PROGRESS_BAR.match(line)]
    if rc != 2 or len(errors) != 1 or lines[-1] != errors[0] or len(stage) != len(lines):
        return Result("bad_error", rc, f"exit {rc}, stderr {lines[-3:]}")
    if stdout.strip():
        return Result("partial_output", rc, f"stdout after an error: {stdout.strip()[:200]!r}")
    if out is not None:  # the work folder of finished blocks is kept on purpose, for a resume
        left = [p.name for p in out.parent.iterdir()
                if p.name == out.name or p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.work"]
        if left:
            return Result("partial_output", rc, f"a failed compress left {left}")
    return Result("error", rc, errors[0].removeprefix("tightfit: error: "))


class Worker:
    """A worker subprocess (see module docstring), started on first use and after each one that died."""

    def __init__(self, timeout: float, cwd: Path, threads: int = 1) -> None:
        self.timeout = timeout
        self.cwd = cwd  # a folder that outlives the cases (their own folders are removed)
        self.threads = threads
        self._proc: subprocess.Popen | None = None
        self._buffer = b""

    def run(self, argv: tuple[str, ...], stdout: Path, stderr: Path) -> int | None:
        """Exit code of `tightfit *argv` (negative: killed by that signal; None: past the deadline)."""
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment(self.threads),
                                          cwd=self.cwd)
            self._buffer = b""
        job = {"argv": list(argv), "stdout": str(stdout), "stderr": str(stderr)}
        try:
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + self.timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return self._died()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return int(json.loads(line)["rc"])

    def _died(self) -> int:
        rc = self._proc.wait()
        self._proc = None
        return rc if rc < 0 else 1000 + rc  # a worker that exited on its own inside a case: never a valid code

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def run_case(worker: Worker, argv: tuple[str, ...], folder: Path, out: Path | None) -> Result:
    """One command in the worker; its stdout and stderr are kept in `folder`."""
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    rc = worker.run(argv, stdout, stderr)
    return judge(rc, _text(stdout), _text(stderr), out)


def run_fresh(argv: tuple[str, ...], folder: Path, out: Path | None, timeout: float) -> Result:
    """One command as its own `python -m tightfit.cli` process."""
    with open(folder / "fresh-stdout.txt", "wb") as o, open(folder / "fresh-stderr.txt", "wb") as e:
        try:
            rc = subprocess.run([sys.executable, "-m", "tightfit.cli", *argv], stdout=o, stderr=e, env=environment(),
                                cwd=folder, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return judge(rc, _text(folder / "fresh-stdout.txt"), _text(folder / "fresh-stderr.txt"), out)


def fuzz(numbers, seeds, root: Path, worker: Worker) -> Iterator[tuple["Case", Result]]:
    """(case, result) of each seeded case (fuzz_inputs.make_case) in turn; the folders of cases that kept the
    contract are removed, those of failures kept under `root` for a look."""
    from fuzz_inputs import make_case

    for n in numbers:
        folder = root / f"case-{n}"
        shutil.rmtree(folder, ignore_errors=True)  # a failure's folder from an earlier run
        case = make_case(n, seeds, folder)
        result = run_case(worker, case.argv, folder, case.out)
        if result.outcome not in FAILURES:
            shutil.rmtree(folder)
        yield case, result


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace") if path.exists() else ""


def _serve() -> None:
    """The worker's loop: one JSON job per line on stdin, one {"rc": ...} line per job on the original stdout."""
    import traceback

    from tightfit.cli import main

    control = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        job = json.loads(line)
        with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = main(job["argv"])
            except SystemExit as e:  # argparse, as the interpreter would end the process
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:  # what the interpreter would print for an uncaught exception
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        control.write(json.dumps({"rc": rc}) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()

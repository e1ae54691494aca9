"""What .ci/run relies on: under CI=true an unexpected skip fails while an allowed one and an xfail do
not (tests/ci_skips.py, run here on a throwaway suite), and the run installs the packages whose
absence would otherwise skip the README's claims (the [ci] extra)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest

def test_runs():
    pass

def test_the_engine_runs_the_best_build_the_cpu_has():
    pytest.skip("neither AVX-512 VNNI nor AVX2 on this runner")

@pytest.mark.skipif(True, reason="an optional package is missing")
def test_marked_skip():
    pass

def test_importorskip():
    pytest.importorskip("no_such_package_for_tightfit")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False
'''


def run_suite(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    """The throwaway suite at tests/runtime/test_engine_isa.py (the allowed skip's node id) under tmp_path."""
    (tmp_path / "tests" / "runtime").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests" / "runtime" / "test_engine_isa.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT / "tests")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q", "-rA",
                           "-c", str(tmp_path / "pytest.ini"), "tests"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_unexpected_skips_fail_under_ci(tmp_path: Path) -> None:
    run = run_suite(tmp_path, ci=True)
    assert run.returncode == 1, run.stdout
    failed = [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert len(failed) == 2 and any("test_marked_skip" in f for f in failed) and any("test_importorskip" in f for f in failed)
    assert "skipped under CI=true, where a skip must be expected: an optional package is missing" in run.stdout
    assert "no_such_package_for_tightfit" in run.stdout
    # the allowed skip and the xfail stay what they are; a skip in setup (a skipif mark) reads as an error
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in run.stdout


def test_skips_stay_skips_outside_ci(tmp_path: Path) -> None:
    run = run_suite(tmp_path, ci=False)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in run.stdout


def test_ci_installs_what_the_readme_claims_need() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ci = " ".join(extras["ci"])
    assert "tightfit[test,json]" in ci and "llama-cpp-python" in ci and any("xgrammar" in d for d in extras["json"])
    script = (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup.sh --ci" in script and "CI=true" in script
    assert '--ci) extras="[ci]"' in (ROOT / "scripts" / "setup.sh").read_text()


"""The import contracts in .importlinter (one-way pipeline, independent stages, lean runtime and
export, pure algorithms) hold, and lint-imports checks every one of them."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (bash scripts/setup.sh --test installs it)")
    run = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    names = [config[s]["name"] for s in config.sections() if s.startswith("importlinter:contract:")]
    assert len(names) >= 5
    report = " ".join(run.stdout.split())  # lint-imports wraps long contract names
    for name in names:
        assert f"{' '.join(name.split())} KEPT" in report, name

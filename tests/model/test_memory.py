"""tightfit.model.memory and the check before a whole-model load: refuse with what would fit, not an OOM kill."""

from __future__ import annotations

from pathlib import Path

import pytest

from tightfit.errors import InsufficientMemory
from tightfit.model import check_memory, load_model, open_weights
from tightfit.model.load import streamed_nbytes
from tightfit.model import load as load_module
from tightfit.model.memory import MemoryBudget, memory_budget

GB = 10**9


def _files(tmp_path: Path, cgroup: str, limits: dict[str, str]) -> dict[str, Path]:
    (tmp_path / "meminfo").write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    (tmp_path / "cgroup").write_text(cgroup)
    root = tmp_path / "sys"
    for relative, text in limits.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return {"meminfo": tmp_path / "meminfo", "proc_cgroup": tmp_path / "cgroup", "cgroup_root": root}


def test_meminfo_alone(tmp_path: Path) -> None:
    budget = memory_budget(**_files(tmp_path, "0::/\n", {"memory.max": "max\n"}))
    assert budget == MemoryBudget(available=8_192_000_000, detail="MemAvailable 8.2 GB")


def test_cgroup_v2_limit_caps_it(tmp_path: Path) -> None:
    files = _files(tmp_path, "0::/job\n", {"job/memory.max": f"{3 * GB}\n", "job/memory.current": f"{GB}\n"})
    budget = memory_budget(**files)
    assert budget.available == 2 * GB
    assert budget.detail == "MemAvailable 8.2 GB, cgroup limit 3.0 GB with 1.0 GB used"


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path: Path) -> None:
    limited = {"memory/a/memory.limit_in_bytes": f"{4 * GB}", "memory/a/memory.usage_in_bytes": f"{GB}"}
    assert memory_budget(**_files(tmp_path, "4:memory:/a\n", limited)).available == 3 * GB
    unlimited = {"memory/b/memory.limit_in_bytes": str(2**63 - 4096)}
    assert memory_budget(**_files(tmp_path, "4:memory:/b\n", unlimited)).available == 8_192_000_000


def test_unreadable_bounds_do_not_block(tmp_path: Path) -> None:
    budget = memory_budget(meminfo=tmp_path / "no", proc_cgroup=tmp_path / "no", cgroup_root=tmp_path / "no")
    assert budget == MemoryBudget(available=None, detail="unknown")


def test_check_memory_says_what_would_fit(tiny_model_dir: Path) -> None:
    weights = open_weights(str(tiny_model_dir))
    whole, part = weights.nbytes(), streamed_nbytes(weights)
    assert part < whole
    check_memory(weights, MemoryBudget(available=2 * whole, detail="plenty"))
    with pytest.raises(InsufficientMemory, match=r"^loading .* whole needs about 0\.0 GB \(fp32 weights \+ 10%\), "
                       r"0\.0 GB is available \(MemAvailable tiny\); reading it one decoder block at a time "
                       r"needs about 0\.00 GB; or use a smaller model$"):
        check_memory(weights, MemoryBudget(available=whole, detail="MemAvailable tiny"))
    with pytest.raises(InsufficientMemory, match=r"needs about 0\.00 GB, which does not fit either; or use a smaller"):
        check_memory(weights, MemoryBudget(available=part, detail="MemAvailable tiny"))


def test_load_model_refuses_before_reading_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_module, "memory_budget", lambda: MemoryBudget(available=1000, detail="MemAvailable 1 kB"))
    monkeypatch.setattr(load_module, "_hf_model", lambda weights: pytest.fail("weights were read"))
    with pytest.raises(InsufficientMemory, match=r"0\.0 GB is available \(MemAvailable 1 kB\)"):
        load_model(str(tiny_model_dir))

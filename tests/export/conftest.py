"""Packed tiny models to export, built once per session with `tightfit compress --method rtn`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tightfit.cli import main


@pytest.fixture(scope="session")
def packed_tiny(make_tiny_model: Callable[[str, Path], Path],
                tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Factory `packed_tiny(model_type, format) -> packed folder` (RTN, no evaluation). Do not modify it."""
    built: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("packed_tiny")

    def get(model_type: str, fmt: str) -> Path:
        key = (model_type, fmt)
        if key not in built:
            source = make_tiny_model(model_type, root / "sources" / f"{model_type}-{fmt}")
            out = root / f"{model_type}-{fmt}"
            assert main(["compress", str(source), "--format", fmt, "--method", "rtn", "--no-eval", "--out", str(out)]) == 0
            built[key] = out
        return built[key]

    return get

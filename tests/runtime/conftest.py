"""Packed tiny models (RTN w4g32, no calibration text) for the runtime tests, and the one the server tests serve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tightfit.cli import main
from tightfit.runtime.server import ServedModel
from tightfit.runtime.text import eos_token_ids, load_tokenizer
from tightfit.runtime.torch_backend import load_torch_backend


@pytest.fixture(scope="session")
def make_packed(make_tiny_model: Callable[[str, Path], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`make_packed(model_type) -> folder` of a packed tiny model, built once per session. Do not modify it."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            root = tmp_path_factory.mktemp(f"packed_{model_type}")
            source = make_tiny_model(model_type, root)
            out = root / "packed"
            rc = main(["compress", str(source), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])
            assert rc == 0
            built[model_type] = out
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def packed_llama(make_packed: Callable[[str], Path]) -> Path:
    return make_packed("llama")


@pytest.fixture(scope="session")
def served(packed_llama: Path) -> ServedModel:
    """The packed tiny llama as the server runs it: the torch backend, a 64-token cache, under the name 'tiny'."""
    tokenizer = load_tokenizer(packed_llama)
    return ServedModel("tiny", load_torch_backend(packed_llama, max_positions=64), tokenizer,
                       eos_token_ids(packed_llama, tokenizer))

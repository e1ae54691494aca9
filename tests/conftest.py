"""Shared fixtures: an offline tokenizer and tiny random models of every supported architecture
(built by tests/tiny_models.py). Under CI=true an unexpected skip fails (tests/ci_skips.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ci_skips import pytest_runtest_makereport  # noqa: F401  (the hook, registered by its name here)
from tiny_models import (  # noqa: F401  (re-exported for fixtures below)
    TINY_MODEL_TYPES,
    TINY_VOCAB_SIZE,
    TINY_SEED,
    TINY_SHAPES,
    TINY_EXTRA_CONFIG,
    TINY_CHAT_TEMPLATE,
    tiny_corpus,
    build_tiny_tokenizer,
    build_tiny_model,
    write_tiny_text,
)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """Session-wide tiny tokenizer (bos <s>, eos </s>, unk <unk>, pad <pad>, a chat template)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def _tiny_model_cache(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds each tiny model once per session; callers get copies, so they may modify them."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_tiny_model(model_type, tiny_tokenizer, root / model_type)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def make_tiny_model(_tiny_model_cache: Callable[[str], Path]) -> Callable[[str, Path], Path]:
    """Factory `make_tiny_model(model_type, tmp_path) -> folder`: a fresh copy of a tiny model under tmp_path.

    The folder is `tmp_path / model_type` and holds config.json, model.safetensors,
    generation_config.json and the tokenizer files.
    """

    def make(model_type: str, tmp_path: Path) -> Path:
        folder = Path(tmp_path) / model_type
        shutil.copytree(_tiny_model_cache(model_type), folder)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model: Callable[[str, Path], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny llama folder. Do not modify it; use make_tiny_model for a private copy."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny_model_dir"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .txt of tiny-corpus documents (tiny_models.write_tiny_text)."""
    return write_tiny_text(tmp_path_factory.mktemp("text") / "corpus.txt")

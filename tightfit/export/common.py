"""What every exporter shares: the per-tensor mapping record, the report, and output-path checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tightfit.errors import ExportError
from tightfit.formats.files import publishable


@dataclass(frozen=True)
class TensorMapping:
    """How one tensor of the packed model was written in the target format.

    name:          state-dict name in the packed model, e.g. "model.layers.0.self_attn.q_proj.weight"
    target_name:   its name in the written file (GGUF "blk.0.attn_q.weight"; the same name for compressed-tensors)
    source_format: our format ("w4g32-sym", "spqr-w3g16-s3-o1.0") or the storage dtype of a kept tensor ("fp16")
    target_type:   the target's type ("Q4_0", "F32"; compressed-tensors "int4 group 32 symmetric", "dense float32")
    exact:         True when the written tensor decodes to exactly our dequantized weight (checked, not assumed)
    max_abs_error: max |decoded - ours| over the tensor; 0.0 when exact
    note:          why the mapping is approximate or widened, "" otherwise
    """

    name: str
    target_name: str
    source_format: str
    target_type: str
    exact: bool
    max_abs_error: float
    note: str = ""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the path, the target ("gguf", "compressed-tensors"), the target
    architecture name, one TensorMapping per written tensor (quantized layers first) and the bytes."""

    target: str
    path: Path
    architecture: str
    tensors: tuple[TensorMapping, ...]
    nbytes: int

    @property
    def approximate(self) -> tuple[TensorMapping, ...]:
        return tuple(t for t in self.tensors if not t.exact)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def check_output_file(out: Path) -> Path:
    """A file path to (re)write: not an existing folder, its parent a folder or creatable."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"output {out} is a folder; give a file path such as {out / 'model.gguf'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: {out.parent} is not a folder")
    return out


def check_output_dir(out: Path) -> Path:
    """A folder path to create: absent or an empty folder (an export never replaces a user's files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is a file; give a new folder path")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"output folder {out} exists and is not empty; give a new or empty folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: {out.parent} is not a folder")
    return out


def publish_file(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a sibling temp file, then rename it to `out`: no half-written file under that name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        publishable(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a sibling temp folder, then rename it to `out` (absent or empty, see check_output_dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        publishable(tmp, is_dir=True)
        if out.is_dir():
            out.rmdir()  # empty, checked before
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

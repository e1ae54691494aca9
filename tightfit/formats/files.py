"""Durable atomic writes: a reader never sees a half-written file or folder, and a killed writer (or
a machine that loses power) leaves either the old content or the new one under the final name.

Every file is written to a sibling temp name, flushed to disk (fsync), renamed over the final
name, and then its folder is flushed too, so that the rename itself survives a crash. Temp names
carry the writer's pid: debris of a killed writer is removed by the next write to the same name.

A tensor or JSON file can carry the sha256 of its contents (`checksum=True`): intermediate results
(block checkpoints, cached Hessians, Fisher statistics and sensitivities) are verified with
`load_checked_tensors` / `load_checked_json` before they are reused.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tightfit.errors import CorruptCacheError, CorruptCacheWarning

CHECKSUM_KEY = "tightfit.sha256"  # the sha256 of a checked file's contents: in safetensors metadata, or a JSON key


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publishable(path: Path, is_dir: bool = False) -> None:
    """Give a temp file/folder (created 0600/0700) the permissions a normal write would have."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


# ---- flushing to disk ---------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content to disk (a folder's: the names in it, so renames last)."""
    is_dir = Path(path).is_dir()
    if is_dir and os.name == "nt":
        return  # Windows cannot open a folder for fsync; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, the folder itself last."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


# ---- temp names ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: Path) -> None:
    """Remove what killed writers of `path` left beside it: `.NAME.PID.*.tmp` of a process that is gone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    start = f".{path.name}."
    for p in path.parent.iterdir():
        if p.name.startswith(start) and p.name.endswith(".tmp"):
            pid = p.name[len(start):].split(".", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _remove(p)


def _write_via_temp(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path) into a sibling temp file, flush it, rename it to path, flush the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_path(Path(tmp))
        publishable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_via_temp(path, lambda tmp: tmp.write_bytes(data))


def json_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def atomic_write_json(path: Path, obj, *, checksum: bool = False) -> None:
    """Write obj as JSON durably and atomically; checksum=True (obj a dict) adds the sha256 of obj
    under CHECKSUM_KEY, for load_checked_json."""
    if checksum:
        obj = {**obj, CHECKSUM_KEY: json_sha256(obj)}
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def load_checked_json(path: Path) -> dict:
    """The dict written by atomic_write_json(checksum=True), checksum verified and removed; raises
    CorruptCacheError when the file is unreadable, has no checksum or fails it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"{path} is unreadable ({e})") from e
    if not isinstance(data, dict) or CHECKSUM_KEY not in data:
        raise CorruptCacheError(f"{path} has no checksum (written by an older tightfit)")
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    if json_sha256(body) != data[CHECKSUM_KEY]:
        raise CorruptCacheError(f"{path} is corrupted: its contents do not match their sha256")
    return body


# ---- folders ------------------------------------------------------------------------------------


def temp_dir_for(out: Path) -> Path:
    """A new empty sibling temp folder of `out` to build it in (debris of killed builds removed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out), suffix=".tmp"))


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish_folder(tmp: Path, out: Path) -> None:
    """Make the finished folder `tmp` (from temp_dir_for) visible as `out`, replacing what is there.

    Its files are flushed to disk first; an existing `out` is exchanged with it in one step where
    the OS can (else renamed aside first, then removed), and the parent folder is flushed last.
    """
    tmp, out = Path(tmp), Path(out)
    publishable(tmp, is_dir=True)
    fsync_tree(tmp)
    if out.is_dir() and _exchange(tmp, out):
        _remove(tmp)  # now the old content
    else:
        old = None
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{_temp_prefix(out)}old.tmp")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            _remove(old)
    fsync_path(out.parent)


# ---- tensor files -------------------------------------------------------------------------------


def tensors_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over the metadata (CHECKSUM_KEY left out) and every tensor's name, dtype, shape and
    bytes, in name order."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        *, checksum: bool = False) -> None:
    """Save tensors durably and atomically; checksum=True records the sha256 of the tensors and the
    metadata in the metadata (CHECKSUM_KEY), for load_checked_tensors."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    if checksum:
        meta[CHECKSUM_KEY] = tensors_sha256(tensors, meta)
    _write_via_temp(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta or None))


def read_tensor_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file; raises CorruptCacheError when it cannot be read."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCacheError(f"{path} is unreadable ({' '.join(str(e).split())})") from e


def load_checked_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file saved with checksum=True, after verifying the checksum;
    raises CorruptCacheError when the file is missing, unreadable, has no checksum or fails it."""
    if not Path(path).is_file():
        raise CorruptCacheError(f"{path} is missing")
    meta = read_tensor_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCacheError(f"{path} is unreadable ({' '.join(str(e).split())})") from e
    if CHECKSUM_KEY not in meta:
        raise CorruptCacheError(f"{path} has no checksum (written by an older tightfit)")
    if tensors_sha256(tensors, meta) != meta[CHECKSUM_KEY]:
        raise CorruptCacheError(f"{path} is corrupted: its contents do not match their sha256")
    return tensors, meta


def warn_recomputed(error: Exception) -> None:
    """The one-line warning when a corrupt intermediate result is thrown away and computed again."""
    warnings.warn(CorruptCacheWarning(f"{error}; computing it again"), stacklevel=3)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into memory of its own (no memory map).

    safetensors' `load_file` maps the file and keeps the mapping alive while any tensor of it
    lives: every page touched stays in this process's RSS (a 1.6 GB packed model held twice while
    it is unpacked). Raises ValueError for a file that does not follow the format."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"header of {n} bytes does not fit in {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        out = {}
        for name, entry in header.items():
            try:
                dtype, shape, (lo, hi) = _SAFETENSORS_DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]], entry["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"tensor {name!r}: bad entry ({e})") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not (0 <= lo <= hi <= size - 8 - n) or hi - lo != math.prod(shape) * itemsize or min(shape, default=0) < 0:
                raise ValueError(f"tensor {name!r}: offsets {lo}..{hi} do not hold {shape} {entry['dtype']}")
            data = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(8 + n + lo)
            if f.readinto(memoryview(data.numpy())) != hi - lo:
                raise ValueError(f"tensor {name!r}: file ends inside it")
            out[name] = data.view(dtype).reshape(shape)
    return out

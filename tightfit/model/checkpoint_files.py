"""Weight files read at the byte level: the GGUF header (metadata and tensor table) and the size each file must have.

A truncated download otherwise surfaces deep inside transformers as a reshape or struct error.
Walking the header costs milliseconds (no tensor is read), so `resolve_source` runs these checks
on every source and a bad file fails fast with one line naming the file. The GGUF loader
(`tightfit.model.gguf`) reads its config and tensor table from the same `GGUFHeader`.

GGUF layout (ggml docs/gguf.md, versions 2 and 3, little-endian):
    magic u32 "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)
    n_tensors x (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to its start)
    where string = u64 length + utf-8 bytes, array value = elem_type u32 + count u64 + elements.
safetensors layout: header_len u64 | JSON header | data; every tensor's `data_offsets` [begin, end)
    are relative to the start of the data.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

from tightfit.errors import ModelSourceError

# struct format of each fixed-size GGUF metadata value type (GGUFValueType); 8 = string, 9 = array.
_GGUF_SCALAR_FORMATS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                                        10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, left unread (a vocabulary, the BPE merges): only its length."""

    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table.

    Fields:
        name: the GGUF name, e.g. "blk.0.attn_q.weight".
        shape: in torch order (rows first; GGUF lists the fastest-moving dimension first).
        ggml_type: how the values are stored (F32, Q4_K, ...).
        offset: where the data starts, in bytes from the start of the file.
        nbytes: bytes of data, blocks included.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file but the tensor data.

    Fields:
        path: the file.
        metadata: key -> value (int, float, bool, str, a list of numbers, or a `StringArray`), in
            file order.
        tensors: the tensor table, in file order.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def data_end(self) -> int:
        """The size in bytes the file must have: the end of the last tensor's data."""
        return max((t.offset + t.nbytes for t in self.tensors), default=0)


class _Truncated(Exception):
    """The header claims more bytes than the file has."""


class _Cursor:
    """Reads little-endian fields from a buffer, failing with `_Truncated` past its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> int:
        """Skip `n` bytes; return where they started."""
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Truncated
        self.pos = start + n
        return start

    def unpack(self, fmt: str, size: int) -> tuple:
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))

    def u32(self) -> int:
        return self.unpack("I", 4)[0]

    def u64(self) -> int:
        return self.unpack("Q", 8)[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8")

    def value(self, value_type: int, key: str) -> Any:
        """One metadata value; an array of strings is walked over, not read (a `StringArray`)."""
        if value_type in _GGUF_SCALAR_FORMATS:
            fmt = _GGUF_SCALAR_FORMATS[value_type]
            return self.unpack(fmt, struct.calcsize(fmt))[0]
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            elem_type, count = self.u32(), self.u64()
            if elem_type in _GGUF_SCALAR_FORMATS:
                fmt = _GGUF_SCALAR_FORMATS[elem_type]
                return list(self.unpack(f"{count}{fmt}", count * struct.calcsize(fmt)))
            if elem_type != _GGUF_STRING:
                raise ValueError(f"metadata key {key!r} is an array of value type {elem_type}")
            buf, pos, end = self.buf, self.pos, len(self.buf)
            for _ in range(count):  # a vocabulary: 10^5 strings, walked by length only
                if pos + 8 > end:
                    raise _Truncated
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            self.take(pos - self.pos)
            return StringArray(count)
        raise ValueError(f"unknown metadata value type {value_type}")


def _open_map(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            raise ModelSourceError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the metadata and the tensor table of the GGUF file `path` (no tensor data is read).

    Raises:
        ModelSourceError: not a GGUF file, an unknown version, value type or tensor type, or a
            header cut short.
    """
    buf = _open_map(path)
    try:
        cur = _Cursor(buf)
        if cur.u32() != GGUF_MAGIC:
            raise ModelSourceError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        version = cur.u32()
        if version not in (2, 3):
            raise ModelSourceError(f"{path} is GGUF version {version}; versions 2 and 3 are readable")
        n_tensors, n_kv = cur.u64(), cur.u64()
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.u32(), key)
        entries = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.u64() for _ in range(cur.u32())]
            ggml_type, offset = cur.u32(), cur.u64()
            try:
                qtype = GGMLQuantizationType(ggml_type)
                block_size, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as e:
                raise ModelSourceError(f"{path}: tensor '{name}' has unknown ggml type {ggml_type}") from e
            n_elements = 1
            for d in dims:
                n_elements *= d
            entries.append((name, tuple(reversed(dims)), qtype, offset, n_elements // block_size * type_size))
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}, not a positive integer")
        data_start = -(-cur.pos // alignment) * alignment
        tensors = tuple(GGUFTensorInfo(name, shape, qtype, data_start + offset, nbytes)
                        for name, shape, qtype, offset, nbytes in entries)
        return GGUFHeader(path=path, metadata=metadata, tensors=tensors)
    except _Truncated as e:
        raise ModelSourceError(f"{path} is truncated: its GGUF header ends past the end of the file") from e
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelSourceError(f"{path} has a corrupt GGUF header: {e}") from e
    finally:
        buf.close()


def gguf_expected_size(path: Path) -> int:
    """The size in bytes `path` must have, from its GGUF header (end of the last tensor's data).

    Raises:
        ModelSourceError: as `read_gguf_header`.
    """
    return read_gguf_header(path).data_end


def safetensors_expected_size(path: Path) -> int:
    """The size in bytes `path` must have, from its safetensors header.

    Raises:
        ModelSourceError: the header is cut short or is not the JSON a safetensors file starts with.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelSourceError(f"{path} is truncated: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ModelSourceError(f"{path} is truncated or not a safetensors file: header claims {n} bytes")
        try:
            header = json.loads(f.read(n))
            data_end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ModelSourceError(f"{path} has a corrupt safetensors header: {e}") from e
    return 8 + n + data_end

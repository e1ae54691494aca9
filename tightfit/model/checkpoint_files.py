"""Cheap integrity checks of weight files: parse the header, derive the size the file must have.

A truncated download otherwise surfaces deep inside transformers as a reshape or struct error.
Walking the header costs milliseconds (no tensor is read), so `resolve_source` runs these checks
on every source and a bad file fails fast with one line naming the file.

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
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

from tightfit.errors import ModelSourceError

# Byte size of each fixed-size GGUF metadata value type (GGUFValueType); 8 = string, 9 = array.
_GGUF_SCALAR_SIZES: dict[int, int] = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_UINT32 = 4


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

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def skip_string(self) -> None:
        self.take(self.u64())

    def skip_value(self, value_type: int) -> None:
        if value_type in _GGUF_SCALAR_SIZES:
            self.take(_GGUF_SCALAR_SIZES[value_type])
        elif value_type == _GGUF_STRING:
            self.skip_string()
        elif value_type == _GGUF_ARRAY:
            elem_type, count = self.u32(), self.u64()
            if elem_type in _GGUF_SCALAR_SIZES:
                self.take(_GGUF_SCALAR_SIZES[elem_type] * count)
            else:
                for _ in range(count):
                    self.skip_value(elem_type)
        else:
            raise ValueError(f"unknown metadata value type {value_type}")


def _open_map(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            raise ModelSourceError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def gguf_expected_size(path: Path) -> int:
    """The size in bytes `path` must have, from its GGUF header (end of the last tensor's data).

    Raises:
        ModelSourceError: not a GGUF file, an unknown version or tensor type, or a header cut short.
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
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string()
            value_type = cur.u32()
            if key == b"general.alignment" and value_type == _GGUF_UINT32:
                alignment = cur.u32()
            else:
                cur.skip_value(value_type)
        data_end = 0
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8", "replace")
            dims = [cur.u64() for _ in range(cur.u32())]
            ggml_type, offset = cur.u32(), cur.u64()
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError) as e:
                raise ModelSourceError(f"{path}: tensor '{name}' has unknown ggml type {ggml_type}") from e
            n_elements = 1
            for d in dims:
                n_elements *= d
            data_end = max(data_end, offset + n_elements // block_size * type_size)
        data_start = -(-cur.pos // alignment) * alignment
        return data_start + data_end
    except _Truncated as e:
        raise ModelSourceError(f"{path} is truncated: its GGUF header ends past the end of the file") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{path} has a corrupt GGUF header: {e}") from e
    finally:
        buf.close()


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

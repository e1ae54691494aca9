"""GGUF tensor bytes -> fp32, vectorized, in chunks written straight into the output array.

gguf-py's numpy decoders (`gguf.quants.dequantize`) are the reference. For the types built-in and
common llama.cpp files hold, the decoders below do the same float operations in the same order, so
the values are bit-identical (tests/model/test_gguf.py), in fewer passes over memory and without a
temporary per output: each writes its blocks into a slice of the final array. Other types go
through gguf-py a chunk at a time. Block layouts: ggml `ggml-common.h` (block_q4_0 ... block_q6_K).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tightfit.errors import ModelSourceError
from tightfit.model.checkpoint_files import GGUFTensorInfo

UNQUANTIZED = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.F64)

# Decode about this many weights per call: numpy's per-call overhead vanishes, the temporaries of one
# call stay in cache (fp32: 1 MiB).
CHUNK_ELEMENTS = 1 << 18


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """One fp16 field per block at byte `start` -> [n, 1] fp32."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, out: np.ndarray) -> None:
    """packed [..., k] bytes -> out [..., 2, k]: low nibbles, then high nibbles (ggml's order).

    Split in uint8, then converted in one pass: a ufunc writing uint8 results into fp32 casts
    element by element, twice as slow.
    """
    q = np.empty(out.shape, dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[..., 0, :])
    np.right_shift(packed, 4, out=q[..., 1, :])
    out[...] = q


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """block_q4_0 (18 B): d f16 | 16 B nibbles; x = d * (q - 8)."""
    _nibbles(blocks[:, 2:18], out.reshape(len(blocks), 2, 16))
    np.subtract(out, np.float32(8), out=out)  # exact: small integers
    np.multiply(_f16(blocks, 0), out, out=out)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    """block_q4_1 (20 B): d f16 | m f16 | 16 B nibbles; x = d * q + m."""
    _nibbles(blocks[:, 4:20], out.reshape(len(blocks), 2, 16))
    np.multiply(_f16(blocks, 0), out, out=out)
    np.add(out, _f16(blocks, 2), out=out)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """block_q8_0 (34 B): d f16 | 32 int8; x = q * d."""
    np.multiply(blocks[:, 2:34].view(np.int8), _f16(blocks, 0), out=out)


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """block_q4_K (144 B): d f16 | dmin f16 | 12 B of 6-bit scales and mins | 128 B nibbles, 8 sub-blocks of 32;
    x = (d * scale) * q - (dmin * min)."""
    n = len(blocks)
    s = blocks[:, 4:16]
    scale = np.concatenate([s[:, 0:4] & 0x3F, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 2) & 0x30)], axis=1)
    minimum = np.concatenate([s[:, 4:8] & 0x3F, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 2) & 0x30)], axis=1)
    _nibbles(blocks[:, 16:144].reshape(n, 4, 32), out.reshape(n, 4, 2, 32))
    sub = out.reshape(n, 8, 32)
    np.multiply(sub, (_f16(blocks, 0) * scale.astype(np.float32))[:, :, None], out=sub)
    np.subtract(sub, (_f16(blocks, 2) * minimum.astype(np.float32))[:, :, None], out=sub)


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """block_q6_K (210 B): 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d f16, 16 groups of 16;
    x = (d * scale) * (q - 32)."""
    n = len(blocks)
    low = np.empty((n, 2, 2, 64), dtype=np.uint8)
    _nibbles(blocks[:, 0:128].reshape(n, 2, 64), low)
    high = np.empty((n, 2, 4, 32), dtype=np.uint8)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    for k in range(4):
        np.bitwise_and(qh >> (2 * k), 3, out=high[:, :, k, :])
    q = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)
    groups = out.reshape(n, 16, 16)
    np.subtract(q.reshape(n, 16, 16).view(np.int8), np.int8(32), out=groups, casting="unsafe")
    np.multiply(groups, (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None],
                out=groups)


BlockDecoder = Callable[[np.ndarray, np.ndarray], None]
DECODERS: dict[GGMLQuantizationType, BlockDecoder] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def _gguf_py(qtype: GGMLQuantizationType) -> BlockDecoder:
    """gguf-py's decoder for `qtype` in the same shape: the blocks passed as one long row, so that it
    decodes them in one vectorized call (it splits what it gets into groups of 16 rows)."""
    from gguf.quants import dequantize as gguf_dequantize

    def decode(blocks: np.ndarray, out: np.ndarray) -> None:
        out[...] = gguf_dequantize(blocks.reshape(1, -1), qtype).reshape(out.shape)

    return decode


def dequantize(data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Raw tensor bytes (a memory-map slice, [nbytes] uint8) -> fp32 [info.shape], a fresh writable array."""
    from gguf.quants import dequantize as gguf_dequantize

    raw = np.asarray(data)  # a plain ndarray view: numpy's memmap subclass costs a Python call per slice
    assert raw.dtype == np.uint8 and raw.size == info.nbytes, (raw.dtype, raw.size, info)
    if info.ggml_type in UNQUANTIZED:
        values = gguf_dequantize(raw, info.ggml_type)  # F32: a view of the map; F16/BF16: a new array
        return np.require(values, np.float32, ["C", "W", "O"]).reshape(info.shape)
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    if info.shape[-1] % block_size:
        raise ModelSourceError(f"tensor {info.name}: rows of {info.shape[-1]} are not whole "
                               f"{info.ggml_type.name} blocks of {block_size}")
    blocks = raw.reshape(-1, type_size)  # [n_blocks, type_size]
    # torch's allocator: a fresh numpy array of a GB asks for huge pages, whose first writes stall here
    out = torch.empty((len(blocks), block_size), dtype=torch.float32).numpy()  # [n_blocks, block_size]
    decode = DECODERS.get(info.ggml_type) or _gguf_py(info.ggml_type)
    step = max(1, CHUNK_ELEMENTS // block_size)
    for start in range(0, len(blocks), step):
        decode(blocks[start : start + step], out[start : start + step])
    return out.reshape(info.shape)

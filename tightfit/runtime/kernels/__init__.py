"""tightfit's compiled CPU kernels: layout (layout.py), build and load (build.py), Python entry points."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from tightfit.runtime.kernels.build import AVX2, load
from tightfit.runtime.kernels.layout import KernelMatrix, TfMat, from_dense, from_quantized, has_kernel

__all__ = ["KernelMatrix", "from_dense", "from_quantized", "has_kernel", "matmul", "time_matmul", "dequantize", "quantize_activations", "read_seconds", "has_avx512", "has_avx2", "AVX2",
           "kv_attend", "time_kv_attend"]


# `portable` of the entry points below: False the build for this CPU, True the portable scalar build,
# AVX2 the build for this CPU with its AVX-512 tier compiled out (build.load).
def _lib(portable: bool | str) -> ctypes.CDLL:
    return load(portable)  # built, loaded and declared once per process (build.load is cached)


def has_avx512(portable: bool | str = False) -> bool:
    """Whether the loaded build runs the AVX-512 VNNI kernels (else AVX2 or the portable scalar path)."""
    return bool(_lib(portable).tf_has_avx512())


def has_avx2(portable: bool | str = False) -> bool:
    """Whether the loaded build runs the AVX2 kernels (a CPU with AVX2, FMA and F16C but no AVX-512)."""
    return bool(_lib(portable).tf_has_avx2())


def matmul(w: KernelMatrix, x: torch.Tensor, *, threads: int = 1, portable: bool | str = False, exact: bool = False) -> torch.Tensor:
    """x [M, K] fp32 -> y [M, N] = x W^T (+ bias) with the kernel of w's kind; quantized kernels take
    int8 block-32 activations, or (exact) the fp32 activations themselves."""
    n, k = w.shape
    x = x.to(torch.float32).contiguous()
    assert x.dim() == 2 and x.shape[1] == k, f"x must be [M, {k}], got {tuple(x.shape)}"
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _lib(portable).tf_matmul(ctypes.byref(w.struct()), x.data_ptr(), x.shape[0], y.data_ptr(), threads, int(exact))
    return y


def time_matmul(w: KernelMatrix | Sequence[KernelMatrix], m: int, *, threads: int = 1, reps: int = 100,
                lib: ctypes.CDLL | None = None) -> float:
    """Seconds per [m, K] x W^T call, timed inside the library over `reps` back-to-back calls.

    w: one matrix, or copies of one (same shape and kind) that the calls cycle through; copies
    larger together than the last-level cache make every call read its weights from memory.
    lib: a kernel build loaded by build.load (e.g. with other tuning macros); None: the default build.
    """
    mats = [w] if isinstance(w, KernelMatrix) else list(w)
    n, k = mats[0].shape
    assert all(x.shape == (n, k) and x.kind == mats[0].kind for x in mats), "copies must share shape and kind"
    structs = (TfMat * len(mats))(*[x.struct() for x in mats])
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
    y = torch.empty(m, n, dtype=torch.float32)
    return float((lib or _lib(False)).tf_time_matmul(structs, len(mats), x.data_ptr(), m, y.data_ptr(), threads, reps))


def dequantize(w: KernelMatrix, *, portable: bool | str = False) -> torch.Tensor:
    """[N, K] fp32, decoded from the kernel layout."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float32)
    _lib(portable).tf_dequant_rows(ctypes.byref(w.struct()), 0, n, out.data_ptr())
    return out


def quantize_activations(x: torch.Tensor, *, portable: bool | str = False) -> torch.Tensor:
    """x [M, K] -> sx * xq [M, K]: the int8 block-32 activations quantized matmuls multiply by."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    _lib(portable).tf_quantize_activations(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def read_seconds(buf: torch.Tensor, reps: int, threads: int) -> float:
    """Seconds to read buf (uint8, contiguous) `reps` times with `threads` threads."""
    assert buf.dtype == torch.uint8 and buf.is_contiguous()
    return float(_lib(False).tf_read_seconds(buf.data_ptr(), buf.numel(), reps, threads))


def _kv_args(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """keys, values [n, D] and q [rep, D] as contiguous fp32, checked against each other."""
    keys, values, q = (x.to(torch.float32).contiguous() for x in (keys, values, q))
    assert keys.dim() == 2 and values.shape == keys.shape, f"keys and values must be [n, D], got {tuple(keys.shape)}, {tuple(values.shape)}"
    assert q.dim() == 2 and q.shape[1] == keys.shape[1], f"q must be [rep, {keys.shape[1]}], got {tuple(q.shape)}"
    return keys, values, q


def kv_attend(bits: int, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, scale: float, *,
              portable: bool | str = False) -> torch.Tensor:
    """[rep, D]: the attention of rep query heads q [rep, D] over one KV head's cache of `bits` (16, 8, 4)
    holding keys, values [n, D] (keys already rotated), as the engine computes it (groups of up to
    TF_MAX_GROUP = 8 heads reading the cache together)."""
    keys, values, q = _kv_args(keys, values, q)
    (n, d), rep = keys.shape, q.shape[0]
    out = torch.empty(rep, d, dtype=torch.float32)
    rc = _lib(portable).tf_kv_attend(bits, d, n, rep, keys.data_ptr(), values.data_ptr(), q.data_ptr(), scale, out.data_ptr())
    if rc != 0:
        raise ValueError(f"tf_kv_attend refused bits {bits}, D {d}, n {n}, rep {rep} (code {rc})")
    return out


def time_kv_attend(bits: int, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, scale: float, *, group: int,
                   reps: int, min_bytes: int = 0) -> float:
    """Seconds per attention of the rep query heads q [rep, D] over one KV head's cache (as kv_attend),
    timed inside the library over `reps` back-to-back calls on one thread; the heads read the cache
    in pieces of `group` (1: each head alone, as before grouped-query attention). The calls cycle
    through copies of the cache whose bytes reach min_bytes (0: one copy): beyond the last-level
    cache, every call streams its cache from memory as a whole model's decode does."""
    keys, values, q = _kv_args(keys, values, q)
    (n, d), rep = keys.shape, q.shape[0]
    out = torch.empty(rep, d, dtype=torch.float32)
    t = _lib(False).tf_time_kv_attend(bits, d, n, rep, group, keys.data_ptr(), values.data_ptr(), q.data_ptr(), scale,
                                      reps, min_bytes, out.data_ptr())
    if t < 0:
        raise ValueError(f"tf_time_kv_attend refused bits {bits}, D {d}, n {n}, rep {rep}, group {group} (code {int(t)})")
    return float(t)

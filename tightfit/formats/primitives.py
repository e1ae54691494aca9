"""Pure quantize / dequantize primitives for the group-wise formats of `table.py`. No I/O, no modules.

Conventions (b = fmt.bits, s = scale, z = zero point, q = code in 0 .. 2**b-1):
    asymmetric  w ~ (q - z) * s,              z integer in 0 .. 2**b-1
    symmetric   w ~ (q - 2**(b-1)) * s,       i.e. signed levels -2**(b-1) .. 2**(b-1)-1
Scales are rounded to the format's scale dtype when chosen and carried as fp32, so dequantizing
in-memory results and dequantizing stored (packed) data give bit-identical weights.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, unpack_bits
from tightfit.formats.double_quant import pack_scales, unpack_scales
from tightfit.formats.table import GroupedFormat, LayerBytes, QuantFormat

# Candidate shrink factors of the [min, max] range, largest first so ties keep the full range.
DEFAULT_SHRINK_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5
_SHRINK_CHUNK_ELEMENTS = 1 << 22  # search_shrink's work tensor: at most this many fp32 (16 MB) per chunk of its grid


def _code_max(bits: int) -> int:
    return (1 << bits) - 1


def _sym_offset(bits: int) -> int:
    """Code of the signed level 0 in symmetric formats: 2**(b-1)."""
    return 1 << (bits - 1)


def round_to_scale_dtype(scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round fp32 scales to fmt.scale_dtype (nearest) and back to fp32; zeros become the dtype's
    smallest normal so that no division by zero can happen downstream."""
    dtype = fmt.scale_torch_dtype
    rounded = scale.to(dtype).to(torch.float32)
    if not bool(torch.isfinite(rounded).all()):
        raise FormatError(
            f"format {fmt.name}: a quantization scale overflows {fmt.scale_dtype} "
            f"(largest group range {float(scale.max()):.3g}); use a bf16-scale format (e.g. {fmt.name}-bf16)"
            if fmt.scale_dtype != "bf16"
            else f"format {fmt.name}: a quantization scale overflows bf16"
        )
    tiny = torch.finfo(dtype).tiny  # smallest normal; exactly representable in the dtype
    return torch.where(rounded > 0, rounded, torch.full_like(rounded, tiny))


def choose_qparams(
    w: torch.Tensor, fmt: QuantFormat, shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per group.

    w:      [..., g] fp32, the last dim is one group
    shrink: scalar or [...] per group, in (0, 1]; the range is scaled by it (clipping)
    returns scale [...] fp32 (exactly representable in fmt.scale_dtype, > 0) and
            zero [...] fp32 holding integers in 0 .. 2**b-1 (asymmetric) or None (symmetric)

    Asymmetric: the range is [min(w_min, 0), max(w_max, 0)] * shrink. It always contains 0
    because an integer zero point puts 0 on the grid; a range not containing 0 could not be
    covered by (q - z)*s with z clamped to the codes. scale = (max - min) / (2**b - 1),
    zero = round(-min / scale).

    Symmetric: the signed grid -2**(b-1) .. 2**(b-1)-1 is lopsided, so the scale is the smallest
    one whose grid covers [w_min, w_max] * shrink:
        scale = max(max / (2**(b-1) - 1), -min / 2**(b-1))
    i.e. a negative extreme uses the extra level -2**(b-1) instead of wasting it (at 2 bits,
    scale = absmax / 1 would leave level -2 unused for any group whose extreme is positive).

    Constant groups (w_min == w_max = c) need one level only: the scale is |c| (q - z = sign(c)),
    which dequantizes exactly whenever c is representable in the scale dtype. All-zero groups
    get the dtype's smallest normal scale and dequantize to exactly 0.
    """
    assert w.dtype == torch.float32, f"w must be fp32, got {w.dtype}"
    assert w.dim() >= 1 and w.shape[-1] > 0, f"w must be [..., g] with g > 0, got {tuple(w.shape)}"
    w_min, w_max = _group_range(w)  # [...], [...]
    return _qparams_from_range(w_min, w_max, fmt, shrink)


def _group_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., g] -> (min, max) over the last dim, each [...]; refuses NaN/inf."""
    w_min = w.amin(dim=-1)  # [...]
    w_max = w.amax(dim=-1)  # [...]
    if not bool(torch.isfinite(w_min).all() and torch.isfinite(w_max).all()):
        raise FormatError("weight contains NaN or inf; cannot choose quantization parameters")
    return w_min, w_max


def _qparams_from_range(
    w_min: torch.Tensor, w_max: torch.Tensor, fmt: QuantFormat, shrink: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`choose_qparams` given each group's range w_min, w_max [...] (see there)."""
    shrink_t = torch.as_tensor(shrink, dtype=torch.float32, device=w_min.device)
    assert shrink_t.dim() == 0 or shrink_t.shape == w_min.shape, (
        f"shrink must be a scalar or {tuple(w_min.shape)}, got {tuple(shrink_t.shape)}"
    )
    if not bool(((shrink_t > 0) & (shrink_t <= 1)).all()):
        raise FormatError("shrink factors must lie in (0, 1]")
    constant = w_min == w_max  # [...]
    lo = w_min * shrink_t  # [...]
    hi = w_max * shrink_t  # [...]
    constant_step = lo.abs()  # [...] one grid step for constant groups
    b = fmt.bits
    if fmt.symmetric:
        scale = torch.maximum(hi / (_sym_offset(b) - 1), -lo / _sym_offset(b))
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = (hi - lo) / _code_max(b)
    scale = torch.where(constant, constant_step, scale)
    scale = round_to_scale_dtype(scale, fmt)  # [...]
    if fmt.symmetric:
        return scale, None
    zero = torch.clamp(torch.round(-lo / scale), 0, _code_max(b))  # [...]
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round-to-nearest codes, clamped to the grid.

    w: [..., g] fp32; scale, zero: [..., 1] or [..., g] (broadcast); zero None = symmetric
    returns [..., g] uint8 codes in 0 .. 2**bits-1
    """
    assert w.dtype == torch.float32, f"w must be fp32, got {w.dtype}"
    offset = _sym_offset(bits) if zero is None else zero
    q = torch.round(w / scale) + offset  # nearest level of the grid (q - z) * s; ties to even
    return torch.clamp(q, 0, _code_max(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """codes [..., g] uint8 with scale/zero [..., 1] or [..., g]; zero None = symmetric -> fp32 [..., g].

    (q - z) is a small integer and s has at most 11 significant bits, so the product is exact in fp32.
    """
    assert codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}"
    offset = _sym_offset(bits) if zero is None else zero
    return (codes.to(torch.float32) - offset) * scale


def search_shrink(
    w: torch.Tensor,
    fmt: QuantFormat,
    grid: tuple[float, ...] = DEFAULT_SHRINK_GRID,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group clipping search: the shrink in `grid` minimizing sum((w - deq(q(w)))**2 * weight).

    w: [..., g] fp32; weight: broadcastable to [..., g] (e.g. [g] per-input importance), default 1
    returns [...] fp32 shrink per group; ties keep the earliest grid entry
    """
    assert w.dtype == torch.float32, f"w must be fp32, got {w.dtype}"
    assert len(grid) > 0, "shrink grid is empty"
    if weight is not None:
        assert torch.broadcast_shapes(weight.shape, w.shape) == w.shape, (
            f"weight {tuple(weight.shape)} does not broadcast to w {tuple(w.shape)}"
        )
    w_min, w_max = _group_range(w)  # [...], [...]
    # every shrink of a chunk of the grid at once, [P, ..., g] (a few small operations per chunk, not
    # per grid entry: a group of 576 x 32 is too small for a torch operation's overhead to vanish);
    # the same fp32 operations as one entry at a time, so the same errors and the same choice
    per_chunk = max(1, _SHRINK_CHUNK_ELEMENTS // max(w.numel(), 1))
    best_err = best_shrink = None
    for start in range(0, len(grid), per_chunk):
        ps = torch.tensor(grid[start : start + per_chunk], dtype=torch.float32, device=w.device)  # [P]
        shrink = ps.reshape(-1, *([1] * w_min.dim())).expand(-1, *w_min.shape)  # [P, ...]
        scale, zero = _qparams_from_range(w_min.expand_as(shrink), w_max.expand_as(shrink), fmt, shrink)
        scale_ = scale.unsqueeze(-1)  # [P, ..., 1]
        offset = _sym_offset(fmt.bits) if zero is None else zero.unsqueeze(-1)  # [P, ..., 1]
        sq = torch.div(w, scale_).round_().add_(offset).clamp_(0, _code_max(fmt.bits))  # [P, ..., g]
        sq.sub_(offset).mul_(scale_).sub_(w).square_()
        if weight is not None:
            sq.mul_(weight)
        err, at = sq.sum(dim=-1).min(dim=0)  # [...]: the first of equal errors (the earlier grid entry)
        chosen = ps[at]
        if best_err is None:
            best_err, best_shrink = err, chosen
        else:
            better = err < best_err  # ties keep the earlier chunk's
            best_err, best_shrink = torch.where(better, err, best_err), torch.where(better, chosen, best_shrink)
    return best_shrink


def scale_keys(fmt: GroupedFormat) -> set[str]:
    """The storage keys of a grouped format's scales (`GroupedTensor.pack_scales`)."""
    return {"super_scales", "scale_codes"} if fmt.dq else {"scales"}


def unpack_group_scales(fmt: GroupedFormat, shape: tuple[int, int],
                        tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of `GroupedTensor.pack_scales`: (scales [N, G] fp32, super_scales [N, S] fp32 or None);
    raises FormatError on wrong dtypes or sizes, or scales that are not finite and positive (nonzero
    when fmt.signed_scales)."""
    n, k = shape
    g = fmt.num_groups(k)
    if fmt.dq:
        scales, d = unpack_scales(fmt, shape, tensors)
    else:
        scales, d = tensors["scales"], None
        if scales.dtype != fmt.scale_torch_dtype or tuple(scales.shape) != (n, g):
            raise FormatError(
                f"packed {fmt.name} scales must be {fmt.scale_torch_dtype} [{n}, {g}], "
                f"got {scales.dtype} {tuple(scales.shape)}"
            )
        scales = scales.to(torch.float32)  # [N, G]
    valid = (scales != 0) if fmt.signed_scales else (scales > 0)
    if not bool((torch.isfinite(scales) & valid).all()):
        raise FormatError(f"packed {fmt.name} scales must be finite and {'nonzero' if fmt.signed_scales else 'positive'}")
    return scales, d


class GroupedTensor:
    """What the tensors of grouped formats (uniform and grid) share: codes [N, K] uint8 and scales
    [N, G] fp32 of a `table.GroupedFormat`; with -dq also super_scales [N, S] fp32 (fp16 values),
    the scales then being on their grid (formats/double_quant.py), else None."""

    fmt: GroupedFormat
    codes: torch.Tensor
    scales: torch.Tensor
    super_scales: torch.Tensor | None

    def _check_codes_and_scales(self) -> None:
        assert self.codes.dtype == torch.uint8 and self.codes.dim() == 2, (
            f"codes must be uint8 [N, K], got {self.codes.dtype} {tuple(self.codes.shape)}"
        )
        n, k = self.codes.shape
        g = self.fmt.num_groups(k)
        assert self.scales.dtype == torch.float32 and self.scales.shape == (n, g), (
            f"scales must be fp32 [{n}, {g}], got {self.scales.dtype} {tuple(self.scales.shape)}"
        )
        if self.fmt.dq:
            s = self.fmt.num_super_blocks(k)
            assert self.super_scales is not None and self.super_scales.dtype == torch.float32 and (
                self.super_scales.shape == (n, s)), f"{self.fmt.name} needs super_scales fp32 [{n}, {s}]"
        else:
            assert self.super_scales is None, f"{self.fmt.name} has no super_scales"

    def pack_scales(self) -> dict[str, torch.Tensor]:
        """The stored scales: scales [N, G] in fmt.scale_dtype, or with -dq super_scales [N, S] fp16
        and scale_codes (double_quant.pack_scales)."""
        if self.fmt.dq:
            return pack_scales(self.scales, self.super_scales, self.fmt)
        return {"scales": self.scales.to(self.fmt.scale_torch_dtype)}

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return (n, k)

    def per_weight(self, stat: torch.Tensor) -> torch.Tensor:
        """A statistic per group [N, G] repeated over its group's columns: [N, K]."""
        k = self.shape[1]
        return stat.repeat_interleave(self.fmt.group_width(k), dim=1)[:, :k]

    def nbytes(self) -> LayerBytes:
        """Bytes of `pack()`: equals fmt.nbytes(N, K)."""
        return self.fmt.nbytes(*self.shape)

    def rows(self, rows: slice) -> "GroupedTensor":  # super_scales [N, S] too
        """The weight's rows `rows`, a tensor of the same type (its per-row fields sliced)."""
        return dataclasses.replace(self, **{f.name: v[rows] for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True, eq=False)
class QuantizedTensor(GroupedTensor):
    """A weight [N, K] in a QuantFormat, with unpacked fields.

    fmt:    the format
    codes:  [N, K] uint8, values in 0 .. 2**bits-1
    scales: [N, G] fp32, > 0, exactly representable in fmt.scale_dtype
    zeros:  [N, G] fp32 holding integers in 0 .. 2**bits-1 (asymmetric), None (symmetric)
    super_scales: [N, S] fp32 with -dq (GroupedTensor), else None
    """

    fmt: QuantFormat
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    super_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._check_codes_and_scales()
        n, g = self.scales.shape
        assert (self.zeros is None) == self.fmt.symmetric, (
            f"zeros must be {'None' if self.fmt.symmetric else 'a tensor'} for format {self.fmt.name}"
        )
        if self.zeros is not None:
            assert self.zeros.dtype == torch.float32 and self.zeros.shape == (n, g), (
                f"zeros must be fp32 [{n}, {g}], got {self.zeros.dtype} {tuple(self.zeros.shape)}"
            )

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32 weight."""
        zeros = None if self.zeros is None else self.per_weight(self.zeros)  # [N, K]
        return dequantize(self.codes, self.per_weight(self.scales), zeros, self.fmt.bits)  # [N, K]

    def pack(self) -> dict[str, torch.Tensor]:
        """Storage tensors; their bytes equal fmt.nbytes(N, K) exactly.

        qweight: [ceil(N*K*bits/8)] uint8, codes row-major, bit-packed LSB-first
        scales:  [N, G] in fmt.scale_dtype (-dq: super_scales and scale_codes, `pack_scales`)
        qzeros:  [ceil(N*G*bits/8)] uint8, zero points packed like the codes (asymmetric only)
        """
        out = {"qweight": pack_bits(self.codes, self.fmt.bits), **self.pack_scales()}
        if self.zeros is not None:
            out["qzeros"] = pack_bits(self.zeros.to(torch.uint8), self.fmt.bits)
        return out

    @classmethod
    def unpack(cls, fmt: QuantFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Inverse of `pack`; raises FormatError on missing/extra keys, wrong dtypes or sizes."""
        n, k = shape
        g = fmt.num_groups(k)
        expected_keys = {"qweight"} | scale_keys(fmt) | (set() if fmt.symmetric else {"qzeros"})
        if set(tensors) != expected_keys:
            raise FormatError(
                f"packed {fmt.name} tensor [{n}, {k}] needs keys {sorted(expected_keys)}, got {sorted(tensors)}"
            )
        codes = unpack_bits(tensors["qweight"], fmt.bits, n * k).view(n, k)  # [N, K]
        scales, super_scales = unpack_group_scales(fmt, shape, tensors)  # [N, G], [N, S] | None
        zeros = None
        if not fmt.symmetric:
            zeros = unpack_bits(tensors["qzeros"], fmt.bits, n * g).view(n, g).to(torch.float32)  # [N, G]
        return cls(fmt=fmt, codes=codes, scales=scales, zeros=zeros, super_scales=super_scales)


RTN_ROWS = 4096


def _rtn_rows(w: torch.Tensor, width: int, fmt: QuantFormat, clip_search: bool) -> tuple:
    """quantize_rtn on rows w [n, K'] whose groups are all `width` wide: codes [n, K'], scales
    [n, G'], zeros [n, G'] | None."""
    n, k = w.shape
    wg = w.reshape(n, k // width, width)  # [n, G', width]
    shrink = search_shrink(wg, fmt) if clip_search else 1.0  # [n, G'] or scalar
    scale, zero = choose_qparams(wg, fmt, shrink)  # [n, G'], [n, G'] | None
    zero_ = None if zero is None else zero.unsqueeze(-1)  # [n, G', 1]
    return quantize(wg, scale.unsqueeze(-1), zero_, fmt.bits).reshape(n, k), scale, zero


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat, *, clip_search: bool = True) -> QuantizedTensor:
    """Round-to-nearest quantization of w [N, K] fp32, with a per-group MSE clipping search, on
    RTN_ROWS rows at a time (each group is on its own; the search's temporaries are several times
    the rows it works on, and a 150k-token embedding is 0.9 GB)."""
    assert w.dtype == torch.float32 and w.dim() == 2, f"w must be fp32 [N, K], got {w.dtype} {tuple(w.shape)}"
    n, k = w.shape
    gw = fmt.group_width(k)
    full = (k // gw) * gw  # columns in full-width groups; the rest (if any) is one narrower group
    codes, scales, zeros = [], [], []
    for lo, hi in ((0, full), (full, k)):
        if hi == lo:
            continue
        width = min(gw, hi - lo)
        parts = [_rtn_rows(w[r : r + RTN_ROWS, lo:hi], width, fmt, clip_search) for r in range(0, n, RTN_ROWS)]
        codes.append(torch.cat([c for c, _, _ in parts]))
        scales.append(torch.cat([s for _, s, _ in parts]))
        zeros.append(None if fmt.symmetric else torch.cat([z for _, _, z in parts]))
    return QuantizedTensor(
        fmt=fmt,
        codes=torch.cat(codes, dim=1),
        scales=torch.cat(scales, dim=1),
        zeros=None if fmt.symmetric else torch.cat(zeros, dim=1),
    )

"""SpQR: the sparse-quantized representation (Dettmers et al., "SpQR: A Sparse-Quantized
Representation for Near-Lossless LLM Weight Compression", 2023).

A weight W [N, K] is stored as
  1. dense codes q [N, K] of `bits` bits in small first-level groups of g columns (8, 16, 32, 64);
  2. per group and row a scale s and a real-valued zero z; both statistics are themselves
     quantized to `stat_bits` bits in second-level groups of STAT_GROUP consecutive rows, each
     second-level group with an fp16 step a and an fp16 minimum m: s ~ a * q_s + m (same for z);
  3. a CSR table of outliers: for the rare weights whose rounding error would cost most, the
     residual r = w - (q - z) * s in fp16, with its column index (int16) and per-row pointers
     (int32). Dequantization is dense + sparse: W_hat = (q - z_hat) * s_hat + R.

Byte cost (every byte counted; G = ceil(K/g) groups per row, N2 = ceil(N/16)):
    codes      ceil(N*K*bits/8)
    scales     ceil(G*N*stat_bits/8) + G*N2*4       (codes of s, fp16 step + minimum per 16 rows)
    zeros      ceil(G*N*stat_bits/8) + G*N2*4
    outliers   4*(N+1) + nnz*(2 + 2)                 (row pointers, then value + column per outlier)
The format's nbytes(N, K) counts nnz at the outlier cap; a quantized tensor reports its actual nnz.

The statistics are chosen for the grid they are stored on (see `tightfit.algorithms.spqr.group_stats`):
a clip search and, per row, the best pair of second-level levels for scale and zero under GPTQ's
weighted loss, rather than min-max statistics rounded to their nearest levels. The stored layout does
not depend on how they were chosen.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, packed_nbytes, unpack_bits
from tightfit.formats.table import LayerBytes, group_bounds

SPQR_BITS = (2, 3, 4)
SPQR_GROUP_SIZES = (8, 16, 32, 64)  # 64: a 3-bit recipe near 3.2 bits/weight (spqr-w3g64-s3-o0.0)
STAT_BITS = (2, 3, 4)
STAT_GROUP = 16  # first-level statistics per second-level group (consecutive rows)
MAX_OUTLIER_PERCENT = 10.0

SPQR_GRAMMAR = (
    "expected spqr-w{bits}g{group}-s{stat_bits}-o{outlier_percent}, bits and stat_bits in {2, 3, 4}, "
    "group in {8, 16, 32, 64}, outlier percent from 0 to 10 (e.g. spqr-w3g16-s3-o1.0, spqr-w2g32-s3-o0.5)"
)
_NAME_RE = re.compile(r"spqr-w(?P<bits>\d+)g(?P<group>\d+)-s(?P<sbits>\d+)-o(?P<out>\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class SpQRFormat:
    """One SpQR recipe: dense bits and group size, statistic bits, outlier cap in percent."""

    bits: int
    group_size: int = 16
    stat_bits: int = 3
    outlier_percent: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in SPQR_BITS:
            raise FormatError(f"SpQR bits {self.bits!r} not supported; choose one of {SPQR_BITS}")
        if self.group_size not in SPQR_GROUP_SIZES:
            raise FormatError(f"SpQR group size {self.group_size!r} not supported; choose one of {SPQR_GROUP_SIZES}")
        if self.stat_bits not in STAT_BITS:
            raise FormatError(f"SpQR statistic bits {self.stat_bits!r} not supported; choose one of {STAT_BITS}")
        if not (0.0 <= float(self.outlier_percent) <= MAX_OUTLIER_PERCENT):
            raise FormatError(f"SpQR outlier percent {self.outlier_percent!r} must lie in [0, {MAX_OUTLIER_PERCENT}]")

    symmetric = False  # dense codes always carry a (quantized, real-valued) zero

    @property
    def name(self) -> str:
        return f"spqr-w{self.bits}g{self.group_size}-s{self.stat_bits}-o{float(self.outlier_percent):.1f}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> "SpQRFormat":
        m = _NAME_RE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if m is None:
            raise FormatError(f"cannot parse SpQR format {text!r}: {SPQR_GRAMMAR}")
        try:
            return cls(int(m["bits"]), int(m["group"]), int(m["sbits"]), float(m["out"]))
        except FormatError as e:
            raise FormatError(f"invalid SpQR format {text!r}: {e}") from None

    def num_groups(self, in_features: int) -> int:
        return len(group_bounds(in_features, self.group_size))

    def group_width(self, in_features: int) -> int:
        return min(self.group_size, in_features)

    def group_bounds(self, in_features: int) -> list[tuple[int, int]]:
        return group_bounds(in_features, self.group_size)

    def max_outliers(self, out_features: int, in_features: int) -> int:
        return math.floor(self.outlier_percent / 100.0 * out_features * in_features)

    def nbytes(self, out_features: int, in_features: int, n_outliers: int | None = None) -> LayerBytes:
        """Exact bytes of a [N, K] layer with n_outliers outliers (default: the cap)."""
        n, k = out_features, in_features
        g = self.num_groups(k)
        nnz = self.max_outliers(n, k) if n_outliers is None else n_outliers
        stats = packed_nbytes(g * n, self.stat_bits) + g * math.ceil(n / STAT_GROUP) * 4
        return LayerBytes(
            codes=packed_nbytes(n * k, self.bits),
            scales=stats,
            zeros=stats,
            outliers=4 * (n + 1) + 4 * nnz,
        )

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.nbytes(out_features, in_features).total * 8 / (out_features * in_features)


# ---- second-level statistics ---------------------------------------------------------------


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x rounded to fp16, then moved one fp16 step toward `direction` where rounding went the other way."""
    h = x.to(torch.float16)
    wrong = h.float() > x if direction < 0 else h.float() < x
    stepped = torch.nextafter(h, torch.full_like(h, direction))
    return torch.where(wrong, stepped, h).float()


def quantize_stats(x: torch.Tensor, bits: int, *, integer_ends: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize statistics x [R, N] in groups of STAT_GROUP consecutive entries along N.

    Returns codes [R, N] uint8, step [R, N2] and minimum [R, N2] (fp32, fp16-representable) with
    x_hat = codes * step + minimum. The minimum is rounded down to fp16 and the step up, so the
    grid covers the whole range; integer_ends widens each group's range to [floor(min), ceil(max)].
    """
    r, n = x.shape
    n2 = math.ceil(n / STAT_GROUP)
    pad = n2 * STAT_GROUP - n
    padded = torch.cat([x, x[:, -1:].expand(r, pad)], dim=1) if pad else x  # [R, N2*16]
    groups = padded.view(r, n2, STAT_GROUP)  # [R, N2, 16]
    lo = groups.amin(dim=-1)  # [R, N2]
    hi = groups.amax(dim=-1)
    if integer_ends:
        lo, hi = torch.floor(lo), torch.ceil(hi)
    minimum = _fp16_toward(lo, -math.inf)
    levels = (1 << bits) - 1
    step = torch.clamp(_fp16_toward((hi - minimum) / levels, math.inf), min=torch.finfo(torch.float16).tiny)
    codes = torch.clamp(torch.round((groups - minimum.unsqueeze(-1)) / step.unsqueeze(-1)), 0, levels)
    return codes.reshape(r, n2 * STAT_GROUP)[:, :n].to(torch.uint8), step, minimum


def dequantize_stats(codes: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """codes [R, N] uint8, step/minimum [R, N2] -> x_hat [R, N] fp32."""
    n = codes.shape[1]
    step_n = step.repeat_interleave(STAT_GROUP, dim=1)[:, :n]
    min_n = minimum.repeat_interleave(STAT_GROUP, dim=1)[:, :n]
    return codes.to(torch.float32) * step_n + min_n


# ---- dense codes with real-valued zeros -----------------------------------------------------


def quantize_dense(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s + z), 0, 2**bits - 1); w [..., g], scale/zero broadcast -> uint8."""
    return torch.clamp(torch.round(w / scale + zero), 0, (1 << bits) - 1).to(torch.uint8)


def dequantize_dense(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.float32) - zero) * scale


@dataclass(frozen=True)
class StatCodes:
    """One statistic (scale or zero) quantized at the second level: x_hat = codes * step + minimum.

    codes [..., N] uint8; step, minimum [..., N2] fp32 (fp16-representable), N2 = ceil(N / 16).
    """

    codes: torch.Tensor
    step: torch.Tensor
    minimum: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, bits: int) -> "StatCodes":
        """Quantize x [R, N]."""
        return cls(*quantize_stats(x, bits))

    def dequantize(self) -> torch.Tensor:
        return dequantize_stats(self.codes, self.step, self.minimum)

    @classmethod
    def stack(cls, parts: list["StatCodes"]) -> "StatCodes":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "step", "minimum")))


# ---- the quantized tensor ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpQRTensor:
    """A weight [N, K] in an SpQRFormat, fields unpacked.

    codes [N, K] uint8; scale, zero: StatCodes with codes [G, N] (row g: group g's statistic for
    every output row); outliers in CSR: rowptr [N+1] int64, cols [nnz] int64, values [nnz] fp32
    (fp16-representable residuals added to the dense dequantized weight).
    """

    fmt: SpQRFormat
    codes: torch.Tensor
    scale: StatCodes
    zero: StatCodes
    rowptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g, n2 = self.fmt.num_groups(k), math.ceil(n / STAT_GROUP)
        assert self.codes.dtype == torch.uint8
        for stat in (self.scale, self.zero):
            assert stat.codes.shape == (g, n) and stat.step.shape == stat.minimum.shape == (g, n2), (stat.codes.shape, g, n)
        assert self.rowptr.shape == (n + 1,) and self.cols.shape == self.values.shape == (int(self.rowptr[-1]),)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return (n, k)

    @property
    def n_outliers(self) -> int:
        return int(self.values.numel())

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized first-level scale and zero, each [N, G]."""
        s = torch.clamp(self.scale.dequantize(), min=torch.finfo(torch.float16).tiny)  # [G, N]
        return s.T, self.zero.dequantize().T

    def dense(self) -> torch.Tensor:
        """[N, K] fp32: the dense part only, (q - z_hat) * s_hat."""
        n, k = self.shape
        gw = self.fmt.group_width(k)
        s, z = self.statistics()
        s = s.repeat_interleave(gw, dim=1)[:, :k]
        z = z.repeat_interleave(gw, dim=1)[:, :k]
        return dequantize_dense(self.codes, s, z)

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32: dense + sparse outlier residuals."""
        w = self.dense()
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.rowptr.diff())
        w[rows, self.cols] += self.values
        return w

    def nbytes(self) -> LayerBytes:
        return self.fmt.nbytes(*self.shape, n_outliers=self.n_outliers)

    def pack(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_bits(self.codes, self.fmt.bits)}
        for name, stat in (("scale", self.scale), ("zero", self.zero)):
            out[f"{name}_q"] = pack_bits(stat.codes, self.fmt.stat_bits)
            out[f"{name}_step"] = stat.step.half()
            out[f"{name}_min"] = stat.minimum.half()
        out.update(outlier_rowptr=self.rowptr.to(torch.int32), outlier_cols=self.cols.to(torch.int16),
                   outlier_values=self.values.half())
        return out

    @classmethod
    def unpack(cls, fmt: SpQRFormat, shape: tuple[int, int], t: dict[str, torch.Tensor]) -> "SpQRTensor":
        n, k = shape
        g, n2 = fmt.num_groups(k), math.ceil(n / STAT_GROUP)
        expected = {"qweight", "scale_q", "scale_step", "scale_min", "zero_q", "zero_step", "zero_min",
                    "outlier_rowptr", "outlier_cols", "outlier_values"}
        if set(t) != expected:
            raise FormatError(f"packed {fmt.name} tensor needs keys {sorted(expected)}, got {sorted(t)}")
        for key in ("scale_step", "scale_min", "zero_step", "zero_min"):
            if t[key].dtype != torch.float16 or tuple(t[key].shape) != (g, n2):
                raise FormatError(f"packed {fmt.name} {key} must be float16 [{g}, {n2}], got {t[key].dtype} {tuple(t[key].shape)}")
        rowptr = t["outlier_rowptr"].to(torch.int64)
        nnz = t["outlier_values"].numel()
        if rowptr.shape != (n + 1,) or rowptr[0] != 0 or rowptr[-1] != nnz or bool((rowptr.diff() < 0).any()):
            raise FormatError(f"packed {fmt.name} outlier row pointers are inconsistent")
        cols = t["outlier_cols"].to(torch.int64)
        if cols.numel() != nnz or (nnz and (int(cols.min()) < 0 or int(cols.max()) >= k)):
            raise FormatError(f"packed {fmt.name} outlier columns are out of range")
        stat = lambda name: StatCodes(  # noqa: E731
            unpack_bits(t[f"{name}_q"], fmt.stat_bits, g * n).view(g, n), t[f"{name}_step"].float(), t[f"{name}_min"].float()
        )
        return cls(fmt=fmt, codes=unpack_bits(t["qweight"], fmt.bits, n * k).view(n, k), scale=stat("scale"),
                   zero=stat("zero"), rowptr=rowptr, cols=cols, values=t["outlier_values"].float())


# Recipes worth listing (the planner may use any valid combination).
SPQR_RECIPES: tuple[SpQRFormat, ...] = tuple(
    SpQRFormat(b, g, 3, o) for b in SPQR_BITS for g in (16, 32, 64) for o in (0.0, 0.5, 1.0)
)

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

The statistics are chosen for the grid they are stored on (see `group_stats`): a clip search and,
per row, the best pair of second-level levels for scale and zero under GPTQ's weighted loss, rather
than min-max statistics rounded to their nearest levels. The stored layout does not depend on how
they were chosen.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, unpack_bits
from tightfit.formats.primitives import DEFAULT_SHRINK_GRID
from tightfit.formats.table import LayerBytes, group_bounds, packed_nbytes

SPQR_BITS = (2, 3, 4)
SPQR_GROUP_SIZES = (8, 16, 32, 64)  # 64: a 3-bit recipe near 3.2 bits/weight (spqr-w3g64-s3-o0.0)
STAT_BITS = (2, 3, 4)
STAT_GROUP = 16  # first-level statistics per second-level group (consecutive rows)
MAX_OUTLIER_PERCENT = 10.0
OUTLIER_RELATIVE_THRESHOLD = 0.2  # SpQR's default: a weight is an outlier candidate when keeping it
# exact saves more than this fraction of its row's mean group error

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


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


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


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one first-level group column for all N rows: scale and zero [N] as decoded,
    and how they are stored (StatCodes over a [1, N] row)."""

    scale: torch.Tensor
    zero: torch.Tensor
    scale_q: StatCodes
    zero_q: StatCodes


def _group_loss(w: torch.Tensor, keep: torch.Tensor | None, importance: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, bits: int) -> torch.Tensor:
    """sum_j importance_j (w_j - w_hat_j)^2 over the weights not kept exact, w_hat on the grid (q - z) * s.

    w [N, g]; keep [N, g] bool or None; importance [g]; scale, zero [N, C] (C candidates per row)
    -> [N, C].
    """
    q = torch.clamp(torch.round(w.unsqueeze(1) / scale.unsqueeze(2) + zero.unsqueeze(2)), 0, (1 << bits) - 1)  # [N, C, g]
    err = ((q - zero.unsqueeze(2)) * scale.unsqueeze(2) - w.unsqueeze(1)).square_() * importance  # [N, C, g]
    if keep is not None:
        err = err.masked_fill_(keep.unsqueeze(1), 0.0)
    return err.sum(-1)


def _levels(q: StatCodes, n: int, bits: int) -> torch.Tensor:
    """Every level of the second-level grid of each of n rows: [1, N] StatCodes -> [N, 2**bits]."""
    codes = torch.arange(1 << bits, dtype=torch.float32)
    step_n = q.step.repeat_interleave(STAT_GROUP, dim=1)[0, :n]  # [N]
    min_n = q.minimum.repeat_interleave(STAT_GROUP, dim=1)[0, :n]
    return codes * step_n.unsqueeze(1) + min_n.unsqueeze(1)


def _best_pairs(w: torch.Tensor, keep: torch.Tensor | None, importance: torch.Tensor, scale_levels: torch.Tensor,
                zero_levels: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the (scale level, zero level) pair with the least `_group_loss`; levels [N, L].
    Returns loss [N], scale code [N], zero code [N] (int64; first minimum on ties)."""
    n, levels = scale_levels.shape
    best_loss = torch.full((n,), math.inf)
    best_s, best_z = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for si in range(levels):  # one scale level at a time: [N, L, g] stays small
        loss = _group_loss(w, keep, importance, scale_levels[:, si : si + 1].expand(n, levels), zero_levels, bits)
        row_best, zi = loss.min(dim=1)  # [N]
        better = row_best < best_loss
        best_loss = torch.where(better, row_best, best_loss)
        best_s = torch.where(better, torch.full_like(best_s, si), best_s)
        best_z = torch.where(better, zi, best_z)
    return best_loss, best_s, best_z


def group_stats(w: torch.Tensor, keep: torch.Tensor | None, fmt: SpQRFormat,
                importance: torch.Tensor | None = None) -> GroupStats:
    """Statistics of one group w [N, g] minimizing the importance-weighted error of the weights not
    kept exact (keep [N, g] bool), on the grid that is finally stored. importance [g] weighs the
    columns; GPTQ passes 1 / d_j^2 with d its Cholesky diagonal, so that the loss is GPTQ's own
    objective sum_j ((w_j - w_hat_j) / d_j)^2 (the weighting SpQR uses to find outliers); None = 1.

      1. Min-max scale and real zero over the weights not kept. As in GPTQ (and SpQR's reference)
         the range always contains 0, so the zero point lies in [0, 2**bits - 1] and stays finite
         for any group; a group that is all zeros (or all outliers) gets the range [0, 1].
      2. Clipping: the range is shrunk toward 0 by the factor of DEFAULT_SHRINK_GRID with the least
         loss, per row (the MSE clip search of the uniform formats, here loss-weighted).
      3. Both statistics are quantized at the second level (min-max over STAT_GROUP rows), then each
         row takes the pair (scale level, zero level) of those grids with the least loss: an
         exhaustive search over 2**stat_bits x 2**stat_bits pairs. Rounding each statistic to its
         nearest level instead leaves the grid offset by up to half a zero step, which costs most
         where it matters most: inputs with massive activations (e.g. SmolLM2's last down_proj) meet
         tiny weights that a zero on an exact grid point would have kept exact.
    """
    n, g = w.shape
    levels = (1 << fmt.bits) - 1
    importance = torch.ones(g) if importance is None else importance
    assert importance.shape == (g,), (importance.shape, g)
    if keep is None:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
    else:
        lo = torch.where(keep, torch.full_like(w, math.inf), w).amin(dim=1)
        hi = torch.where(keep, torch.full_like(w, -math.inf), w).amax(dim=1)
        empty = ~torch.isfinite(lo)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    hi = torch.where(hi == lo, torch.ones_like(hi), hi)
    scale = torch.clamp((hi - lo) / levels, min=1e-8)  # [N]
    zero = -lo / scale  # [N], real-valued; shrinking the range [lo, hi] by p scales s by p, keeps z

    shrinks = torch.tensor(DEFAULT_SHRINK_GRID)  # [P], 1.0 first: ties keep the full range
    loss = _group_loss(w, keep, importance, scale.unsqueeze(1) * shrinks, zero.unsqueeze(1).expand(n, len(shrinks)), fmt.bits)
    scale = scale * shrinks[loss.argmin(dim=1)]  # [N]; argmin returns the first minimum

    tiny = torch.finfo(torch.float16).tiny  # decoded scales are clamped to it (SpQRTensor.statistics)
    scale_q = StatCodes.of(scale.unsqueeze(0), fmt.stat_bits)  # [1, N]
    scale_levels = torch.clamp(_levels(scale_q, n, fmt.stat_bits), min=tiny)  # [N, L]
    # Two candidate grids for the zero of each second-level group, min-max and min-max widened to
    # integers (whose end levels put 0 exactly on the first-level grid); each group keeps the one
    # with the smaller loss. Both are stored alike: the choice needs no flag.
    n2 = scale_q.step.shape[1]
    best = None
    for integer_ends in (False, True):
        zero_q = StatCodes(*quantize_stats(zero.unsqueeze(0), fmt.stat_bits, integer_ends=integer_ends))
        loss, s_code, z_code = _best_pairs(w, keep, importance, scale_levels, _levels(zero_q, n, fmt.stat_bits), fmt.bits)  # [N] each
        pad = n2 * STAT_GROUP - n
        group_loss = torch.cat([loss, loss.new_zeros(pad)]).view(n2, STAT_GROUP).sum(1)  # [N2]
        if best is None:
            best = (group_loss, zero_q, s_code, z_code)
            continue
        take = group_loss < best[0]  # [N2]
        take_n = take.repeat_interleave(STAT_GROUP)[:n]  # [N]
        best = (torch.where(take, group_loss, best[0]),
                StatCodes(best[1].codes, torch.where(take, zero_q.step, best[1].step), torch.where(take, zero_q.minimum, best[1].minimum)),
                torch.where(take_n, s_code, best[2]), torch.where(take_n, z_code, best[3]))
    _, zero_q, s_code, z_code = best
    scale_q = dataclasses.replace(scale_q, codes=s_code.to(torch.uint8).unsqueeze(0))
    zero_q = dataclasses.replace(zero_q, codes=z_code.to(torch.uint8).unsqueeze(0))
    s_hat = torch.clamp(scale_q.dequantize()[0], min=tiny)
    return GroupStats(s_hat, zero_q.dequantize()[0], scale_q, zero_q)


def outlier_candidates(w: torch.Tensor, d: torch.Tensor, fmt: SpQRFormat, cap: int) -> torch.Tensor:
    """SpQR's criterion for one group w [N, g] with GPTQ's Cholesky diagonal d [g]: -> keep [N, g].

    For every weight, the group's loss sum_j ((w_j - w_hat_j) / d_j)^2 is recomputed with that
    weight left out of the min-max statistics and kept exact (leave-one-out). Weights whose
    exclusion reduces the loss by more than OUTLIER_RELATIVE_THRESHOLD x the mean per-row loss are
    candidates; at most `cap` of them, the largest reductions, are kept.
    """
    n, g = w.shape
    if cap <= 0 or g < 2:
        return torch.zeros(n, g, dtype=torch.bool)
    levels = (1 << fmt.bits) - 1
    inv_d2 = 1.0 / (d * d)  # [g]

    def loss(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # values [..., g], mask = exact
        big = torch.full_like(values, math.inf)
        lo = torch.clamp(torch.where(mask, big, values).amin(-1, keepdim=True), max=0.0)  # the range holds 0,
        hi = torch.clamp(torch.where(mask, -big, values).amax(-1, keepdim=True), min=0.0)  # as in group_stats
        scale = torch.clamp((hi - lo) / levels, min=1e-8)
        w_hat = (torch.clamp(torch.round((values - lo) / scale), 0, levels)) * scale + lo
        err = torch.where(mask, torch.zeros_like(values), (values - w_hat) ** 2) * inv_d2
        return err.sum(-1)

    base = loss(w, torch.zeros_like(w, dtype=torch.bool))  # [N]
    eye = torch.eye(g, dtype=torch.bool)  # leave out weight j: mask row j
    loo = loss(w.unsqueeze(1).expand(n, g, g), eye.expand(n, g, g))  # [N, g]
    reduction = base.unsqueeze(1) - loo  # [N, g]
    threshold = OUTLIER_RELATIVE_THRESHOLD * base.mean()
    candidates = reduction > threshold
    keep = torch.zeros(n * g, dtype=torch.bool)
    flat = torch.where(candidates, reduction, torch.full_like(reduction, -math.inf)).reshape(-1)
    k = min(cap, int(candidates.sum()))
    if k > 0:
        keep[torch.topk(flat, k).indices] = True
    return keep.view(n, g)


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


class SpQRBuilder:
    """Builds an SpQRTensor group by group and column by column (used by RTN and GPTQ alike).

    start_group(gi, w_group [N, g], d [g]) chooses outliers and statistics of group gi from the
    current weights; quantize_column(col, w_col [N]) returns the decoded column W_hat[:, col].
    """

    def __init__(self, fmt: SpQRFormat, shape: tuple[int, int]) -> None:
        n, k = shape
        if k >= 1 << 15:
            raise FormatError(f"SpQR stores outlier columns as int16: in_features {k} is too large")
        self.fmt, self.shape = fmt, shape
        self.bounds = fmt.group_bounds(k)
        g = len(self.bounds)
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.stats: list[GroupStats | None] = [None] * g
        self.keep = torch.zeros(n, k, dtype=torch.bool)
        self.residual = torch.zeros(n, k)
        self._current: tuple[int, int, GroupStats] | None = None
        self._cap_left = fmt.max_outliers(n, k)

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        """w [N, g] current weights of group gi's columns `cols` (original indices; default in order), d [g]."""
        lo, hi = self.bounds[gi]
        assert w.shape == (self.shape[0], hi - lo), (w.shape, hi - lo)
        cols = torch.arange(lo, hi) if cols is None else cols
        n = self.shape[0]
        # the cap is spread evenly: this group may use its share plus what earlier groups left
        share = math.floor(self.fmt.outlier_percent / 100.0 * n * (hi - lo))
        keep = outlier_candidates(w, d, self.fmt, min(self._cap_left, share))
        self._cap_left -= int(keep.sum())
        self.keep[:, cols] = keep
        stats = group_stats(w, keep if bool(keep.any()) else None, self.fmt, importance=1.0 / (d * d))
        self.stats[gi] = stats
        self._current = (lo, hi, stats)

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        lo, hi, stats = self._current
        assert lo <= col < hi, (lo, hi, col)
        q = quantize_dense(w, stats.scale, stats.zero, self.fmt.bits)
        self.codes[:, col] = q
        w_hat = dequantize_dense(q, stats.scale, stats.zero)
        keep = self.keep[:, col]
        if bool(keep.any()):
            r = _fp16(w - w_hat)
            self.residual[:, col] = torch.where(keep, r, torch.zeros_like(r))
            w_hat = torch.where(keep, w_hat + r, w_hat)
        return w_hat

    def result(self) -> SpQRTensor:
        assert all(s is not None for s in self.stats), "every group must be started"
        rows, cols = self.keep.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(rows, minlength=self.shape[0])
        rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return SpQRTensor(
            fmt=self.fmt, codes=self.codes,
            scale=StatCodes.stack([s.scale_q for s in self.stats]),  # [G, N]
            zero=StatCodes.stack([s.zero_q for s in self.stats]),
            rowptr=rowptr, cols=cols, values=self.residual[rows, cols],
        )


def quantize_spqr_rtn(w: torch.Tensor, fmt: SpQRFormat) -> SpQRTensor:
    """SpQR without error compensation: outliers by plain squared error, statistics min-max."""
    assert w.dtype == torch.float32 and w.dim() == 2
    builder = SpQRBuilder(fmt, tuple(w.shape))
    for gi, (lo, hi) in enumerate(builder.bounds):
        builder.start_group(gi, w[:, lo:hi], torch.ones(hi - lo))
        for col in range(lo, hi):
            builder.quantize_column(col, w[:, col])
    return builder.result()


# Recipes worth listing (the planner may use any valid combination).
SPQR_RECIPES: tuple[SpQRFormat, ...] = tuple(
    SpQRFormat(b, g, 3, o) for b in SPQR_BITS for g in (16, 32, 64) for o in (0.0, 0.5, 1.0)
)

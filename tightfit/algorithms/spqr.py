"""SpQR's quantization algorithm: the choice of outliers and statistics for one group, and a
builder that produces an SpQRTensor column by column (Dettmers et al., "SpQR: A Sparse-Quantized
Representation for Near-Lossless LLM Weight Compression", 2023). The stored layout and its byte
cost live in `tightfit.formats.spqr`; how the statistics are chosen does not change it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tightfit.errors import FormatError
from tightfit.formats.primitives import DEFAULT_SHRINK_GRID
from tightfit.formats.spqr import (
    STAT_GROUP,
    SpQRFormat,
    SpQRTensor,
    StatCodes,
    dequantize_dense,
    quantize_dense,
    quantize_stats,
)

OUTLIER_RELATIVE_THRESHOLD = 0.2  # SpQR's default: a weight is an outlier candidate when keeping it
# exact saves more than this fraction of its row's mean group error


# ---- statistics of one group ----------------------------------------------------------------


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
    # in place on one [N, C, g] buffer; kept weights weigh 0 (the same sums as zeroing their finite errors)
    weight = importance if keep is None else (importance * ~keep).unsqueeze(1)  # [g] or [N, 1, g]
    q = (w.unsqueeze(1) / scale.unsqueeze(2)).add_(zero.unsqueeze(2)).round_().clamp_(0, (1 << bits) - 1)  # [N, C, g]
    return q.sub_(zero.unsqueeze(2)).mul_(scale.unsqueeze(2)).sub_(w.unsqueeze(1)).square_().mul_(weight).sum(-1)


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


# ---- outliers -------------------------------------------------------------------------------


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

    def loss(values: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # values [..., g]; weight [..., g]: 1 / d^2, 0 where kept exact; lo, hi [..., 1]: the min and max
        # of the values not kept. In place on one buffer of values' shape.
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range holds 0, as in group_stats
        scale = torch.clamp((hi - lo) / levels, min=1e-8)
        w_hat = (values - lo).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(lo)
        return w_hat.sub_(values).square_().mul_(weight).sum(-1)

    base = loss(w, inv_d2, w.amin(1, keepdim=True), w.amax(1, keepdim=True))  # [N]
    # leave out weight j: the row's min and max without it are its second smallest / largest where j holds
    # the first (top-2 per row instead of a [N, g, g] reduction; the same values)
    two_lo, two_hi = w.topk(2, dim=1, largest=False), w.topk(2, dim=1)
    cols = torch.arange(g)
    lo_j = torch.where(cols == two_lo.indices[:, :1], two_lo.values[:, 1:], two_lo.values[:, :1])  # [N, g]
    hi_j = torch.where(cols == two_hi.indices[:, :1], two_hi.values[:, 1:], two_hi.values[:, :1])
    loo_weight = inv_d2 * ~torch.eye(g, dtype=torch.bool)  # leave out weight j: row j weighs it 0
    loo = loss(w.unsqueeze(1).expand(n, g, g), loo_weight, lo_j.unsqueeze(2), hi_j.unsqueeze(2))  # [N, g]
    reduction = base.unsqueeze(1) - loo  # [N, g]
    threshold = OUTLIER_RELATIVE_THRESHOLD * base.mean()
    candidates = reduction > threshold
    keep = torch.zeros(n * g, dtype=torch.bool)
    flat = torch.where(candidates, reduction, torch.full_like(reduction, -math.inf)).reshape(-1)
    k = min(cap, int(candidates.sum()))
    if k > 0:
        keep[torch.topk(flat, k).indices] = True
    return keep.view(n, g)


# ---- the tensor, column by column -----------------------------------------------------------


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


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

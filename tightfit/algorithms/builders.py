"""Per format family, how a weight is quantized: column by column by a builder (GPTQ's inner
loop: the builder chooses each group's parameters and decodes columns, GPTQ orders columns and
spreads errors), or all at once by round to nearest. Formats are looked up by type."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from tightfit.algorithms.spqr import SpQRBuilder, quantize_spqr_rtn
from tightfit.formats.grid import (
    GridFormat,
    GridTensor,
    choose_level_scale,
    grid_levels,
    level_values,
    nearest_level,
    nearest_value,
    quantize_grid_rtn,
)
from tightfit.formats.double_quant import choose_super_scales, snap_group
from tightfit.formats.lut import LutFormat, LutTensor, fit_levels, quantize_lut_rtn
from tightfit.formats.primitives import QuantizedTensor, choose_qparams, dequantize, quantize, quantize_rtn, search_shrink
from tightfit.formats.registry import AnyQuantizedTensor, Format
from tightfit.formats.spqr import SpQRFormat
from tightfit.formats.table import GroupedFormat, QuantFormat

# -dq (double-quantized scales), measured on smollm2-135m (Hessian-weighted error tr(dW H dW^T),
# H from 512 tokens; the figures are in formats/double_quant.py's docstring):
# - RTN: the weights never move, so d comes from the groups' own scales (headroom 1). Rounding each
#   scale's code up beats nearest in every format tried (w3g16 -2.2 % vs +0.5 % of the base format's
#   error, w4g32-sym -5.1 % vs +0.4 %, nl4g32 -2.8 % vs +1.4 %): the clipping search minimizes the
#   plain squared error and clips more than the Hessian-weighted error likes; a larger code undoes
#   some of it.
# - GPTQ chooses a group's scale when it reaches the group, from weights that earlier errors have
#   moved, but the group's super-scale d must be known then (its super-block's other groups are not
#   reached yet). So d is fixed up front from each group's scale on the original weights times
#   DQ_GPTQ_HEADROOM, and each scale GPTQ picks is snapped onto d * c (DQ_GPTQ_ROUNDING). The moved weights
#   outgrow the original range: headroom 1.0 costs +4.9 % over base w3g32, 1.1 +0.8 %, 1.25 0.0 %
#   (w4g32-sym +2.8 / +0.8 / +0.5 %, nl4g32 +4.3 / +2.6 / +3.1 %, nearest code). Rounding up is
#   worse here (nl4g32 +8-10 %); "best" (the lower or upper code, whichever gives the group the
#   smaller squared error) ties nearest on w3g32 (+0.7 / +0.0 % at 1.1 / 1.25) and beats it on
#   nl4g32 (+2.4 / +2.6 %), whose signed codes (|c| <= 31) are coarser.
DQ_RTN_ROUNDING, DQ_RTN_HEADROOM = "up", 1.0
DQ_GPTQ_ROUNDING, DQ_GPTQ_HEADROOM = "best", 1.25


def loss_weight(d: torch.Tensor | None) -> torch.Tensor | None:
    """GPTQ's weight of each column's rounding error, 1 / d_j^2 (d [g]: the inverse Hessian's Cholesky
    diagonal of the group's columns; the loss GPTQ propagates is sum_j (w_j - w_hat_j)^2 / d_j^2),
    scaled to mean 1. None without d (round to nearest: every column alike).

    A group's scale chosen on this weighted error instead of the plain squared error (as SpQR's
    statistics are, and llama.cpp's scales with an importance matrix): on smollm2-135m blocks 3 and 15,
    GPTQ from 512 tokens, the Hessian-weighted error tr(dW H dW^T) on the next 512 tokens falls by
    5.1 % (w4g32-sym), 3.7 % (w3g32), 3.6 % (w4g64), 5.8 % (nl4g32); weighting by the Hessian diagonal
    instead gives -0.4 / -0.3 / +2.8 / -4.0 %."""
    if d is None:
        return None
    wt = 1.0 / d.float().square()  # [g]
    return wt / wt.mean()


class SuperScaled:
    """What the uniform and grid builders share for -dq formats: super-scales d [N, S] fixed before
    the sweep, and each group's chosen scale snapped onto them (None: not a -dq format)."""

    fmt: GroupedFormat
    shape: tuple[int, int]
    super_scales: torch.Tensor | None = None

    def choose(self, w: torch.Tensor) -> torch.Tensor:
        """The (unsnapped) scale [N] the builder picks for a group of weights w [N, g]."""
        raise NotImplementedError

    def fix_super_scales(self, w: torch.Tensor, headroom: float | None = None, rounding: str | None = None) -> None:
        """d from each group's scale chosen on w [N, K] (the original weights), times headroom; the
        groups' scales will be snapped to it by `rounding` (double_quant.codes_on, or "best").
        Defaults: GPTQ's, DQ_GPTQ_HEADROOM and DQ_GPTQ_ROUNDING."""
        k = w.shape[1]
        headroom = DQ_GPTQ_HEADROOM if headroom is None else headroom
        self.rounding = DQ_GPTQ_ROUNDING if rounding is None else rounding
        scales = torch.stack([self.choose(w[:, lo:hi]) for lo, hi in self.fmt.group_bounds(k)], dim=1)  # [N, G]
        self.super_scales = choose_super_scales(scales, self.fmt, k, headroom)  # [N, S]
        self._super_of = self.fmt.super_block_of_groups(k).tolist()

    def snap(self, gi: int, scale: torch.Tensor, w: torch.Tensor,
             error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Group gi's scales [N] on its super-block's grid. rounding "best": of the codes below and
        above |s| / d, the one whose scale gives the group w [N, g] the smaller error(w, scale) [N]
        (the builder's weighted error)."""
        d = self.super_scales[:, self._super_of[gi]]  # [N]
        if self.rounding != "best":
            return snap_group(scale, d, self.fmt, self.rounding)
        down, up = snap_group(scale, d, self.fmt, "down"), snap_group(scale, d, self.fmt, "up")
        return torch.where(error(w, up) < error(w, down), up, down)


class UniformBuilder(SuperScaled):
    """Builds a QuantizedTensor group by group and column by column (GPTQ's inner loop).

    start_group(gi, w [N, g], d [g], cols [g]) chooses group gi's scale and zero from the current
    weights w of its columns `cols` (original indices, any order), the clipping searched on GPTQ's
    loss (loss_weight(d); d: GPTQ's Cholesky diagonal of those columns, None: plain squared error);
    quantize_column(col, w [N]) stores that column's codes and returns its decoded values.
    """

    def __init__(self, fmt: QuantFormat, shape: tuple[int, int], *, clip_search: bool = True) -> None:
        n, k = shape
        self.fmt, self.shape, self.clip_search = fmt, shape, clip_search
        self.bounds = fmt.group_bounds(k)
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.scales = torch.zeros(n, len(self.bounds))
        self.zeros = None if fmt.symmetric else torch.zeros(n, len(self.bounds))
        self._scale: torch.Tensor | None = None
        self._zero: torch.Tensor | None = None

    def _qparams(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        shrink = search_shrink(w, self.fmt, weight=weight) if self.clip_search else 1.0
        return choose_qparams(w, self.fmt, shrink)  # [N], [N] | None

    def choose(self, w: torch.Tensor) -> torch.Tensor:
        return self._qparams(w)[0]

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        weight = loss_weight(d)  # [g] | None
        scale, zero = self._qparams(w, weight)  # [N], [N] | None
        if self.super_scales is not None:
            snapped = self.snap(gi, scale, w, lambda w_, s_: self._error(w_, s_, self._zero_on(zero, scale, s_), weight))
            scale, zero = snapped, self._zero_on(zero, scale, snapped)
        self.scales[:, gi] = scale
        if self.zeros is not None:
            self.zeros[:, gi] = zero
        self._scale = scale.unsqueeze(1)  # [N, 1]
        self._zero = None if zero is None else zero.unsqueeze(1)

    def _zero_on(self, zero: torch.Tensor | None, scale: torch.Tensor, snapped: torch.Tensor) -> torch.Tensor | None:
        """The zero point [N] on the snapped scale [N] keeping the low end -z s of the chosen range."""
        return None if zero is None else torch.clamp(torch.round(zero * scale / snapped), 0, (1 << self.fmt.bits) - 1)

    def _error(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
        """Squared rounding error [N] of the group w [N, g] on scale, zero [N], column j weighted by weight [g]."""
        s, z = scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1)
        sq = (dequantize(quantize(w, s, z, self.fmt.bits), s, z, self.fmt.bits) - w).square()  # [N, g]
        return (sq if weight is None else sq * weight).sum(1)

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        q = quantize(w.unsqueeze(1), self._scale, self._zero, self.fmt.bits)  # [N, 1]
        self.codes[:, col] = q[:, 0]
        return dequantize(q, self._scale, self._zero, self.fmt.bits)[:, 0]

    def result(self) -> QuantizedTensor:
        return QuantizedTensor(fmt=self.fmt, codes=self.codes, scales=self.scales, zeros=self.zeros,
                               super_scales=self.super_scales)


class GridBuilder(SuperScaled):
    """Builds a GridTensor as UniformBuilder builds a QuantizedTensor: start_group chooses group
    gi's signed scale (`choose_level_scale` on GPTQ's loss, loss_weight(d)) from the current weights
    of its columns, quantize_column rounds a column to the nearest levels of that scale. levels: the
    table, [16] (the grid's own by default) or [N, 16] (a table per row)."""

    def __init__(self, fmt: GridFormat | LutFormat, shape: tuple[int, int], *, clip_search: bool = True,
                 levels: torch.Tensor | None = None) -> None:
        n, k = shape
        self.fmt, self.shape, self.clip_search = fmt, shape, clip_search
        self.levels = grid_levels(fmt.grid) if levels is None else levels  # [16] or [N, 16]
        self.bounds = fmt.group_bounds(k)
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.scales = torch.zeros(n, len(self.bounds))
        self._scale: torch.Tensor | None = None

    def choose(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return choose_level_scale(w, self.levels, self.fmt, weight=weight, search=self.clip_search)  # [N]

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        weight = loss_weight(d)  # [g] | None
        scale = self.choose(w, weight)  # [N]
        if self.super_scales is not None:
            scale = self.snap(gi, scale, w, lambda w_, s_: self._error(w_, s_, weight))
        self.scales[:, gi] = scale
        self._scale = scale.unsqueeze(1)  # [N, 1]

    def _error(self, w: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Squared rounding error [N] of the group w [N, g] on the signed scale [N], column j weighted by weight [g]."""
        s = scale.unsqueeze(1)
        sq = (nearest_value(w / s, self.levels) * s - w).square()  # [N, g]
        return (sq if weight is None else sq * weight).sum(1)

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        q = nearest_level(w.unsqueeze(1) / self._scale, self.levels)  # [N, 1]
        self.codes[:, col] = q[:, 0]
        return level_values(q, self.levels)[:, 0] * self._scale[:, 0]

    def result(self) -> GridTensor | LutTensor:
        if isinstance(self.fmt, LutFormat):
            return LutTensor(fmt=self.fmt, codes=self.codes, scales=self.scales, levels=self.levels,
                             super_scales=self.super_scales)
        return GridTensor(fmt=self.fmt, codes=self.codes, scales=self.scales, super_scales=self.super_scales)


def lut_builder(fmt: LutFormat, w: torch.Tensor, h_diag: torch.Tensor, *, clip_search: bool = True) -> GridBuilder:
    """A GridBuilder on the table(s) fitted to w [N, K] with GPTQ's Hessian diagonal h_diag [K]
    as the importance of each column (`formats.lut.fit_levels`), before any column is quantized."""
    return GridBuilder(fmt, tuple(w.shape), clip_search=clip_search, levels=fit_levels(w, fmt, h_diag))


# Each entry: (fmt, w [N, K] the layer's weights, h_diag [K] its Hessian diagonal, clip_search) -> builder
BUILDERS: dict[type, Callable[..., UniformBuilder | GridBuilder | SpQRBuilder]] = {
    QuantFormat: lambda fmt, w, h_diag, clip_search=True: UniformBuilder(fmt, tuple(w.shape), clip_search=clip_search),
    GridFormat: lambda fmt, w, h_diag, clip_search=True: GridBuilder(fmt, tuple(w.shape), clip_search=clip_search),
    LutFormat: lambda fmt, w, h_diag, clip_search=True: lut_builder(fmt, w, h_diag, clip_search=clip_search),
    SpQRFormat: lambda fmt, w, h_diag, clip_search=True: SpQRBuilder(fmt, tuple(w.shape)),
}


def builder_for(fmt: Format, w: torch.Tensor, h_diag: torch.Tensor, *,
                clip_search: bool = True) -> UniformBuilder | GridBuilder | SpQRBuilder:
    """The builder of fmt for the weight w [N, K] fp32 whose inputs have the Hessian diagonal h_diag [K]
    (only learned tables read them, to fit their levels); a -dq format's super-scales are fixed
    from w here (`SuperScaled.fix_super_scales`)."""
    builder = BUILDERS[type(fmt)](fmt, w, h_diag, clip_search=clip_search)
    if isinstance(fmt, GroupedFormat) and fmt.dq:
        builder.fix_super_scales(w)
    return builder


RTN: dict[type, Callable[[torch.Tensor, Format], AnyQuantizedTensor]] = {
    QuantFormat: lambda w, fmt, clip_search=True: quantize_rtn(w, fmt, clip_search=clip_search),
    GridFormat: lambda w, fmt, clip_search=True: quantize_grid_rtn(w, fmt, clip_search=clip_search),
    LutFormat: lambda w, fmt, clip_search=True: quantize_lut_rtn(w, fmt, clip_search=clip_search),
    SpQRFormat: lambda w, fmt, clip_search=True: quantize_spqr_rtn(w, fmt),
}


def quantize_rtn_any(w: torch.Tensor, fmt: Format, *, clip_search: bool = True) -> AnyQuantizedTensor:
    """Round to nearest of w [N, K] fp32 in fmt; a -dq format goes through its builder with no error
    spread (`rtn_double_quant`)."""
    if isinstance(fmt, GroupedFormat) and fmt.dq:
        return rtn_double_quant(w, fmt, clip_search=clip_search)
    return RTN[type(fmt)](w, fmt, clip_search)


def rtn_double_quant(w: torch.Tensor, fmt: Format, *, clip_search: bool = True) -> AnyQuantizedTensor:
    """Round to nearest in a -dq format: the builder's super-scales come from the groups' own scales
    on w, each group's scale is snapped to them, then its columns are rounded (GPTQ's sweep without
    the error updates; the weights never move: no headroom, codes rounded up, see DQ_RTN_ROUNDING)."""
    w = w.detach().to(torch.float32)
    builder = BUILDERS[type(fmt)](fmt, w, torch.ones(w.shape[1]), clip_search=clip_search)
    builder.fix_super_scales(w, DQ_RTN_HEADROOM, DQ_RTN_ROUNDING)
    for gi, (lo, hi) in enumerate(builder.bounds):
        builder.start_group(gi, w[:, lo:hi])
        for col in range(lo, hi):
            builder.quantize_column(col, w[:, col])
    return builder.result()

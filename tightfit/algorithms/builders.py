"""Per format family, how a weight is quantized: column by column by a builder (GPTQ's inner
loop: the builder chooses each group's parameters and decodes columns, GPTQ orders columns and
spreads errors), or all at once by round to nearest. Formats are looked up by type."""

from __future__ import annotations

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
    quantize_grid_rtn,
)
from tightfit.formats.lut import LutFormat, LutTensor, fit_levels, quantize_lut_rtn
from tightfit.formats.primitives import QuantizedTensor, choose_qparams, dequantize, quantize, quantize_rtn, search_shrink
from tightfit.formats.registry import AnyQuantizedTensor, Format
from tightfit.formats.spqr import SpQRFormat
from tightfit.formats.table import QuantFormat


class UniformBuilder:
    """Builds a QuantizedTensor group by group and column by column (GPTQ's inner loop).

    start_group(gi, w [N, g], d [g], cols [g]) chooses group gi's scale and zero from the current
    weights w of its columns `cols` (original indices, any order); quantize_column(col, w [N])
    stores that column's codes and returns its decoded values. d (GPTQ's Cholesky diagonal) is
    not needed by uniform formats.
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

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        shrink = search_shrink(w, self.fmt) if self.clip_search else 1.0
        scale, zero = choose_qparams(w, self.fmt, shrink)  # [N], [N] | None
        self.scales[:, gi] = scale
        if self.zeros is not None:
            self.zeros[:, gi] = zero
        self._scale = scale.unsqueeze(1)  # [N, 1]
        self._zero = None if zero is None else zero.unsqueeze(1)

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        q = quantize(w.unsqueeze(1), self._scale, self._zero, self.fmt.bits)  # [N, 1]
        self.codes[:, col] = q[:, 0]
        return dequantize(q, self._scale, self._zero, self.fmt.bits)[:, 0]

    def result(self) -> QuantizedTensor:
        return QuantizedTensor(fmt=self.fmt, codes=self.codes, scales=self.scales, zeros=self.zeros)


class GridBuilder:
    """Builds a GridTensor as UniformBuilder builds a QuantizedTensor: start_group chooses group
    gi's signed scale (`choose_level_scale`, plain squared error) from the current weights of its
    columns, quantize_column rounds a column to the nearest levels of that scale. levels: the
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

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        scale = choose_level_scale(w, self.levels, self.fmt, search=self.clip_search)  # [N]
        self.scales[:, gi] = scale
        self._scale = scale.unsqueeze(1)  # [N, 1]

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        q = nearest_level(w.unsqueeze(1) / self._scale, self.levels)  # [N, 1]
        self.codes[:, col] = q[:, 0]
        return level_values(q, self.levels)[:, 0] * self._scale[:, 0]

    def result(self) -> GridTensor | LutTensor:
        if isinstance(self.fmt, LutFormat):
            return LutTensor(fmt=self.fmt, codes=self.codes, scales=self.scales, levels=self.levels)
        return GridTensor(fmt=self.fmt, codes=self.codes, scales=self.scales)


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
    (only learned tables read them, to fit their levels)."""
    return BUILDERS[type(fmt)](fmt, w, h_diag, clip_search=clip_search)


RTN: dict[type, Callable[[torch.Tensor, Format], AnyQuantizedTensor]] = {
    QuantFormat: lambda w, fmt, clip_search=True: quantize_rtn(w, fmt, clip_search=clip_search),
    GridFormat: lambda w, fmt, clip_search=True: quantize_grid_rtn(w, fmt, clip_search=clip_search),
    LutFormat: lambda w, fmt, clip_search=True: quantize_lut_rtn(w, fmt, clip_search=clip_search),
    SpQRFormat: lambda w, fmt, clip_search=True: quantize_spqr_rtn(w, fmt),
}


def quantize_rtn_any(w: torch.Tensor, fmt: Format, *, clip_search: bool = True) -> AnyQuantizedTensor:
    return RTN[type(fmt)](w, fmt, clip_search)

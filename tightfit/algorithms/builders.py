"""Per format family, how a weight is quantized: column by column by a builder (GPTQ's inner
loop: the builder chooses each group's parameters and decodes columns, GPTQ orders columns and
spreads errors), or all at once by round to nearest. Formats are looked up by type."""

from __future__ import annotations

from typing import Callable

import torch

from tightfit.algorithms.spqr import SpQRBuilder, quantize_spqr_rtn
from tightfit.formats.grid import GridFormat, GridTensor, choose_grid_scale, dequantize_grid, quantize_grid, quantize_grid_rtn
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
    gi's signed scale (`choose_grid_scale`, plain squared error) from the current weights of its
    columns, quantize_column rounds a column to the nearest levels of that scale."""

    def __init__(self, fmt: GridFormat, shape: tuple[int, int], *, clip_search: bool = True) -> None:
        n, k = shape
        self.fmt, self.shape, self.clip_search = fmt, shape, clip_search
        self.bounds = fmt.group_bounds(k)
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.scales = torch.zeros(n, len(self.bounds))
        self._scale: torch.Tensor | None = None

    def start_group(self, gi: int, w: torch.Tensor, d: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        scale = choose_grid_scale(w, self.fmt, search=self.clip_search)  # [N]
        self.scales[:, gi] = scale
        self._scale = scale.unsqueeze(1)  # [N, 1]

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        q = quantize_grid(w.unsqueeze(1), self._scale, self.fmt)  # [N, 1]
        self.codes[:, col] = q[:, 0]
        return dequantize_grid(q, self._scale, self.fmt)[:, 0]

    def result(self) -> GridTensor:
        return GridTensor(fmt=self.fmt, codes=self.codes, scales=self.scales)


BUILDERS: dict[type, Callable[..., UniformBuilder | GridBuilder | SpQRBuilder]] = {
    QuantFormat: UniformBuilder,
    GridFormat: GridBuilder,
    SpQRFormat: lambda fmt, shape, clip_search=True: SpQRBuilder(fmt, shape),
}


def builder_for(fmt: Format, shape: tuple[int, int], *, clip_search: bool = True) -> UniformBuilder | GridBuilder | SpQRBuilder:
    return BUILDERS[type(fmt)](fmt, shape, clip_search=clip_search)


RTN: dict[type, Callable[[torch.Tensor, Format], AnyQuantizedTensor]] = {
    QuantFormat: lambda w, fmt, clip_search=True: quantize_rtn(w, fmt, clip_search=clip_search),
    GridFormat: lambda w, fmt, clip_search=True: quantize_grid_rtn(w, fmt, clip_search=clip_search),
    SpQRFormat: lambda w, fmt, clip_search=True: quantize_spqr_rtn(w, fmt),
}


def quantize_rtn_any(w: torch.Tensor, fmt: Format, *, clip_search: bool = True) -> AnyQuantizedTensor:
    return RTN[type(fmt)](w, fmt, clip_search)

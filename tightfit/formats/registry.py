"""All format families in one place: parse any format name, and find the tensor type of a format
by its type."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Union

import torch

from tightfit.errors import FormatError
from tightfit.formats.grid import GRID_GRAMMAR, GridFormat, GridTensor, all_grid_formats, is_grid_name
from tightfit.formats.lut import LUT_GRAMMAR, LutFormat, LutTensor, all_lut_formats, is_lut_name
from tightfit.formats.primitives import RTN_ROWS, GroupedTensor, QuantizedTensor
from tightfit.formats.spqr import SPQR_GRAMMAR, SPQR_RECIPES, SpQRFormat, SpQRTensor
from tightfit.formats.table import GRAMMAR, LayerBytes, QuantFormat, all_formats

Format = Union[QuantFormat, GridFormat, LutFormat, SpQRFormat]
AnyQuantizedTensor = Union[QuantizedTensor, GridTensor, LutTensor, SpQRTensor]  # a weight quantized in any format family

TENSOR_TYPES: dict[type, type] = {QuantFormat: QuantizedTensor, GridFormat: GridTensor, LutFormat: LutTensor,
                                  SpQRFormat: SpQRTensor}
# Every member of each family (what `tightfit formats` lists, bf16-scale variants included): a new
# family registers its members here beside its tensor type, and the benches that sweep families
# (bench/formats.py) pick it up.
FAMILY_MEMBERS: dict[type, Callable[[], tuple]] = {QuantFormat: all_formats, GridFormat: all_grid_formats,
                                                   LutFormat: all_lut_formats, SpQRFormat: lambda: SPQR_RECIPES}


def parse_format(text: str) -> Format:
    """Any format name: uniform (`w3g64`, `w4g128-sym`, `w8pc`), a fixed non-uniform grid
    (`nl4g32`, `nf4g64`), a learned table (`lut4g32`, `lut4g64-row`) or SpQR (`spqr-w3g16-s3-o1.0`)."""
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"empty quantization format; {GRAMMAR}; or a grid: {GRID_GRAMMAR}; "
                          f"or a learned table: {LUT_GRAMMAR}; or SpQR: {SPQR_GRAMMAR}")
    if text.strip().lower().startswith("spqr"):
        return SpQRFormat.parse(text)
    if is_grid_name(text):
        return GridFormat.parse(text)
    if is_lut_name(text):
        return LutFormat.parse(text)
    return QuantFormat.parse(text)


def every_format() -> tuple[Format, ...]:
    """Every format of every family (FAMILY_MEMBERS), in registration order."""
    return tuple(fmt for members in FAMILY_MEMBERS.values() for fmt in members())


def unpack_tensor(fmt: Format, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> AnyQuantizedTensor:
    return TENSOR_TYPES[type(fmt)].unpack(fmt, shape, tensors)


@dataclass(frozen=True)
class StoredTensor:
    """A quantized weight held as the packed file stores it (`pack()`: bit-packed codes, scales,
    ...), not as a builder leaves it (one uint8 per code): a 4-bit layer takes half a byte per
    weight instead of one. The quantize stage keeps a big model's finished layers this way until
    they are written (1.3 GB of codes for a 1.5B model's linear layers, 0.7 GB packed at 4 bits);
    it stands in for the quantized tensor wherever only its format, shape, bytes, packed parts or
    dequantized weights are asked for."""

    fmt: Format
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]
    size: LayerBytes

    @classmethod
    def of(cls, q: AnyQuantizedTensor) -> StoredTensor:
        return cls(fmt=q.fmt, shape=tuple(q.shape), parts=q.pack(), size=q.nbytes())

    def pack(self) -> dict[str, torch.Tensor]:
        return self.parts

    def nbytes(self) -> LayerBytes:
        return self.size

    def unpacked(self) -> AnyQuantizedTensor:
        return unpack_tensor(self.fmt, self.shape, self.parts)

    def dequantize(self) -> torch.Tensor:
        return self.unpacked().dequantize()


def error_rows(weight: torch.Tensor, quantized: AnyQuantizedTensor) -> Iterator[tuple[int, torch.Tensor]]:
    """The rounding error dequantized - weight [N, K] as (first row, error of its rows): RTN_ROWS
    rows at a time for a grouped format (a 151936-row embedding's fp32 error is 0.9 GB), in one
    piece for SpQR."""
    if not isinstance(quantized, GroupedTensor):
        yield 0, quantized.dequantize() - weight
        return
    for r in range(0, weight.shape[0], RTN_ROWS):
        yield r, quantized.rows(slice(r, r + RTN_ROWS)).dequantize() - weight[r : r + RTN_ROWS]

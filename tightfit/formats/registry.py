"""All format families in one place: parse any format name, and find the tensor type of a format
by its type."""

from __future__ import annotations

from typing import Union

import torch

from tightfit.errors import FormatError
from tightfit.formats.grid import GRID_GRAMMAR, GridFormat, GridTensor, is_grid_name
from tightfit.formats.primitives import QuantizedTensor
from tightfit.formats.spqr import SPQR_GRAMMAR, SpQRFormat, SpQRTensor
from tightfit.formats.table import GRAMMAR, QuantFormat

Format = Union[QuantFormat, GridFormat, SpQRFormat]
AnyQuantizedTensor = Union[QuantizedTensor, GridTensor, SpQRTensor]  # a weight quantized in any format family

TENSOR_TYPES: dict[type, type] = {QuantFormat: QuantizedTensor, GridFormat: GridTensor, SpQRFormat: SpQRTensor}


def parse_format(text: str) -> Format:
    """Any format name: uniform (`w3g64`, `w4g128-sym`, `w8pc`), a fixed non-uniform grid
    (`nl4g32`, `nf4g64`) or SpQR (`spqr-w3g16-s3-o1.0`)."""
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"empty quantization format; {GRAMMAR}; or a grid: {GRID_GRAMMAR}; or SpQR: {SPQR_GRAMMAR}")
    if text.strip().lower().startswith("spqr"):
        return SpQRFormat.parse(text)
    if is_grid_name(text):
        return GridFormat.parse(text)
    return QuantFormat.parse(text)


def unpack_tensor(fmt: Format, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> AnyQuantizedTensor:
    return TENSOR_TYPES[type(fmt)].unpack(fmt, shape, tensors)

"""All format families in one place: parse any format name, and find the tensor type, the
column-wise builder (for GPTQ) and the round-to-nearest quantizer of a format by its type."""

from __future__ import annotations

from typing import Callable, Union

import torch

from tightfit.errors import FormatError
from tightfit.formats.primitives import QuantizedTensor, UniformBuilder, quantize_rtn
from tightfit.formats.spqr import SPQR_GRAMMAR, SpQRBuilder, SpQRFormat, SpQRTensor, quantize_spqr_rtn
from tightfit.formats.table import GRAMMAR, QuantFormat

Format = Union[QuantFormat, SpQRFormat]
Tensor = Union[QuantizedTensor, SpQRTensor]

TENSOR_TYPES: dict[type, type] = {QuantFormat: QuantizedTensor, SpQRFormat: SpQRTensor}
RTN: dict[type, Callable[[torch.Tensor, Format], Tensor]] = {
    QuantFormat: lambda w, fmt, clip_search=True: quantize_rtn(w, fmt, clip_search=clip_search),
    SpQRFormat: lambda w, fmt, clip_search=True: quantize_spqr_rtn(w, fmt),
}


def parse_format(text: str) -> Format:
    """Any format name: uniform (`w3g64`, `w4g128-sym`, `w8pc`) or SpQR (`spqr-w3g16-s3-o1.0`)."""
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"empty quantization format; {GRAMMAR}; or SpQR: {SPQR_GRAMMAR}")
    if text.strip().lower().startswith("spqr"):
        return SpQRFormat.parse(text)
    return QuantFormat.parse(text)


def builder_for(fmt: Format, shape: tuple[int, int], *, clip_search: bool = True) -> UniformBuilder | SpQRBuilder:
    if isinstance(fmt, SpQRFormat):
        return SpQRBuilder(fmt, shape)
    return UniformBuilder(fmt, shape, clip_search=clip_search)


def quantize_rtn_any(w: torch.Tensor, fmt: Format, *, clip_search: bool = True) -> Tensor:
    return RTN[type(fmt)](w, fmt, clip_search)


def unpack_tensor(fmt: Format, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> Tensor:
    return TENSOR_TYPES[type(fmt)].unpack(fmt, shape, tensors)

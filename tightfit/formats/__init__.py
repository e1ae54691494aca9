"""Ground floor of tightfit: the format table, exact byte costs, bit packing, and pure
quantize/dequantize primitives. Imports nothing of tightfit except `tightfit.errors`."""

from tightfit.formats.bitpack import pack_bits, unpack_bits
from tightfit.formats.grid import GRIDS, GridFormat, GridTensor, all_grid_formats
from tightfit.formats.lut import LutFormat, LutTensor, all_lut_formats
from tightfit.formats.primitives import (
    DEFAULT_SHRINK_GRID,
    QuantizedTensor,
    choose_qparams,
    dequantize,
    quantize,
    quantize_rtn,
    search_shrink,
)
from tightfit.formats.table import BITS, GROUP_SIZES, SCALE_DTYPES, LayerBytes, QuantFormat, all_formats

__all__ = [
    "BITS",
    "DEFAULT_SHRINK_GRID",
    "GRIDS",
    "GROUP_SIZES",
    "GridFormat",
    "GridTensor",
    "SCALE_DTYPES",
    "LayerBytes",
    "LutFormat",
    "LutTensor",
    "QuantFormat",
    "QuantizedTensor",
    "all_formats",
    "all_grid_formats",
    "all_lut_formats",
    "choose_qparams",
    "dequantize",
    "pack_bits",
    "quantize",
    "quantize_rtn",
    "search_shrink",
    "unpack_bits",
]

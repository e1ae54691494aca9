"""The kernels' weight layout ("tf-tile16", described in layout.h) and its ctypes mirror.

Packed files keep the format's own storage (formats/); at load time each matrix is repacked once
into the layout the kernels read: tiles of 16 rows, chunks of 16 rows x 4 columns as bit planes,
and per (tile, group) 16 fp16/bf16 scales and 16 u8 zero points. Grid formats (formats/grid.py)
keep their 4-bit codes and signed scales; a 16-byte table maps each code to its level + GRID_ZERO
(a u8, as the int8 kernels multiply them) and every zero point is GRID_ZERO, so the kernels' w =
(levels[q] - z) * s is the grid's L[q] * s. Learned tables (formats/lut.py) take the same path with
the layer's own table, or with a table per row laid out per tile (`row_tables`, layout.h); a 2- or
3-bit table keeps its codes in the uniform 2- / 3-bit planes and its 4 / 8 levels in the first
entries of the same 16-byte tables (the rest GRID_ZERO, never indexed). SpQR
(formats/spqr.py) keeps its codes in the same planes and its statistics as the file quantizes them,
one 24-byte record per (tile, group) that the kernels decode (layout.h), plus its CSR outliers
regrouped into tile slices (16-row vectors, `outlier_slices`). Repacking is exact: every weight the
kernels decode equals the reference dequantization, tested.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

import torch

from tightfit.formats.grid import GridFormat, GridTensor
from tightfit.formats.lut import LutFormat, LutTensor
from tightfit.formats.primitives import QuantizedTensor
from tightfit.formats.spqr import STAT_GROUP, SpQRFormat, SpQRTensor
from tightfit.formats.table import QuantFormat

TILE = 16  # rows per tile (one AVX-512 lane each)
QUAD = 4  # columns per chunk: 16 rows x 4 columns = 64 codes
CHUNK = TILE * QUAD
K_ALIGN = 32  # columns are padded to whole activation blocks
KIND_QUANT, KIND_F16, KIND_F32 = 0, 1, 2
GRID_ZERO = 128  # grid levels (int8) + GRID_ZERO are u8, the operand vpdpbusd takes unsigned
KERNEL_FORMATS = (QuantFormat, GridFormat, LutFormat, SpQRFormat)  # the format families with a fast kernel; others run dense
LEVEL_TYPES = (GridTensor, LutTensor)  # tensors whose codes index a table of int8 levels (16, or 4 / 8 learned)
LEVEL_BITS = (2, 3, 4)  # code widths the kernels look up in a level table (16 bytes, codes 0 .. 2^bits-1)
SPQR_RECORD = 24  # bytes of one SpQR (tile, group) statistics record: 16 code bytes, 4 fp16 (layout.h)
# bit planes of a code width, low bits first: (plane width, bit shift)
PLANES: dict[int, tuple[tuple[int, int], ...]] = {
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
    5: ((4, 0), (1, 4)),
    6: ((4, 0), (2, 4)),
    8: ((8, 0),),
}


class TfMat(ctypes.Structure):
    """Mirror of `tf_mat` in common.h."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("N", ctypes.c_int32),
        ("K", ctypes.c_int32),
        ("Kp", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("G", ctypes.c_int32),
        ("scale_bf16", ctypes.c_int32),
        ("level_rows", ctypes.c_int32),
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("dense", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("levels", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("outlier_tiles", ctypes.c_void_p),
        ("outlier_entries", ctypes.c_void_p),
        ("outlier_masks", ctypes.c_void_p),
        ("outlier_cols", ctypes.c_void_p),
        ("outlier_values", ctypes.c_void_p),
    ]


PLANE_ROWS = 8192  # rows of a matrix laid out at once


def _plane(codes: torch.Tensor, width: int, shift: int) -> torch.Tensor:
    """codes [N, C, 64] uint8 -> one bit plane [N, C, 8*width] uint8 (layout in layout.h)."""
    v = ((codes >> shift) & ((1 << width) - 1)).to(torch.int32)  # [N, C, 64]
    if width == 8:
        return v.to(torch.uint8)
    if width == 1:  # 64 bits -> 8 bytes, little-endian: bit j of the word is code j
        bits = v.view(*v.shape[:2], 8, 8)  # [N, C, byte, bit]
        return (bits << torch.arange(8, dtype=torch.int32)).sum(dim=3).to(torch.uint8)  # [N, C, 8]
    per_byte = 8 // width  # codes per byte: code j + t*(64/per_byte) goes to bits t*width of byte j
    parts = v.view(*v.shape[:2], per_byte, CHUNK // per_byte)  # [N, C, t, 64/per_byte]
    shifts = (torch.arange(per_byte, dtype=torch.int32) * width).view(1, 1, per_byte, 1)
    out = (parts << shifts).sum(dim=2)  # [N, C, 64/per_byte], disjoint bits: sum == or
    return out.to(torch.uint8)


@dataclass
class KernelMatrix:
    """One matrix in kernel layout; owns the tensors `TfMat` points into.

    codes [Np/16, Kp/4, 8*bits] uint8; scales [Np/16, G, 16] int16 bits of fp16/bf16;
    zeros [Np/16, G, 16] uint8; levels (grid and learned-table formats: level + GRID_ZERO per code,
    padded with GRID_ZERO to 16 entries) [16] uint8, or with level_rows a table per row [Np/16, 4, 64] uint8 (`row_tables`), or None;
    dense [N, K] fp16/fp32 (dense kinds); bias [N] fp32 or None.
    SpQR (scales and zeros None): stats [Np/16, G, 24] uint8 (layout.h); its outliers in tile slices
    (`outlier_slices`, layout.h): outlier_tiles and outlier_entries [Np/16 + 1] int32, outlier_masks
    [slices] int16 (read as u16), outlier_cols [nnz] int16 (u16), outlier_values [nnz] fp16, or all None.
    """

    kind: int
    shape: tuple[int, int]
    bits: int = 0
    group: int = 0
    groups: int = 0
    scale_bf16: bool = False
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    level_rows: bool = False
    stats: torch.Tensor | None = None
    outlier_tiles: torch.Tensor | None = None
    outlier_entries: torch.Tensor | None = None
    outlier_masks: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None

    TENSORS = ("codes", "scales", "zeros", "dense", "bias", "levels", "stats", "outlier_tiles", "outlier_entries", "outlier_masks",
               "outlier_cols", "outlier_values")

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read per full pass over the matrix (every array, outliers included)."""
        parts = [getattr(self, f) for f in self.TENSORS]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def clone(self) -> "KernelMatrix":
        """A copy with copies of every array (the profile's streamed copies)."""
        return dataclasses.replace(self, **{f: None if getattr(self, f) is None else getattr(self, f).clone() for f in self.TENSORS})

    def struct(self) -> TfMat:
        n, k = self.shape
        table = (-(-n // TILE), 4, 64) if self.level_rows else (16,)
        assert self.levels is None or (self.bits in LEVEL_BITS and self.levels.dtype == torch.uint8 and self.levels.shape == table), (
            "a level table needs 2-, 3- or 4-bit codes and 16 u8 levels, or [Np/16, 4, 64] per row (what the kernels' grid path reads)"
        )
        assert not self.level_rows or self.levels is not None, "level_rows needs per-row tables"
        if self.stats is not None:  # SpQR: the record table for every (tile, group), outliers for every row
            assert self.stats.dtype == torch.uint8 and self.stats.shape == (-(-n // TILE), self.groups, SPQR_RECORD), self.stats.shape
            assert self.scales is None and self.zeros is None and self.bits in (2, 3, 4)
        if self.outlier_tiles is not None:
            tiles, nnz = -(-n // TILE), int(self.outlier_entries[-1])
            assert self.outlier_tiles.dtype == self.outlier_entries.dtype == torch.int32
            assert self.outlier_tiles.shape == self.outlier_entries.shape == (tiles + 1,)
            assert self.outlier_masks.dtype == torch.int16 and self.outlier_masks.shape == (int(self.outlier_tiles[-1]),)
            assert self.outlier_cols.dtype == torch.int16 and self.outlier_values.dtype == torch.float16
            assert self.outlier_cols.shape == self.outlier_values.shape == (nnz,) and k <= 1 << 16
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return TfMat(
            kind=self.kind, N=n, K=k, Kp=-(-k // K_ALIGN) * K_ALIGN, bits=self.bits, group=self.group,
            G=self.groups, scale_bf16=int(self.scale_bf16), level_rows=int(self.level_rows),
            codes=ptr(self.codes), scales=ptr(self.scales), zeros=ptr(self.zeros), dense=ptr(self.dense), bias=ptr(self.bias),
            levels=ptr(self.levels), stats=ptr(self.stats), outlier_tiles=ptr(self.outlier_tiles),
            outlier_entries=ptr(self.outlier_entries), outlier_masks=ptr(self.outlier_masks), outlier_cols=ptr(self.outlier_cols), outlier_values=ptr(self.outlier_values),
        )


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def has_kernel(fmt: object) -> bool:
    """Whether the engine has a fast (quantized) kernel for a format; the others run as dense fp32."""
    return isinstance(fmt, KERNEL_FORMATS)


def row_tables(levels: torch.Tensor) -> torch.Tensor:
    """Per-row tables [N, 16] u8 -> the kernels' [Np/16, 4, 64]: in tile T, register j holds in its
    128-bit lane l the table of row 16T + 4l + j (one vpshufb per j, layout.h); padding rows get
    GRID_ZERO (level 0)."""
    n = levels.shape[0]
    padded = torch.full((-(-n // TILE) * TILE, 16), GRID_ZERO, dtype=torch.uint8)
    padded[:n] = levels
    # [tiles, 16 rows = 4 lanes l x 4 j, 16] -> [tiles, j, l, 16]
    return padded.view(-1, 4, 4, 16).transpose(1, 2).reshape(-1, 4, 64).contiguous()


def _tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] uint8 -> bit planes [Np/16, Kp/4, 8*bits] uint8 (zero codes pad rows and columns)."""
    n, k = codes.shape
    np_, kp = -(-n // TILE) * TILE, -(-k // K_ALIGN) * K_ALIGN
    tiles = np_ // TILE
    planes = torch.empty(tiles, kp // QUAD, 8 * bits, dtype=torch.uint8)  # [tiles, Kp/4, 8*bits]
    step = max(1, PLANE_ROWS // TILE)  # tiles at a time: _plane's temporaries are ~10 bytes per code
    for t in range(0, tiles, step):
        rows = codes[t * TILE : (t + step) * TILE]
        padded = torch.zeros(-(-rows.shape[0] // TILE) * TILE, kp, dtype=torch.uint8)
        padded[: rows.shape[0], :k] = rows
        # [rows, Kp] -> [tiles, 16 rows, Kp/4 quads, 4 cols] -> [tiles, quads, 16 rows, 4 cols]: o = 4*row + col
        chunks = padded.view(-1, TILE, kp // QUAD, QUAD).permute(0, 2, 1, 3).reshape(-1, kp // QUAD, CHUNK)
        planes[t : t + chunks.shape[0]] = torch.cat([_plane(chunks, w, s) for w, s in PLANES[bits]], dim=2)
    return planes


def from_quantized(q: QuantizedTensor | GridTensor | LutTensor | SpQRTensor, bias: torch.Tensor | None = None) -> KernelMatrix:
    """A uniform-, grid-, learned-table- or SpQR-format weight -> kernel layout (exact)."""
    if isinstance(q, SpQRTensor):
        return from_spqr(q, bias)
    fmt = q.fmt
    assert isinstance(fmt, (QuantFormat, GridFormat, LutFormat)), f"format {fmt.name} has no kernel layout"
    n, k = q.shape
    np_ = -(-n // TILE) * TILE
    tiles = np_ // TILE
    planes = _tiles(q.codes, fmt.bits)
    g = q.scales.shape[1]
    scales = torch.zeros(np_, g, dtype=fmt.scale_torch_dtype)
    scales[:n] = q.scales.to(fmt.scale_torch_dtype)
    levels, level_rows = None, False
    if isinstance(q, LEVEL_TYPES):
        entries = q.levels.shape[-1]  # 16, or a learned 2- / 3-bit table's 4 / 8
        levels = torch.full((*q.levels.shape[:-1], 16), GRID_ZERO, dtype=torch.uint8)  # [16] or [N, 16]
        levels[..., :entries] = (q.levels.to(torch.int32) + GRID_ZERO).to(torch.uint8)
        level_rows = levels.dim() == 2
        if level_rows:
            levels = row_tables(levels)  # [Np/16, 4, 64]
        zeros = torch.full((np_, g), GRID_ZERO, dtype=torch.uint8)
    else:
        zeros = torch.full((np_, g), 1 << (fmt.bits - 1), dtype=torch.uint8)
        if q.zeros is not None:
            zeros[:n] = q.zeros.to(torch.uint8)
    by_tile = lambda t: t.view(tiles, TILE, g).transpose(1, 2).contiguous()  # noqa: E731  [tiles, G, 16]
    return KernelMatrix(
        kind=KIND_QUANT, shape=(n, k), bits=fmt.bits, group=fmt.group_width(k), groups=g,
        scale_bf16=fmt.scale_dtype == "bf16", codes=planes, scales=by_tile(scales).view(torch.int16),
        zeros=by_tile(zeros), bias=_bias(bias), levels=levels, level_rows=level_rows,
    )


def spqr_rows_fit(rows: tuple[int, int] | None) -> bool:
    """Whether from_spqr can lay out these rows of an SpQR weight: its statistics are quantized in
    groups of STAT_GROUP rows, one kernel tile, so a part must start on one (fused projections)."""
    return rows is None or rows[0] % STAT_GROUP == 0


def from_spqr(q: SpQRTensor, bias: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> KernelMatrix:
    """An SpQR weight (rows [start, stop) of it, start a multiple of 16) -> kernel layout (exact).

    bias: of those rows. The statistics stay quantized: per (tile, group) the 16 rows' scale and zero
    codes as nibbles and their second-level fp16 steps and minima (layout.h); outliers in tile slices.
    """
    fmt = q.fmt
    n_all, k = q.shape
    start, stop = rows if rows is not None else (0, n_all)
    assert spqr_rows_fit((start, stop)) and 0 <= start < stop <= n_all, (start, stop, n_all)
    assert TILE == STAT_GROUP and fmt.stat_bits <= 4, "a record holds one tile's statistics, two codes per byte"
    n, g = stop - start, fmt.num_groups(k)
    tiles = -(-n // TILE)
    s2 = slice(start // STAT_GROUP, start // STAT_GROUP + tiles)  # the tiles' second-level groups

    def codes(stat) -> torch.Tensor:  # [G, N] -> [tiles, G, 16], padding rows code 0
        c = torch.zeros(g, tiles * TILE, dtype=torch.uint8)
        c[:, :n] = stat.codes[:, start:stop]
        return c.view(g, tiles, TILE).transpose(0, 1)

    def halves(t: torch.Tensor) -> torch.Tensor:  # [G, N2] fp32 (fp16-representable) -> [tiles, G, 1] fp16
        return t[:, s2].T.to(torch.float16).unsqueeze(-1)

    nibbles = codes(q.scale) | (codes(q.zero) << 4)  # [tiles, G, 16]
    second = torch.cat([halves(q.scale.step), halves(q.scale.minimum), halves(q.zero.step), halves(q.zero.minimum)], dim=2)
    stats = torch.cat([nibbles, second.contiguous().view(torch.uint8)], dim=2).contiguous()  # [tiles, G, 24]
    j0, j1 = int(q.rowptr[start]), int(q.rowptr[stop])
    outliers = outlier_slices(q.rowptr[start : stop + 1] - j0, q.cols[j0:j1], q.values[j0:j1]) if j1 > j0 else {}
    return KernelMatrix(
        kind=KIND_QUANT, shape=(n, k), bits=fmt.bits, group=fmt.group_width(k), groups=g,
        codes=_tiles(q.codes[start:stop], fmt.bits), stats=stats, bias=_bias(bias), **outliers,
    )


def outlier_slices(rowptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR outliers of N rows (rowptr [N+1] from 0) -> the kernels' tile slices (layout.h).

    Slice k of tile T holds the k-th entry of each of its 16 rows that has more than k (the bits of
    its mask, rows in order); a tile has as many slices as its fullest row has entries. Entries are
    stored slice after slice, so the kernels add a tile's outliers as whole 16-row vectors.
    """
    n, row_counts = rowptr.numel() - 1, rowptr.diff()
    tiles = -(-n // TILE)
    counts = torch.zeros(tiles * TILE, dtype=torch.int64)
    counts[:n] = row_counts
    per_tile = counts.view(tiles, TILE)
    zero = torch.zeros(1, dtype=torch.int64)
    first_slice = torch.cat([zero, per_tile.max(dim=1).values.cumsum(0)])  # [tiles + 1]
    first_entry = torch.cat([zero, per_tile.sum(dim=1).cumsum(0)])
    row = torch.repeat_interleave(torch.arange(n), row_counts)  # [nnz] each entry's row
    rank = torch.arange(row.numel()) - rowptr[row]  # its place in the row
    slot = first_slice[row // TILE] + rank  # [nnz] its slice
    order = torch.argsort(slot * TILE + row % TILE)  # slice after slice, rows in order
    masks = torch.zeros(int(first_slice[-1]), dtype=torch.int64).index_add_(0, slot, 1 << (row % TILE))
    u16 = lambda t: t.to(torch.int32).to(torch.int16).contiguous()  # noqa: E731  (u16 in C: K <= 65536)
    return dict(outlier_tiles=first_slice.to(torch.int32), outlier_entries=first_entry.to(torch.int32),
                outlier_masks=u16(masks), outlier_cols=u16(cols[order]), outlier_values=values[order].to(torch.float16).contiguous())


def from_dense(w: torch.Tensor, bias: torch.Tensor | None = None) -> KernelMatrix:
    """A dense weight [N, K]: fp16 stays fp16 (exact), anything else becomes fp32."""
    w = w.detach()
    dense = w.contiguous() if w.dtype == torch.float16 else w.to(torch.float32).contiguous()
    return KernelMatrix(kind=KIND_F16 if dense.dtype == torch.float16 else KIND_F32, shape=tuple(w.shape), dense=dense, bias=_bias(bias))

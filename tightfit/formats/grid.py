"""Fixed non-uniform grids: 16 int8 levels and one signed scale per group.

A grid format quantizes W [N, K] group-wise along K as the uniform formats do (table.py), but a
code q in 0..15 indexes a fixed table of levels instead of an evenly spaced grid:

    w ~ s * L[q]        L: 16 int8 levels, sorted; s: one scale per group, in fp16 or bf16

The levels are not symmetric about 0 (16 levels have no middle), so the scale keeps its sign: a
negative scale mirrors the grid, and each group puts the grid's longer side on its own largest
weight (as llama.cpp's IQ4_NL does). Every byte a packed layer holds:

    codes   [N, K] 4-bit codes, row-major, bit-packed LSB-first (bitpack.py) -> ceil(N*K/2) bytes
    scales  [N, G] in the scale dtype                                        -> N*G*2 bytes

so g32 holds 4 + 16/32 = 4.5 bits/weight. Levels are int8 so that L[q] * s is exact in fp32 and the
engine multiplies them as int8 (a table lookup of the code, then its int8 dot products).

Grids (GRIDS), named by where their levels come from:
    nl4   llama.cpp's IQ4_NL table `kvalues_iq4nl` (non-linear, fitted to LLM weights)
    nf4   QLoRA's NormalFloat4 levels (Dettmers et al. 2023: quantiles of N(0, 1), exact 0) x 127,
          rounded to integers
Names: `{grid}g{group}` or `{grid}pc`, optionally `-bf16` or `-dq` (double-quantized scales, signed
6-bit codes under fp16 super-scales: table.DoubleQuant): e.g. `nl4g32`, `nf4g64`, `nl4g128-bf16`, `nl4g32-dq`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, packed_nbytes, unpack_bits
from tightfit.formats.primitives import GroupedTensor, round_to_scale_dtype, scale_keys, unpack_group_scales
from tightfit.formats.table import (
    GROUP_SIZES,
    GroupedFormat,
    LayerBytes,
    check_features,
    check_group_size,
    check_scale_dtype,
)

GRID_BITS = 4
GRIDS: dict[str, tuple[int, ...]] = {
    "nl4": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
    "nf4": (-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127),
}
# The scale search (`choose_level_scale`) maps the group's largest |w| to each end level moved by
# -STEPS..STEPS int8 units (llama.cpp's IQ4_NL tries 7 steps around its negative end).
SCALE_SEARCH_STEPS = 7
_RTN_CHUNK = 1 << 18  # weights per scale search in round to nearest (its temporaries hold 30x as many)

GRID_GRAMMAR = (
    f"expected {{grid}}g{{group}} or {{grid}}pc (per channel), optionally followed by -bf16 or -dq, with grid in "
    f"{{{', '.join(GRIDS)}}} and group in {{{', '.join(str(g) for g in GROUP_SIZES if g is not None)}}} "
    "(e.g. nl4g32, nf4g64, nl4g128-bf16, nl4g32-dq)"
)
_NAME_RE = re.compile(rf"(?P<grid>{'|'.join(GRIDS)})(?:g(?P<group>[1-9][0-9]*)|(?P<pc>pc))(?P<suffix>(?:-bf16|-dq)+)?")


def is_grid_name(text: str) -> bool:
    """Whether a format name belongs to this family (starts with a grid's name)."""
    return text.strip().lower().startswith(tuple(GRIDS))


@dataclass(frozen=True)
class GridFormat(GroupedFormat):
    """A fixed non-uniform grid with one signed scale per group.

    grid:        a key of GRIDS (the 16 int8 levels)
    group_size:  weights per scale along in_features, one of GROUP_SIZES; None = per channel
    scale_dtype: "fp16" or "bf16"
    dq:          double-quantized scales (table.DoubleQuant): signed 6-bit codes under fp16 super-scales
    """

    grid: str
    group_size: int | None = 32
    scale_dtype: str = "fp16"
    dq: bool = False

    signed_scales = True

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise FormatError(f"grid {self.grid!r} is not in the format table; choose one of {', '.join(GRIDS)}")
        check_group_size(self.group_size)
        check_scale_dtype(self.scale_dtype)
        self.check_dq()

    @property
    def bits(self) -> int:
        return GRID_BITS

    @property
    def levels(self) -> tuple[int, ...]:
        """The 16 int8 levels, ascending: code q decodes to levels[q] * scale."""
        return GRIDS[self.grid]

    @property
    def name(self) -> str:
        return f"{self.grid}{self.group_name}{self.suffix_name}"

    @classmethod
    def parse(cls, text: str) -> GridFormat:
        """Parse a grid format name (case-insensitive, surrounding whitespace ignored)."""
        return cls.parse_name(text, _NAME_RE, GRID_GRAMMAR, "grid", lambda m: {"grid": m["grid"]})

    def nbytes(self, out_features: int, in_features: int) -> LayerBytes:
        """Exact bytes of a packed [out_features, in_features] layer (see module docstring)."""
        check_features("out_features", out_features)
        n, k = out_features, in_features
        return LayerBytes(codes=packed_nbytes(n * k, GRID_BITS), scales=self.scale_nbytes(n, k), zeros=0)


def all_grid_formats() -> tuple[GridFormat, ...]:
    """Every grid format: GRIDS x GROUP_SIZES x scale dtypes."""
    return tuple(GridFormat(grid, g, d) for grid in GRIDS for g in GROUP_SIZES for d in ("fp16", "bf16"))


# ---- primitives ---------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def grid_levels(grid: str) -> torch.Tensor:
    """The 16 levels of a grid, fp32 [16] (shared: read only)."""
    return torch.tensor(GRIDS[grid], dtype=torch.float32)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes of the nearest levels: x [..., g] fp32 in level units, levels [E] (one table of E levels,
    16 for a grid) or [..., E] broadcastable to x's leading dims (a table per row) -> codes [..., g] uint8.

    The midpoints between consecutive (sorted) levels cut the level axis into E intervals; a tie
    goes to the lower level.
    """
    lookup = _integral_lookup(tuple(levels.tolist())) if levels.dim() == 1 else None
    if lookup is not None:
        return _looked_up(x, lookup[0], *lookup[2:])
    mids = (levels[..., 1:] + levels[..., :-1]) / 2  # [..., 15]
    if levels.dim() == 1:
        return torch.bucketize(x, mids).to(torch.uint8)
    mids = mids.expand(*x.shape[:-1], mids.shape[-1]).contiguous()
    return torch.searchsorted(mids, x.contiguous()).to(torch.uint8)


def nearest_value(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """level_values(nearest_level(x, levels), levels): the nearest levels themselves, fp32 [..., g]
    (for one table of integer levels in one lookup, without the codes)."""
    lookup = _integral_lookup(tuple(levels.tolist())) if levels.dim() == 1 else None
    if lookup is not None:
        return _looked_up(x, lookup[1], *lookup[2:])
    return level_values(nearest_level(x, levels), levels)


def _looked_up(x: torch.Tensor, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """table[clamp(ceil(2x), lo, hi) - lo], shaped like x (see _integral_lookup)."""
    t = torch.ceil(x * 2).clamp_(lo, hi).sub_(lo).to(torch.int32)
    return table.index_select(0, t.reshape(-1)).reshape(x.shape)


@lru_cache(maxsize=64)
def _integral_lookup(levels: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """nearest_level for one table of sorted small integer levels (the grids' and learned tables'
    int8 levels) by lookup instead of a binary search (torch.bucketize is scalar code: 16 ms for the
    [1536, 30, 32] candidates of a scale search, the lookup 2 ms): (codes [hi - lo + 1] uint8, their
    levels fp32, lo, hi), the code of x being codes[clamp(ceil(2x), lo, hi) - lo]; None for other tables. Twice a midpoint
    is an integer m2, and m2 < 2x exactly when m2 < ceil(2x), so the code (the number of midpoints
    below x: ties go to the lower level) is a function of ceil(2x), constant below the first m2 and
    above the last. Cached per table: GPTQ asks once per column."""
    if len(levels) < 2 or not all(math.isfinite(v) and v == round(v) and abs(v) <= 1024 for v in levels):
        return None
    mids2 = torch.tensor([round(a + b) for a, b in zip(levels[1:], levels[:-1])], dtype=torch.int64)  # sorted
    lo, hi = int(mids2[0]), int(mids2[-1]) + 1
    codes = torch.bucketize(torch.arange(lo, hi + 1, dtype=torch.int64), mids2).to(torch.uint8)
    return codes, torch.tensor(levels, dtype=torch.float32)[codes.long()], lo, hi


def level_values(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """codes [..., g] uint8 -> levels[codes] fp32 [..., g]; levels as in `nearest_level`."""
    if levels.dim() == 1:
        return levels[codes.long()]
    return levels.expand(*codes.shape[:-1], levels.shape[-1]).gather(-1, codes.long())


def dequantize_grid(codes: torch.Tensor, scale: torch.Tensor, fmt: GridFormat) -> torch.Tensor:
    """codes [..., g] uint8 with scale [..., 1] or [..., g] -> fp32 levels[codes] * scale (exact)."""
    assert codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}"
    return level_values(codes, grid_levels(fmt.grid)) * scale


def round_signed_scale(scale: torch.Tensor, fmt: GroupedFormat) -> torch.Tensor:
    """Signed scales rounded to fmt's scale dtype; 0 becomes the dtype's smallest normal."""
    sign = torch.where(scale < 0, -1.0, 1.0)
    return sign * round_to_scale_dtype(scale.abs(), fmt)


def choose_level_scale(w: torch.Tensor, levels: torch.Tensor, fmt: GroupedFormat, weight: torch.Tensor | None = None, *,
                       search: bool = True) -> torch.Tensor:
    """The scale of each group minimizing sum_j weight_j (w_j - s L[q_j])^2 over a few candidates.

    w: [..., g] fp32; levels: [16] fp32 sorted (one table), or [..., 16] (a table per group's row);
    weight: broadcastable to [..., g], >= 0 (default 1)
    returns [...] fp32 scales, signed, exactly representable in fmt.scale_dtype, nonzero

    Let m be the group's weight of largest magnitude (its sign kept). Candidate t maps m onto an
    end level e of the table moved by t: s_t = m / (e + t), e in {L[0], L[15]}, |t| <= STEPS (t > 0
    towards the middle clips m, t < 0 leaves the end level unused). For each candidate the codes
    are the nearest levels, then the scale is refitted to them by weighted least squares,
    s* = sum(weight w L) / sum(weight L^2), rounded to the scale dtype, and the codes are chosen
    again for s*; each group keeps the candidate with the least error (the first on ties). The
    refit can only lower a candidate's error, up to the rounding of s*. search=False: s = m / L[0].
    All-zero groups get the dtype's smallest normal (their weights decode to almost 0).
    """
    assert w.dtype == torch.float32, f"w must be fp32, got {w.dtype}"
    assert w.dim() >= 1 and w.shape[-1] > 0, f"w must be [..., g] with g > 0, got {tuple(w.shape)}"
    assert levels.dim() == 1 or levels.shape[:-1] == w.shape[:-1], (
        f"levels {tuple(levels.shape)} must be [16] or one table per group [{', '.join(map(str, w.shape[:-1]))}, 16]"
    )
    if not bool(torch.isfinite(w).all()):
        raise FormatError("weight contains NaN or inf; cannot choose quantization parameters")
    if weight is not None:
        assert torch.broadcast_shapes(weight.shape, w.shape) == w.shape, (
            f"weight {tuple(weight.shape)} does not broadcast to w {tuple(w.shape)}"
        )
    m = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))  # [..., 1] signed extreme
    if not search:
        return round_signed_scale(m[..., 0] / levels[..., 0], fmt)
    zero_group = m[..., 0] == 0  # [...]
    m = torch.where(zero_group.unsqueeze(-1), torch.ones_like(m), m)
    steps = torch.arange(-SCALE_SEARCH_STEPS, SCALE_SEARCH_STEPS + 1, dtype=torch.float32)  # [T]
    ends = torch.cat([levels[..., :1] + steps, levels[..., -1:] + steps], dim=-1)  # [C] or [..., C]: the level m lands on
    table = levels if levels.dim() == 1 else levels.unsqueeze(-2)  # [16] or [..., 1, 16]: each candidate's
    x = w.unsqueeze(-2)  # [..., 1, g]
    wt = torch.ones_like(x) if weight is None else weight.unsqueeze(-2)  # [..., 1, g]
    s = round_signed_scale(m / ends, fmt).unsqueeze(-1)  # [..., C, 1]
    q = nearest_value(x / s, table)  # [..., C, g] levels of the nearest codes
    num, den = (wt * x * q).sum(-1, keepdim=True), (wt * q * q).sum(-1, keepdim=True)  # [..., C, 1]
    s = round_signed_scale(torch.where((den > 0) & (num != 0), num / den.clamp_min(1e-30), s), fmt)  # refit
    err = (wt * (x - nearest_value(x / s, table) * s).square()).sum(-1)  # [..., C]
    best = s[..., 0].gather(-1, err.argmin(dim=-1, keepdim=True))[..., 0]  # [...]; argmin: first minimum
    return torch.where(zero_group, round_signed_scale(torch.zeros_like(best), fmt), best)


def quantize_levels_rtn(w: torch.Tensor, levels: torch.Tensor, fmt: GroupedFormat, *, clip_search: bool = True,
                        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round w [N, K] fp32 to the nearest of `levels` ([16], or [N, 16]: a table per row), each
    group's scale by `choose_level_scale` (its error weighted by importance [K] >= 0, default 1):
    -> (codes [N, K] uint8, scales [N, G] fp32)."""
    assert w.dtype == torch.float32 and w.dim() == 2, f"w must be fp32 [N, K], got {w.dtype} {tuple(w.shape)}"
    n, k = w.shape
    codes, scales = torch.zeros(n, k, dtype=torch.uint8), torch.zeros(n, fmt.num_groups(k))
    for gi, (lo, hi) in enumerate(fmt.group_bounds(k)):
        rows = max(1, _RTN_CHUNK // (hi - lo))  # the scale search's temporaries: [rows, candidates, g]
        for r in range(0, n, rows):
            wg = w[r : r + rows, lo:hi]  # [rows, g]
            table = levels if levels.dim() == 1 else levels[r : r + rows]  # [16] or [rows, 16]
            weight = None if importance is None else importance[lo:hi]  # [g]
            s = choose_level_scale(wg, table, fmt, weight, search=clip_search)  # [rows]
            scales[r : r + rows, gi] = s
            codes[r : r + rows, lo:hi] = nearest_level(wg / s.unsqueeze(1), table)
    return codes, scales


@dataclass(frozen=True, eq=False)
class GridTensor(GroupedTensor):
    """A weight [N, K] in a GridFormat, with unpacked fields.

    fmt:    the format
    codes:  [N, K] uint8, values in 0..15 (indices into fmt.levels)
    scales: [N, G] fp32, nonzero (signed), exactly representable in fmt.scale_dtype
    super_scales: [N, S] fp32 with -dq (GroupedTensor), else None
    """

    fmt: GridFormat
    codes: torch.Tensor
    scales: torch.Tensor
    super_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._check_codes_and_scales()

    @property
    def levels(self) -> torch.Tensor:
        """The grid's 16 levels, fp32 [16] (as LutTensor.levels)."""
        return grid_levels(self.fmt.grid)

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32 weight, levels[codes] * scale."""
        return dequantize_grid(self.codes, self.per_weight(self.scales), self.fmt)

    def pack(self) -> dict[str, torch.Tensor]:
        """Storage tensors, fmt.nbytes(N, K) bytes exactly: qweight [ceil(N*K/2)] uint8 (codes
        row-major, bit-packed LSB-first), scales [N, G] in fmt.scale_dtype (-dq: `pack_scales`)."""
        return {"qweight": pack_bits(self.codes, GRID_BITS), **self.pack_scales()}

    @classmethod
    def unpack(cls, fmt: GridFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> GridTensor:
        """Inverse of `pack`; raises FormatError on missing/extra keys, wrong dtypes or sizes."""
        codes, scales, super_scales = unpack_codes_and_scales(fmt, shape, tensors, {"qweight"})
        return cls(fmt=fmt, codes=codes, scales=scales, super_scales=super_scales)


def unpack_codes_and_scales(fmt: GroupedFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                            keys: set[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fmt.bits-bit codes [N, K] uint8, signed scales [N, G] fp32 and super-scales [N, S] fp32
    (-dq, else None) of a packed grid-family tensor whose storage has exactly `keys` and its scales'
    keys; raises FormatError on missing/extra keys, wrong dtypes or sizes."""
    n, k = shape
    keys = keys | scale_keys(fmt)
    if set(tensors) != keys:
        raise FormatError(f"packed {fmt.name} tensor [{n}, {k}] needs keys {sorted(keys)}, got {sorted(tensors)}")
    codes = unpack_bits(tensors["qweight"], fmt.bits, n * k).view(n, k)  # [N, K]
    return codes, *unpack_group_scales(fmt, shape, tensors)


def quantize_grid_rtn(w: torch.Tensor, fmt: GridFormat, *, clip_search: bool = True) -> GridTensor:
    """Round to nearest level of w [N, K] fp32, each group's scale by `choose_level_scale` on the grid's levels."""
    codes, scales = quantize_levels_rtn(w, grid_levels(fmt.grid), fmt, clip_search=clip_search)
    return GridTensor(fmt=fmt, codes=codes, scales=scales)

"""Learned b-bit tables (b = 2, 3, 4): a grid format (grid.py) whose 2^b int8 levels are fitted to the layer.

    w ~ s * L[q]        L: 2^b int8 levels, sorted, fitted per tensor or per output row;
                        s: one signed scale per group, in fp16 or bf16 (as the fixed grids)

The table is fitted by weighted k-means (SqueezeLLM, Kim et al. 2023, sec. 3.1: sensitivity-
weighted non-uniform quantization; any4, Elhoushi et al. 2025: one table per row), see
`fit_levels`, starting from the fixed grid LUT_INITS[b]. Every byte a packed layer holds:

    codes   [N, K] b-bit codes, row-major, bit-packed LSB-first (bitpack.py) -> ceil(N*K*b/8) bytes
    scales  [N, G] in the scale dtype                                        -> N*G*2 bytes
    levels  [2^b] int8 (per tensor) or [N, 2^b] int8 (per row)               -> 2^b or 2^b*N bytes

so lut4g32 holds 4.5 bits/weight plus 16 bytes per layer, lut4g32-row 4.5 + 128/K, lut3g64 3.25
plus 8 bytes, lut2g32-row 2.5 + 32/K. The engine runs them with the grid kernel: the codes
unpacked as the uniform b-bit formats', a table lookup of each, then int8 dot products.

Names: `lut{b}g{group}` or `lut{b}pc`, then `-row` for a table per output row, then optionally
`-bf16` or `-dq` (double-quantized scales, table.DoubleQuant): e.g. `lut4g32`, `lut3g64-row`,
`lut2pc-bf16`, `lut4g128-row-bf16`, `lut4g32-dq`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, packed_nbytes
from tightfit.formats.grid import (
    GRIDS,
    level_values,
    nearest_level,
    nearest_value,
    quantize_levels_rtn,
    unpack_codes_and_scales,
)
from tightfit.formats.primitives import GroupedTensor
from tightfit.formats.table import (
    GROUP_SIZES,
    GroupedFormat,
    LayerBytes,
    check_features,
    check_group_size,
    check_scale_dtype,
)

LUT_PREFIX = "lut"
LUT_BITS = (2, 3, 4)
# The grid k-means starts from, per code width (bench/lut_small.py --inits compares them by the
# importance-weighted RTN error on SmolLM2-135M layers): 4 bits llama.cpp's IQ4_NL (grid.GRIDS["nl4"]);
# 3 bits the 8 quantiles (i + 1/2) / 8 of N(0, 1) x 127 / the largest, rounded (block 10's q_proj and
# down_proj: lut3g64 0.036, lut3g32-row 0.024; an NF3-like grid with an exact 0 0.033 / 0.025, uniform
# 0.051 / 0.030); 2 bits an exact 0 and a longer side for the signed scale to put on the group's
# largest weight (lut2g32 0.118 vs 0.188 from the 4 normal quantiles, lut2g32-row 0.098 vs 0.145)
LUT_INITS: dict[int, tuple[int, ...]] = {
    4: GRIDS["nl4"],
    3: (-127, -73, -40, -13, 13, 40, 73, 127),
    2: (-127, -42, 0, 85),
}
LLOYD_ITERATIONS = 6
LEVEL_MAX = 127  # levels are int8 in [-127, 127]: -128 has no mirror under a negative scale
FIT_WEIGHTS = 1 << 18  # a per-tensor table is fitted on at most this many weights (every r-th row): 16 levels need few
FIT_CHUNK = 1 << 20  # weights per piece of a per-row fit (an embedding's fp32 temporaries would be GBs)

LUT_GRAMMAR = (
    "expected lut{bits}g{group} or lut{bits}pc (per channel), optionally followed by -row (a table per output row) "
    f"and then -bf16 or -dq, with bits in {{{', '.join(map(str, LUT_BITS))}}} and group in "
    f"{{{', '.join(str(g) for g in GROUP_SIZES if g is not None)}}} (e.g. lut4g32, lut3g64-row, lut2pc-bf16, lut4g32-row-dq)"
)
_NAME_RE = re.compile(r"lut(?P<bits>[1-9][0-9]*)(?:g(?P<group>[1-9][0-9]*)|(?P<pc>pc))(?P<row>-row)?(?P<suffix>(?:-bf16|-dq)+)?")


def is_lut_name(text: str) -> bool:
    """Whether a format name belongs to this family (starts with `lut`)."""
    return text.strip().lower().startswith("lut")


@dataclass(frozen=True)
class LutFormat(GroupedFormat):
    """A learned table of 2^bits int8 levels with one signed scale per group.

    group_size: weights per scale along in_features, one of GROUP_SIZES; None = per channel
    per_row:    False: one table per tensor; True: one table per output row
    scale_dtype: "fp16" or "bf16"
    dq:          double-quantized scales (table.DoubleQuant): signed 6-bit codes under fp16 super-scales
    bits:        code width, one of LUT_BITS: the table has 2^bits levels
    """

    group_size: int | None = 32
    per_row: bool = False
    scale_dtype: str = "fp16"
    dq: bool = False
    bits: int = 4

    signed_scales = True

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if not isinstance(self.per_row, bool):
            raise FormatError(f"per_row must be True or False, got {self.per_row!r}")
        check_scale_dtype(self.scale_dtype)
        self.check_dq()
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in LUT_BITS:
            raise FormatError(f"learned-table bits {self.bits!r} is not in the format table; choose one of "
                              f"{', '.join(map(str, LUT_BITS))}")

    @property
    def entries(self) -> int:
        """Levels per table, 2^bits."""
        return 1 << self.bits

    @property
    def name(self) -> str:
        return f"{LUT_PREFIX}{self.bits}{self.group_name}{'-row' if self.per_row else ''}{self.suffix_name}"

    @classmethod
    def parse(cls, text: str) -> LutFormat:
        """Parse a learned-table format name (case-insensitive, surrounding whitespace ignored)."""
        return cls.parse_name(text, _NAME_RE, LUT_GRAMMAR, "learned-table",
                              lambda m: {"per_row": m["row"] is not None, "bits": int(m["bits"])})

    def table_rows(self, out_features: int) -> int:
        """Tables a [out_features, K] layer holds: 1, or one per row."""
        return out_features if self.per_row else 1

    def nbytes(self, out_features: int, in_features: int) -> LayerBytes:
        """Exact bytes of a packed [out_features, in_features] layer (see module docstring)."""
        check_features("out_features", out_features)
        n, k = out_features, in_features
        return LayerBytes(codes=packed_nbytes(n * k, self.bits), scales=self.scale_nbytes(n, k), zeros=0,
                          levels=self.entries * self.table_rows(n))


def all_lut_formats() -> tuple[LutFormat, ...]:
    """Every learned-table format: LUT_BITS x GROUP_SIZES x (per tensor, per row) x scale dtypes."""
    return tuple(LutFormat(group_size=g, per_row=r, scale_dtype=d, bits=b) for b in reversed(LUT_BITS) for g in GROUP_SIZES
                 for r in (False, True) for d in ("fp16", "bf16"))


def init_levels(bits: int) -> torch.Tensor:
    """The table k-means starts from for a code width: LUT_INITS[bits], fp32 [2^bits]."""
    return torch.tensor(LUT_INITS[bits], dtype=torch.float32)


# ---- fitting the table --------------------------------------------------------------------------


def table_error(x: torch.Tensor, kw: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The k-means objective per table: x, kw [R, M] (weights in level units and their weights),
    levels [R, E] -> [R] sum_j kw_j (x_j - L[q_j])^2 over the nearest levels q_j."""
    return (kw * (x - nearest_value(x, levels)).square()).sum(-1)


def lloyd_levels(x: torch.Tensor, kw: torch.Tensor, init: torch.Tensor, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """Weighted 1-D k-means of each row of x [R, M] (weights kw [R, M] >= 0) into E levels from
    init [R, E] sorted, then rounded to int8 in [-LEVEL_MAX, LEVEL_MAX] and sorted -> [R, E] fp32.

    A row keeps init where the fitted, rounded table does not lower `table_error`: the result
    never has a larger weighted error than init. Lloyd: assign each x to its nearest level, move
    each level to the kw-weighted mean of its x (a level that got no weight stays)."""
    assert x.shape == kw.shape and x.dim() == 2 and init.dim() == 2 and init.shape[0] == x.shape[0], (x.shape, kw.shape, init.shape)
    levels = init.clone()
    for _ in range(iterations):
        codes = nearest_level(x, levels).long()  # [R, M]
        total = torch.zeros_like(levels).scatter_add_(1, codes, kw)  # [R, E]
        moment = torch.zeros_like(levels).scatter_add_(1, codes, kw * x)  # [R, E]
        levels = torch.where(total > 0, moment / total.clamp_min(1e-30), levels).sort(dim=1).values
    fitted = levels.round().clamp(-LEVEL_MAX, LEVEL_MAX).sort(dim=1).values
    better = table_error(x, kw, fitted) < table_error(x, kw, init)  # [R]
    return torch.where(better.unsqueeze(1), fitted, init)


def fit_levels(w: torch.Tensor, fmt: LutFormat, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The table(s) of w [N, K] fp32: [E] fp32 (per tensor) or [N, E] (per row), E = 2^fmt.bits, integer levels.

    importance [K] >= 0: the weight of each input column's error, GPTQ's Hessian diagonal H_jj
    (default 1). Each group's scale s is chosen on the LUT_INITS[bits] grid (`choose_level_scale`,
    weighted by importance); the weights normalized by it, x = w / s, are clustered by
    `lloyd_levels` with weights H_jj s^2, so that the objective sum H_jj s^2 (x - L[q])^2 is the
    importance-weighted squared error of w itself (SqueezeLLM eq. 4, with the Hessian diagonal
    standing in for the Fisher information). Deterministic: no sampling but a fixed row stride.
    """
    assert w.dtype == torch.float32 and w.dim() == 2, f"w must be fp32 [N, K], got {w.dtype} {tuple(w.shape)}"
    n, k = w.shape
    if importance is None:
        importance = torch.ones(k)
    assert importance.shape == (k,), f"importance must be [{k}], got {tuple(importance.shape)}"
    importance = importance.to(torch.float32).clamp_min(0)
    if not fmt.per_row:  # one table, fitted on every r-th row: at most ~FIT_WEIGHTS weights
        x, kw = _normalized(w[:: max(1, -(-n * k // FIT_WEIGHTS))], fmt, importance)  # [R, K]
        return lloyd_levels(x.reshape(1, -1), kw.reshape(1, -1), init_levels(fmt.bits).unsqueeze(0))[0]
    pieces = []
    for r in range(0, n, max(1, FIT_CHUNK // k)):  # a table per row: rows a piece at a time
        x, kw = _normalized(w[r : r + max(1, FIT_CHUNK // k)], fmt, importance)  # [R, K]
        pieces.append(lloyd_levels(x, kw, init_levels(fmt.bits).expand(x.shape[0], -1)))
    return torch.cat(pieces)  # [N, E]


def _normalized(w: torch.Tensor, fmt: LutFormat, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, K] in level units, x = w / s with each group's scale s on the LUT_INITS grid, and the
    k-means weights kw = importance_j s^2: both [R, K]."""
    k = w.shape[1]
    _, scales = quantize_levels_rtn(w, init_levels(fmt.bits), fmt, importance=importance)  # [R, G]
    scale = scales.repeat_interleave(fmt.group_width(k), dim=1)[:, :k]  # [R, K] each weight's group scale
    return w / scale, importance * scale.square()


# ---- the tensor ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LutTensor(GroupedTensor):
    """A weight [N, K] in a LutFormat, with unpacked fields.

    fmt:    the format
    codes:  [N, K] uint8, values in 0..E-1 (indices into levels), E = 2^fmt.bits
    scales: [N, G] fp32, nonzero (signed), exactly representable in fmt.scale_dtype
    levels: [E] fp32 (per tensor) or [N, E] (per row): integers in [-127, 127], sorted
    super_scales: [N, S] fp32 with -dq (GroupedTensor), else None
    """

    fmt: LutFormat
    codes: torch.Tensor
    scales: torch.Tensor
    levels: torch.Tensor
    super_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._check_codes_and_scales()
        shape = (self.codes.shape[0], self.fmt.entries) if self.fmt.per_row else (self.fmt.entries,)
        assert self.levels.dtype == torch.float32 and tuple(self.levels.shape) == shape, (
            f"levels must be fp32 {list(shape)}, got {self.levels.dtype} {tuple(self.levels.shape)}"
        )

    def rows(self, rows: slice) -> LutTensor:
        """The weight's rows `rows` (a per-tensor table is shared, a per-row one sliced)."""
        return LutTensor(fmt=self.fmt, codes=self.codes[rows], scales=self.scales[rows],
                         levels=self.levels[rows] if self.fmt.per_row else self.levels,
                         super_scales=None if self.super_scales is None else self.super_scales[rows])

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32 weight, levels[codes] * scale."""
        return level_values(self.codes, self.levels) * self.per_weight(self.scales)

    def pack(self) -> dict[str, torch.Tensor]:
        """Storage tensors, fmt.nbytes(N, K) bytes exactly: qweight [ceil(N*K*bits/8)] uint8 (codes
        row-major, bit-packed LSB-first), scales [N, G] in fmt.scale_dtype (or -dq's super-scales and
        codes), levels [E] or [N, E] int8."""
        return {"qweight": pack_bits(self.codes, self.fmt.bits), **self.pack_scales(), "levels": self.levels.to(torch.int8)}

    @classmethod
    def unpack(cls, fmt: LutFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> LutTensor:
        """Inverse of `pack`; raises FormatError on missing/extra keys, wrong dtypes, sizes or levels."""
        codes, scales, super_scales = unpack_codes_and_scales(fmt, shape, tensors, {"qweight", "levels"})
        levels = tensors["levels"]
        table = [shape[0], fmt.entries] if fmt.per_row else [fmt.entries]
        if levels.dtype != torch.int8 or list(levels.shape) != table:
            raise FormatError(f"packed {fmt.name} levels must be int8 {table}, got {levels.dtype} {list(levels.shape)}")
        levels = levels.to(torch.float32)
        if bool((levels < -LEVEL_MAX).any()) or bool((levels[..., 1:] < levels[..., :-1]).any()):
            raise FormatError(f"packed {fmt.name} levels must be sorted and in [-{LEVEL_MAX}, {LEVEL_MAX}]")
        return cls(fmt=fmt, codes=codes, scales=scales, levels=levels, super_scales=super_scales)


def quantize_lut_rtn(w: torch.Tensor, fmt: LutFormat, *, clip_search: bool = True,
                     importance: torch.Tensor | None = None) -> LutTensor:
    """Fit the table(s) of w [N, K] fp32 (`fit_levels`), then round to the nearest level, each
    group's scale by `choose_level_scale`."""
    levels = fit_levels(w, fmt, importance)
    codes, scales = quantize_levels_rtn(w, levels, fmt, clip_search=clip_search)
    return LutTensor(fmt=fmt, codes=codes, scales=scales, levels=levels)

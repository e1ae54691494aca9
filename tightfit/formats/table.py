"""The format table: which quantization formats exist and exactly how many bytes each one costs.

A format quantizes a weight W [N, K] (N = out_features, K = in_features) group-wise along K:
each row is cut into G groups of group_size columns (the last one narrower when group_size
does not divide K), and each group has one scale (and, when
asymmetric, one integer zero point). Every byte a packed layer holds is derived here:

    codes   [N, K] integer codes in 0 .. 2**bits-1, row-major, bit-packed LSB-first
            -> ceil(N*K*bits / 8) bytes
    scales  [N, G] in the scale dtype (fp16 or bf16)
            -> N*G*2 bytes
    zeros   [N, G] integer zero points in 0 .. 2**bits-1, bit-packed like the codes
            (asymmetric only) -> ceil(N*G*bits / 8) bytes, symmetric: 0 bytes

Dequantization: asymmetric w = (q - z) * s; symmetric w = (q - 2**(bits-1)) * s.

Double-quantized scales (`-dq`, every grouped family; `DoubleQuant`): the scales of each row are
cut into super-blocks of DQ.super_block weights along K (DQ.super_block / group_size groups, the
last super-block narrower when it does not divide K), each holding one fp16 super-scale d and
its groups' scales as DQ.code_bits-bit codes c, s = fp16(d * c) (llama.cpp's K-quants):

    scales  [N, S] fp16 super-scales + [N, G] 6-bit codes, bit-packed -> N*S*2 + ceil(N*G*6/8) bytes

Names follow a small grammar (see `GRAMMAR`), e.g. `w4g128`, `w3g64-sym`, `w8pc-bf16`, `w3g16-dq`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import packed_nbytes

BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
GROUP_SIZES: tuple[int | None, ...] = (16, 32, 64, 128, None)  # None = per channel (one group spans a whole row)
SCALE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}

FORMAT_JSON_VERSION = 1

GRAMMAR = (
    "expected w{bits}g{group} or w{bits}pc (per channel), optionally followed by -sym and then -bf16 or -dq "
    f"(double-quantized scales), with bits in {{{', '.join(map(str, BITS))}}} and group in "
    f"{{{', '.join(str(g) for g in GROUP_SIZES if g is not None)}}} "
    "(e.g. w3g64, w4g128-sym, w8pc, w2g16-bf16, w4g32-sym-bf16, w3g16-dq)"
)
_NAME_RE = re.compile(r"w(?P<bits>[1-9][0-9]*)(?:g(?P<group>[1-9][0-9]*)|(?P<pc>pc))(?P<sym>-sym)?"
                      r"(?P<suffix>(?:-bf16|-dq)+)?")
_DEFAULT_SCALE_DTYPE = "fp16"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def group_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each group of group_size columns along K; the last one may be narrower."""
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


@dataclass(frozen=True)
class DoubleQuant:
    """Double-quantized group scales (llama.cpp K-quants; QLoRA's double quantization quantizes the
    scales too): per row, each super-block of `super_block` weights along K holds one fp16
    super-scale d and its groups' scales as `code_bits`-bit codes c, s = fp16(d * c).

    Positive scales (uniform formats): c in 1 .. 2**code_bits - 1, stored as c.
    Signed scales (grid and learned-table formats, whose sign mirrors the levels): c in
    -(2**(code_bits-1) - 1) .. 2**(code_bits-1) - 1 without 0, stored as c + 2**(code_bits-1).
    d > 0 always; c = 0 never occurs (a scale is never 0)."""

    super_block: int = 256
    code_bits: int = 6

    def code_max(self, signed: bool) -> int:
        """The largest |c|: 63 (positive scales) or 31 (signed)."""
        return (1 << (self.code_bits - 1)) - 1 if signed else (1 << self.code_bits) - 1

    def groups_per_super(self, group_size: int) -> int:
        """Groups of one (full) super-block: super_block / group_size."""
        return self.super_block // group_size


DQ = DoubleQuant()
DQ_SUFFIX = "-dq"


def dq_suffix(text: str, suffix: str | None, grammar: str, family: str) -> tuple[bool, str]:
    """(dq, scale dtype) of a name's trailing `-bf16` / `-dq` suffixes; refuses both or repeats."""
    parts = [] if not suffix else suffix.strip("-").split("-")
    if len(parts) != len(set(parts)):
        raise FormatError(f"cannot parse {family} format {text!r}: a suffix repeats; {grammar}")
    if len(parts) > 1:
        raise FormatError(f"invalid {family} format {text!r}: -dq stores scales as 6-bit codes under fp16 "
                          f"super-scales, so it takes no -bf16; {grammar}")
    return "dq" in parts, "bf16" if "bf16" in parts else _DEFAULT_SCALE_DTYPE


@dataclass(frozen=True)
class LayerBytes:
    """Exact bytes one [N, K] layer holds in a format, split by what they store."""

    codes: int  # ceil(N*K*bits/8)
    scales: int  # N*G*2 (SpQR: quantized scales and their second-level statistics)
    zeros: int  # ceil(N*G*bits/8), 0 when symmetric (SpQR: quantized zeros and their statistics)
    outliers: int = 0  # SpQR: the sparse table of exact weights (values, column indices, row pointers)
    levels: int = 0  # learned level tables (formats/lut.py): 16 int8 per tensor, or per row

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.outliers + self.levels


class GroupedFormat:
    """Geometry and scale dtype shared by the format families that quantize W [N, K] in groups of
    `group_size` columns along K (None = per channel) with one scale per group: uniform grids
    (`QuantFormat`), fixed non-uniform grids (`formats.grid.GridFormat`) and learned tables
    (`formats.lut.LutFormat`). Each family defines
    its `name` and `nbytes`."""

    group_size: int | None
    scale_dtype: str
    dq: bool  # double-quantized scales (DoubleQuant), fp16 super-scales only

    signed_scales = False  # grid and learned-table scales keep their sign (the codes of DoubleQuant)

    def __str__(self) -> str:
        return self.name

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        """The torch dtype scales are stored in."""
        return SCALE_DTYPES[self.scale_dtype]

    def num_groups(self, in_features: int) -> int:
        """G, the groups per row: 1 per channel, else ceil(in_features / group_size).

        When group_size does not divide in_features the last group of each row is narrower
        (e.g. 576 = 4 x 128 + 64): every group still has its own scale and zero, counted in bytes.
        """
        check_features("in_features", in_features)
        if self.group_size is None:
            return 1
        return -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        """Weights per (full) group: group_size, or in_features per channel."""
        check_features("in_features", in_features)
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def group_bounds(self, in_features: int) -> list[tuple[int, int]]:
        """[start, end) column range of each group along K."""
        return group_bounds(in_features, self.group_width(in_features))

    def check_dq(self) -> None:
        """Refuse a double-quantized format that cannot be one (see DoubleQuant)."""
        if not isinstance(self.dq, bool):
            raise FormatError(f"dq must be True or False, got {self.dq!r}")
        if self.dq and self.group_size is None:
            raise FormatError("-dq quantizes group scales in super-blocks of "
                              f"{DQ.super_block} weights; a per-channel format has one scale per row")
        if self.dq and self.scale_dtype != "fp16":
            raise FormatError(f"-dq stores scales as {DQ.code_bits}-bit codes under fp16 super-scales; "
                              f"it takes no {self.scale_dtype} scales")

    def num_super_blocks(self, in_features: int) -> int:
        """S, the super-blocks per row of a -dq format: ceil(G / (super_block / group_size))."""
        assert self.dq, f"{self.name} has no super-blocks"
        return -(-self.num_groups(in_features) // DQ.groups_per_super(self.group_size))

    def super_block_of_groups(self, in_features: int) -> "torch.Tensor":
        """[G] int64: the super-block of each group (-dq formats)."""
        return torch.arange(self.num_groups(in_features)) // DQ.groups_per_super(self.group_size)

    def scale_nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the scales: N*G*2, or with -dq N*S*2 + ceil(N*G*code_bits/8)."""
        n, g = out_features, self.num_groups(in_features)
        if not self.dq:
            return n * g * self.scale_torch_dtype.itemsize
        return n * self.num_super_blocks(in_features) * 2 + packed_nbytes(n * g, DQ.code_bits)

    @property
    def dq_name(self) -> str:
        """The name's dq suffix: `-dq` or empty."""
        return DQ_SUFFIX if self.dq else ""

    @property
    def group_name(self) -> str:
        """The name's group part: `g{group_size}`, or `pc` per channel."""
        return "pc" if self.group_size is None else f"g{self.group_size}"

    @property
    def suffix_name(self) -> str:
        """The name's trailing suffix: `-bf16`, `-dq` (never both) or empty."""
        return ("" if self.scale_dtype == _DEFAULT_SCALE_DTYPE else f"-{self.scale_dtype}") + self.dq_name

    @classmethod
    def parse_name(cls, text: object, pattern: re.Pattern, grammar: str, family: str,
                   fields: Callable[[re.Match], dict[str, Any]]):
        """A family's name (case-insensitive, surrounding whitespace ignored) matched by `pattern`,
        whose groups `group` / `pc` and `suffix` are read here and the family's own by
        fields(match) -> its other constructor keywords; refuses anything else with one FormatError
        naming the family and its grammar."""
        if not isinstance(text, str):
            raise FormatError(f"format must be a string, got {type(text).__name__}; {grammar}")
        m = pattern.fullmatch(text.strip().lower())
        if m is None:
            raise FormatError(f"cannot parse {family} format {text!r}: {grammar}")
        dq, scale_dtype = dq_suffix(text, m["suffix"], grammar, family)
        try:
            return cls(group_size=None if m["pc"] else int(m["group"]), scale_dtype=scale_dtype, dq=dq, **fields(m))
        except FormatError as e:
            raise FormatError(f"invalid {family} format {text!r}: {e}; {grammar}") from None

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Bits the packed layer holds per weight, overheads included."""
        return self.nbytes(out_features, in_features).total * 8 / (out_features * in_features)


    # ---- JSON (the dataclass fields of the family) --------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_JSON_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise FormatError(f"quantization format JSON must be an object, got {type(d).__name__}")
        version = d.get("version")
        if version != FORMAT_JSON_VERSION:
            raise FormatError(f"quantization format JSON has version {version!r}; this tightfit reads version {FORMAT_JSON_VERSION}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = set(d) - names - {"version"}
        if unknown:
            raise FormatError(f"quantization format JSON has unknown keys {sorted(unknown)}; expected {sorted(names)}")
        for f in fields:
            if f.default is dataclasses.MISSING and f.name not in d:
                raise FormatError(f"quantization format JSON lacks {f.name!r}")
        return cls(**{k: v for k, v in d.items() if k in names})


def check_group_size(group_size: object) -> None:
    """Refuse a group size outside GROUP_SIZES (None = per channel)."""
    if group_size is not None and (not _is_int(group_size) or group_size not in GROUP_SIZES):
        raise FormatError(
            f"group size {group_size!r} is not in the format table; choose one of "
            f"{', '.join(str(g) for g in GROUP_SIZES if g is not None)} or None (per channel)"
        )


def check_scale_dtype(scale_dtype: object) -> None:
    """Refuse a scale dtype outside SCALE_DTYPES."""
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"scale dtype {scale_dtype!r} is not in the format table; choose one of {', '.join(SCALE_DTYPES)}")


@dataclass(frozen=True)
class QuantFormat(GroupedFormat):
    """One entry of the format table.

    bits:        code width, one of BITS
    group_size:  weights per (scale, zero) group along in_features, one of GROUP_SIZES;
                 None = per channel (one group per output row)
    symmetric:   True: w = (q - 2**(bits-1)) * s, no zero points stored;
                 False: w = (q - z) * s with an integer zero point z per group
    scale_dtype: "fp16" or "bf16", the dtype scales are stored in
    dq:          double-quantized scales (DoubleQuant): 6-bit codes under fp16 super-scales
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = _DEFAULT_SCALE_DTYPE
    dq: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in BITS:
            raise FormatError(f"bits {self.bits!r} is not in the format table; choose one of {', '.join(map(str, BITS))}")
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"symmetric must be True or False, got {self.symmetric!r}")
        check_scale_dtype(self.scale_dtype)
        self.check_dq()

    # ---- names -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Canonical name, e.g. `w4g128`, `w3g64-sym`, `w8pc-bf16`, `w3g16-dq`; `QuantFormat.parse(f.name) == f`."""
        return f"w{self.bits}{self.group_name}{'-sym' if self.symmetric else ''}{self.suffix_name}"

    @classmethod
    def parse(cls, text: str) -> QuantFormat:
        """Parse a format name (case-insensitive, surrounding whitespace ignored)."""
        return cls.parse_name(text, _NAME_RE, GRAMMAR, "quantization",
                              lambda m: {"bits": int(m["bits"]), "symmetric": m["sym"] is not None})

    # ---- bytes -------------------------------------------------------------------------------

    def nbytes(self, out_features: int, in_features: int) -> LayerBytes:
        """Exact bytes of a packed [out_features, in_features] layer (see module docstring)."""
        check_features("out_features", out_features)
        n, k = out_features, in_features
        g = self.num_groups(k)
        return LayerBytes(
            codes=packed_nbytes(n * k, self.bits),
            scales=self.scale_nbytes(n, k),
            zeros=0 if self.symmetric else packed_nbytes(n * g, self.bits),
        )


def all_formats() -> tuple[QuantFormat, ...]:
    """Every format in the table without -dq: BITS x GROUP_SIZES x (asym, sym) x SCALE_DTYPES
    (`with_dq` gives each grouped fp16 one its -dq twin)."""
    return tuple(
        QuantFormat(bits=b, group_size=g, symmetric=s, scale_dtype=d)
        for b, g, s, d in itertools.product(BITS, GROUP_SIZES, (False, True), SCALE_DTYPES)
    )


def with_dq(formats: tuple[GroupedFormat, ...]) -> tuple[GroupedFormat, ...]:
    """The -dq twin of each format that can have one (grouped, fp16 scales)."""
    return tuple(dataclasses.replace(f, dq=True) for f in formats if f.scale_dtype == "fp16" and f.group_size and not f.dq)


def check_features(what: str, value: int) -> None:
    if not _is_int(value) or value <= 0:
        raise FormatError(f"{what} must be a positive integer, got {value!r}")


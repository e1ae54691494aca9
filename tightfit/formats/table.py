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

Names follow a small grammar (see `GRAMMAR`), e.g. `w4g128`, `w3g64-sym`, `w8pc-bf16`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import packed_nbytes

BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
GROUP_SIZES: tuple[int | None, ...] = (16, 32, 64, 128, None)  # None = per channel (one group spans a whole row)
SCALE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}

FORMAT_JSON_VERSION = 1

GRAMMAR = (
    "expected w{bits}g{group} or w{bits}pc (per channel), optionally followed by -sym and then -bf16, "
    f"with bits in {{{', '.join(map(str, BITS))}}} and group in "
    f"{{{', '.join(str(g) for g in GROUP_SIZES if g is not None)}}} "
    "(e.g. w3g64, w4g128-sym, w8pc, w2g16-bf16, w4g32-sym-bf16)"
)
_NAME_RE = re.compile(r"w(?P<bits>[1-9][0-9]*)(?:g(?P<group>[1-9][0-9]*)|(?P<pc>pc))(?P<sym>-sym)?(?P<bf16>-bf16)?")
_DEFAULT_SCALE_DTYPE = "fp16"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def group_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each group of group_size columns along K; the last one may be narrower."""
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


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
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = _DEFAULT_SCALE_DTYPE

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in BITS:
            raise FormatError(f"bits {self.bits!r} is not in the format table; choose one of {', '.join(map(str, BITS))}")
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"symmetric must be True or False, got {self.symmetric!r}")
        check_scale_dtype(self.scale_dtype)

    # ---- names -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Canonical name, e.g. `w4g128`, `w3g64-sym`, `w8pc-bf16`; `QuantFormat.parse(f.name) == f`."""
        group = "pc" if self.group_size is None else f"g{self.group_size}"
        sym = "-sym" if self.symmetric else ""
        dtype = "" if self.scale_dtype == _DEFAULT_SCALE_DTYPE else f"-{self.scale_dtype}"
        return f"w{self.bits}{group}{sym}{dtype}"

    @classmethod
    def parse(cls, text: str) -> QuantFormat:
        """Parse a format name (case-insensitive, surrounding whitespace ignored)."""
        if not isinstance(text, str):
            raise FormatError(f"format must be a string, got {type(text).__name__}; {GRAMMAR}")
        m = _NAME_RE.fullmatch(text.strip().lower())
        if m is None:
            raise FormatError(f"cannot parse quantization format {text!r}: {GRAMMAR}")
        try:
            return cls(
                bits=int(m["bits"]),
                group_size=None if m["pc"] else int(m["group"]),
                symmetric=m["sym"] is not None,
                scale_dtype="bf16" if m["bf16"] else _DEFAULT_SCALE_DTYPE,
            )
        except FormatError as e:
            raise FormatError(f"invalid quantization format {text!r}: {e}; {GRAMMAR}") from None

    # ---- bytes -------------------------------------------------------------------------------

    def nbytes(self, out_features: int, in_features: int) -> LayerBytes:
        """Exact bytes of a packed [out_features, in_features] layer (see module docstring)."""
        check_features("out_features", out_features)
        n, k = out_features, in_features
        g = self.num_groups(k)
        return LayerBytes(
            codes=packed_nbytes(n * k, self.bits),
            scales=n * g * self.scale_torch_dtype.itemsize,
            zeros=0 if self.symmetric else packed_nbytes(n * g, self.bits),
        )


def all_formats() -> tuple[QuantFormat, ...]:
    """Every format in the table: BITS x GROUP_SIZES x (asym, sym) x SCALE_DTYPES."""
    return tuple(
        QuantFormat(bits=b, group_size=g, symmetric=s, scale_dtype=d)
        for b, g, s, d in itertools.product(BITS, GROUP_SIZES, (False, True), SCALE_DTYPES)
    )


def check_features(what: str, value: int) -> None:
    if not _is_int(value) or value <= 0:
        raise FormatError(f"{what} must be a positive integer, got {value!r}")


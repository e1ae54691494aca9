"""Double-quantized group scales (table.DoubleQuant): pure primitives, no I/O.

A -dq format stores, per row, one fp16 super-scale d per super-block of DQ.super_block weights
along K and each group's scale as a 6-bit code c, s = fp16(d * c). Tensors carry the scales
dequantized ([N, G] fp32, exactly fp16 values) next to their super-scales ([N, S] fp32, fp16
values), so every consumer of `scales` (dequantize, the engine's kernels, export) reads them as a
plain fp16-scale format does. Loading a packed file expands the codes to those scales, so the
engine runs the base format's kernels unchanged: the same decode speed and resident bytes as the
base format, only the file (and the planner's bytes, fmt.nbytes) is smaller. What is stored:

    super_scales [N, S] fp16
    scale_codes  [ceil(N*G*6/8)] uint8, the codes row-major, bit-packed LSB-first (bitpack.py);
                 positive scales store c, signed scales c + 32

Rounding (`codes_on`): a code is round(|s| / d) (nearest) or ceil(|s| / d) (up: a scale never
shrinks, so no weight clips beyond the range its group chose), clamped to the codes. Which one, and
how much headroom d gets, is the quantizer's choice (algorithms/builders.py, DQ_RTN_ROUNDING and
DQ_GPTQ_HEADROOM), measured on smollm2-135m: Hessian-weighted error tr(dW H dW^T) summed over the
q/k/o/gate/up/down projections of blocks 0, 15 and 29 (RTN) or 15 (GPTQ), H from 512 tokens,
relative to the base format's error:

    RTN          w3g16   w3g32   w4g32-sym  w2g32   nl4g32
      nearest    +0.5 %  +0.5 %  +0.4 %     +0.0 %  +1.4 %
      up         -2.2 %  -2.8 %  -5.1 %     -1.4 %  -2.8 %
    GPTQ, headroom 1.0 / 1.1 / 1.25 (d fixed before the sweep, see builders.py):
      nearest    w3g32 +4.9 / +0.8 / -0.0 %   w4g32-sym +2.8 / +0.8 / +0.5 %   nl4g32 +4.3 / +2.6 / +3.1 %
      up         w3g32 +5.4 / +0.7 / +0.4 %   w4g32-sym +2.9 / +0.9 / +0.7 %   nl4g32 +8.9 / +8.3 / +9.8 %
      best       w3g32    - / +0.7 / +0.0 %                                    nl4g32    - / +2.4 / +2.6 %
    (best: the lower or upper code, whichever gives the group the smaller squared error; the
    builders' rounding, not one of `codes_on`'s)
"""

from __future__ import annotations

import torch

from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, unpack_bits
from tightfit.formats.table import DQ, GroupedFormat

ROUNDING = "nearest"  # the primitives' default; the quantizers pass their own (module docstring)
ROUNDINGS = ("nearest", "up", "down")
_FP16_SMALLEST = 2.0**-24  # fp16's smallest subnormal: a super-scale is never 0


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (x fp32 > 0, finite) as fp32; refuses an fp16 overflow."""
    x = x.clamp_min(_FP16_SMALLEST)
    h = x.to(torch.float16)
    up = h.to(torch.float32) < x
    h = torch.where(up, (h.view(torch.int16) + 1).view(torch.float16), h)  # next fp16 above (x > 0)
    out = h.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise FormatError(f"a group scale ({float(x.max()):.3g} per code) overflows the fp16 super-scale of -dq")
    return out


def per_group(super_stat: torch.Tensor, fmt: GroupedFormat, in_features: int) -> torch.Tensor:
    """A statistic per super-block [..., S] repeated over its groups: [..., G]."""
    return super_stat[..., fmt.super_block_of_groups(in_features)]


def choose_super_scales(scales: torch.Tensor, fmt: GroupedFormat, in_features: int, headroom: float = 1.0) -> torch.Tensor:
    """The super-scale of each super-block: scales [N, G] fp32 (signed when fmt.signed_scales)
    -> d [N, S] fp32, fp16 values > 0, the smallest with max |s| * headroom <= d * code_max (so
    rounding to the nearest code never clips the largest scale)."""
    assert scales.dtype == torch.float32 and scales.dim() == 2, f"scales must be fp32 [N, G], got {scales.dtype} {tuple(scales.shape)}"
    n, g = scales.shape
    assert g == fmt.num_groups(in_features), (g, fmt.name, in_features)
    per = DQ.groups_per_super(fmt.group_size)
    s = fmt.num_super_blocks(in_features)
    mag = torch.zeros(n, s * per)
    mag[:, :g] = scales.abs()
    top = mag.view(n, s, per).amax(dim=-1)  # [N, S]
    return fp16_round_up(top * headroom / DQ.code_max(fmt.signed_scales))


def codes_on(scales: torch.Tensor, d: torch.Tensor, signed: bool, rounding: str = ROUNDING) -> torch.Tensor:
    """The codes of scales on super-scales d of the same shape (each scale's own super-scale):
    int64, |c| in 1 .. code_max, the sign of the scale kept (signed formats; positive ones have
    s > 0). rounding: "nearest" c = round(|s| / d), "up" c = ceil(|s| / d), "down" floor(|s| / d);
    clamped to the codes."""
    assert rounding in ROUNDINGS, rounding
    ratio = scales.abs() / d
    if rounding == "nearest":
        mag = ratio.round()
    elif rounding == "up":
        mag = (ratio * (1 - 2**-20)).ceil()  # ignoring fp32 noise above an integer
    else:
        mag = (ratio * (1 + 2**-20)).floor()
    mag = mag.clamp(1, DQ.code_max(signed))
    return torch.where(scales < 0, -mag, mag).to(torch.int64)


def scale_codes(scales: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat, in_features: int,
                rounding: str = ROUNDING) -> torch.Tensor:
    """The code of each group's scale: scales [N, G], d [N, S] -> c [N, G] int64 (`codes_on`)."""
    return codes_on(scales, per_group(d, fmt, in_features), fmt.signed_scales, rounding)


def dequantize_scales(codes: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat, in_features: int) -> torch.Tensor:
    """codes [N, G] int64, d [N, S] -> scales fp16(d * c) as fp32 [N, G] (d * c is exact in fp32:
    11 by 6 significant bits)."""
    return _fp16_product(codes, per_group(d, fmt, in_features), fmt)


def _fp16_product(codes: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat) -> torch.Tensor:
    s = (codes.to(torch.float32) * d).to(torch.float16).to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise FormatError(f"format {fmt.name}: a double-quantized scale overflows fp16")
    return s


def snap_scales(scales: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat, in_features: int,
                rounding: str = ROUNDING) -> torch.Tensor:
    """Group scales [N, G] put on their super-blocks' grids d [N, S]: fp16(d * c) [N, G] fp32."""
    return dequantize_scales(scale_codes(scales, d, fmt, in_features, rounding), d, fmt, in_features)


def snap_group(scale: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat, rounding: str = ROUNDING) -> torch.Tensor:
    """One group's scales [N] on its super-block's super-scales d [N] (GPTQ's builders): [N] fp32."""
    return _fp16_product(codes_on(scale, d, fmt.signed_scales, rounding), d, fmt)


# ---- storage ------------------------------------------------------------------------------------


def pack_scales(scales: torch.Tensor, d: torch.Tensor, fmt: GroupedFormat) -> dict[str, torch.Tensor]:
    """The stored form of -dq scales [N, G] (on the grid of d [N, S]): super_scales [N, S] fp16 and
    scale_codes [ceil(N*G*6/8)] uint8. Refuses scales that are not fp16(d * c) for a valid c."""
    n, g = scales.shape
    k = g * fmt.group_size  # any K with G groups has the same super-blocks
    c = scale_codes(scales, d, fmt, k)
    assert torch.equal(dequantize_scales(c, d, fmt, k), scales), f"{fmt.name} scales are not on their super-scales' grid"
    offset = 1 << (DQ.code_bits - 1) if fmt.signed_scales else 0
    return {"super_scales": d.to(torch.float16), "scale_codes": pack_bits((c + offset).to(torch.uint8), DQ.code_bits)}


def unpack_scales(fmt: GroupedFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_scales` for a [N, K] layer: (scales [N, G] fp32, d [N, S] fp32); raises
    FormatError on wrong dtypes, sizes or codes."""
    n, k = shape
    g, s = fmt.num_groups(k), fmt.num_super_blocks(k)
    d = tensors["super_scales"]
    if d.dtype != torch.float16 or tuple(d.shape) != (n, s):
        raise FormatError(f"packed {fmt.name} super_scales must be torch.float16 [{n}, {s}], got {d.dtype} {tuple(d.shape)}")
    d = d.to(torch.float32)
    if not bool((torch.isfinite(d) & (d > 0)).all()):
        raise FormatError(f"packed {fmt.name} super_scales must be finite and positive")
    stored = unpack_bits(tensors["scale_codes"], DQ.code_bits, n * g).view(n, g).to(torch.int64)  # [N, G]
    c = stored - (1 << (DQ.code_bits - 1)) if fmt.signed_scales else stored
    if bool((c == 0).any()):
        raise FormatError(f"packed {fmt.name} scale_codes hold a zero scale")
    if bool((c.abs() > DQ.code_max(fmt.signed_scales)).any()):
        raise FormatError(f"packed {fmt.name} scale_codes hold a code beyond +-{DQ.code_max(fmt.signed_scales)}")
    return dequantize_scales(c, d, fmt, k), d

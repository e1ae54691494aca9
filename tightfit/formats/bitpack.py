"""Bit packing of integer codes into a dense uint8 stream.

Layout (LSB-first bit stream): code i occupies stream bits [i*bits, (i+1)*bits), its least
significant bit first; stream bit j lives in byte j // 8 at bit position j % 8. The stream is
ceil(numel*bits/8) bytes; unused high bits of the last byte are zero.

Eight codes of `bits` bits fill exactly `bits` bytes, so both directions work on blocks of eight
codes held in one int64 word (8 codes * at most 8 bits = 64 bits): no Python loop over elements.
"""

from __future__ import annotations

import torch

from tightfit.errors import FormatError

UNPACK_BLOCKS = 1 << 20  # unpack_bits: blocks of 8 codes converted at once
PACK_BLOCKS = 1 << 20  # pack_bits: the same
_CODES_PER_BLOCK = 8  # 8 codes of b bits == b bytes
_INTEGER_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes of `bits` bits each, bit-packed back to back: ceil(numel*bits/8)."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise FormatError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in 0 .. 2**bits-1) into a 1-D uint8 stream.

    codes: [...] integer dtype, flattened row-major -> [ceil(numel*bits/8)] uint8
    """
    _check_bits(bits)
    if codes.dtype not in _INTEGER_DTYPES:
        raise FormatError(f"codes must have an integer dtype, got {codes.dtype}")
    flat = codes.detach().reshape(-1)  # [n]
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise FormatError(f"codes must lie in 0..{(1 << bits) - 1} to pack at {bits} bits, found values in {lo}..{hi}")
    if bits == 8:
        return flat.to(torch.uint8).clone()

    num_blocks = -(-n // _CODES_PER_BLOCK)
    shifts = torch.arange(_CODES_PER_BLOCK, dtype=torch.int64, device=codes.device) * bits  # [8]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8  # [bits]
    out = torch.empty(num_blocks * bits, dtype=torch.uint8, device=codes.device)
    # PACK_BLOCKS blocks at a time, as unpack_bits: int64 words of a 151936 x 1536 embedding packed at
    # once cost 2 x 1.9 GB
    for b0 in range(0, num_blocks, PACK_BLOCKS):
        b1 = min(num_blocks, b0 + PACK_BLOCKS)
        padded = torch.zeros((b1 - b0) * _CODES_PER_BLOCK, dtype=torch.int64, device=codes.device)
        part = flat[b0 * _CODES_PER_BLOCK : b1 * _CODES_PER_BLOCK]
        padded[: part.numel()] = part
        # The 8 codes occupy disjoint bit ranges, so OR == sum; sum stays < 2**(8*bits) <= 2**56.
        words = (padded.view(b1 - b0, _CODES_PER_BLOCK) << shifts).sum(dim=1, keepdim=True)  # [b, 1] int64
        out[b0 * bits : b1 * bits] = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return out[: packed_nbytes(n, bits)].clone()  # [ceil(n*bits/8)]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [ceil(numel*bits/8)] uint8 -> [numel] uint8 codes."""
    _check_bits(bits)
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise FormatError(f"numel must be a non-negative integer, got {numel!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise FormatError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise FormatError(
            f"packed codes hold {packed.numel()} bytes but {numel} codes at {bits} bits need exactly {expected}"
        )
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return packed.clone()

    num_blocks = -(-numel // _CODES_PER_BLOCK)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8  # [bits]
    shifts = torch.arange(_CODES_PER_BLOCK, dtype=torch.int64, device=packed.device) * bits  # [8]
    out = torch.empty(num_blocks * _CODES_PER_BLOCK, dtype=torch.uint8, device=packed.device)
    # UNPACK_BLOCKS blocks at a time: the int64 words cost 8 bytes per code (1.9 GB for a 151936 x 1536
    # embedding unpacked at once)
    for b0 in range(0, num_blocks, UNPACK_BLOCKS):
        b1 = min(num_blocks, b0 + UNPACK_BLOCKS)
        padded = torch.zeros((b1 - b0) * bits, dtype=torch.int64, device=packed.device)
        part = packed[b0 * bits : b1 * bits]
        padded[: part.numel()] = part
        words = (padded.view(b1 - b0, bits) << byte_shifts).sum(dim=1, keepdim=True)  # [b, 1] int64, < 2**56
        out[b0 * _CODES_PER_BLOCK : b1 * _CODES_PER_BLOCK] = ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)
    return out[:numel]  # [numel]

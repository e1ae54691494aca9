"""Bit packing: exact round trips, the documented LSB-first layout, and refusal of bad input."""

import math

import pytest
import torch

from tightfit.errors import FormatError
from tightfit.formats import pack_bits, unpack_bits


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Bit by bit: code i occupies stream bits i*bits .. i*bits+bits-1, LSB first."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, c in enumerate(codes):
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((c >> j) & 1) << (pos % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_round_trip_and_reference_layout(bits, numel):
    g = torch.Generator().manual_seed(bits * 10_000 + numel)
    codes = torch.randint(0, 1 << bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(numel * bits / 8),)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    out = unpack_bits(packed, bits, numel)
    assert out.dtype == torch.uint8 and out.shape == (numel,)
    assert torch.equal(out, codes)


def test_known_bytes():
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 5=101, 3=011, 7=111 -> stream bits 1,0,1, 1,1,0, 1,1,1 -> bytes 0b11011101, 0b00000001
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


def test_extreme_values_and_other_integer_dtypes():
    for bits in range(1, 9):
        top = (1 << bits) - 1
        codes = torch.tensor([top] * 13 + [0] * 3, dtype=torch.int64)
        assert unpack_bits(pack_bits(codes, bits), bits, 16).tolist() == codes.tolist()


def test_multidimensional_input_is_flattened_row_major():
    codes = torch.arange(48, dtype=torch.uint8).reshape(4, 12) % 8  # [4, 12]
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, 48).view(4, 12), codes)
    assert torch.equal(pack_bits(codes, 3), pack_bits(codes.reshape(-1), 3))


def test_empty():
    assert pack_bits(torch.empty(0, dtype=torch.uint8), 3).numel() == 0
    assert unpack_bits(torch.empty(0, dtype=torch.uint8), 3, 0).numel() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_out_of_range_values_rejected(bits):
    with pytest.raises(FormatError, match=rf"0\.\.{(1 << bits) - 1} .* {bits} bits"):
        pack_bits(torch.tensor([0, 1 << bits, 1], dtype=torch.int32), bits)
    with pytest.raises(FormatError, match=r"found values in -1\.\."):
        pack_bits(torch.tensor([-1, 0], dtype=torch.int64), bits)


def test_bad_arguments_rejected():
    with pytest.raises(FormatError, match="integer dtype"):
        pack_bits(torch.tensor([1.0, 2.0]), 4)
    with pytest.raises(FormatError, match="bit width"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    packed = pack_bits(torch.zeros(10, dtype=torch.uint8), 3)  # 4 bytes
    with pytest.raises(FormatError, match="hold 4 bytes but 11 codes at 3 bits need exactly 5"):
        unpack_bits(packed, 3, 11)
    with pytest.raises(FormatError, match="need exactly 4"):
        unpack_bits(torch.cat([packed, packed[:1]]), 3, 10)
    with pytest.raises(FormatError, match="1-D uint8"):
        unpack_bits(packed.to(torch.int32), 3, 10)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_unpack_in_pieces_equals_unpack_at_once(bits, monkeypatch):
    """unpack_bits converts UNPACK_BLOCKS blocks of 8 codes at a time (a big embedding's int64 words
    would be GBs): the pieces, a partial last block included, give the codes back exactly."""
    from tightfit.formats import bitpack

    codes = torch.randint(0, 2**bits, (1000 * 8 + 5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = bitpack.pack_bits(codes, bits)
    monkeypatch.setattr(bitpack, "UNPACK_BLOCKS", 7)
    assert torch.equal(bitpack.unpack_bits(packed, bits, codes.numel()), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7])
def test_pack_in_pieces_equals_pack_at_once(bits, monkeypatch):
    """pack_bits packs PACK_BLOCKS blocks of 8 codes at a time: the same bytes as one piece, a partial
    last block included."""
    from tightfit.formats import bitpack

    codes = torch.randint(0, 2**bits, (1000 * 8 + 5,), dtype=torch.int32, generator=torch.Generator().manual_seed(bits))
    whole = bitpack.pack_bits(codes, bits)
    monkeypatch.setattr(bitpack, "PACK_BLOCKS", 7)
    pieces = bitpack.pack_bits(codes, bits)
    assert pieces.numel() == bitpack.packed_nbytes(codes.numel(), bits)
    assert torch.equal(pieces, whole)
    assert torch.equal(bitpack.unpack_bits(pieces, bits, codes.numel()).to(torch.int32), codes)

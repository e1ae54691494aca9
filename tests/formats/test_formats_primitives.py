"""Quantize/dequantize primitives and QuantizedTensor: grids, error floors, exact storage."""

import math

import pytest
import torch

from tightfit.errors import FormatError
from tightfit.formats import (
    BITS,
    GROUP_SIZES,
    QuantFormat,
    QuantizedTensor,
    all_formats,
    choose_qparams,
    dequantize,
    quantize,
    quantize_rtn,
    search_shrink,
)

FP16_SCALE_FORMATS = [f for f in all_formats() if f.scale_dtype == "fp16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * math.log10(w.square().sum().item() / (w - w_hat).square().sum().item())


def group_sq_err(w: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """[N, G] squared error per group."""
    n, k = w.shape
    g = qt.fmt.num_groups(k)
    return (w - qt.dequantize()).square().view(n, g, k // g).sum(-1)


# ---- storage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_pack_unpack_round_trip_and_exact_bytes(fmt):
    n, k = 48, 256
    qt = quantize_rtn(gaussian(n, k, seed=fmt.bits), fmt, clip_search=False)
    tensors = qt.pack()
    assert set(tensors) == ({"qweight", "scales"} if fmt.symmetric else {"qweight", "scales", "qzeros"})
    assert tensors["scales"].dtype == fmt.scale_torch_dtype
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == fmt.nbytes(n, k).total == qt.nbytes().total
    assert tensors["qweight"].numel() == fmt.nbytes(n, k).codes

    back = QuantizedTensor.unpack(fmt, (n, k), tensors)
    assert back.shape == (n, k)
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.scales, qt.scales)
    assert (back.zeros is None) == (qt.zeros is None) == fmt.symmetric
    if qt.zeros is not None:
        assert torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.dequantize(), qt.dequantize())  # stored data dequantizes bit-identically


def test_unpack_rejects_bad_tensors():
    fmt = QuantFormat.parse("w3g64")
    n, k = 8, 128
    good = quantize_rtn(gaussian(n, k), fmt).pack()
    with pytest.raises(FormatError, match=r"needs keys \['qweight', 'qzeros', 'scales'\]"):
        QuantizedTensor.unpack(fmt, (n, k), {k_: v for k_, v in good.items() if k_ != "qzeros"})
    with pytest.raises(FormatError, match="needs keys"):
        QuantizedTensor.unpack(QuantFormat.parse("w3g64-sym"), (n, k), good)  # zeros for a symmetric format
    with pytest.raises(FormatError, match=r"scales must be torch.float16 \[8, 2\]"):
        QuantizedTensor.unpack(fmt, (n, k), {**good, "scales": good["scales"].float()})
    with pytest.raises(FormatError, match=r"scales must be .*\[8, 2\]"):
        QuantizedTensor.unpack(fmt, (n, k), {**good, "scales": good["scales"][:, :1]})
    with pytest.raises(FormatError, match="need exactly"):
        QuantizedTensor.unpack(fmt, (n, k), {**good, "qweight": good["qweight"][:-1]})
    with pytest.raises(FormatError, match="need exactly"):
        QuantizedTensor.unpack(fmt, (n, k + 64), good)
    with pytest.raises(FormatError, match="finite and positive"):
        QuantizedTensor.unpack(fmt, (n, k), {**good, "scales": torch.zeros_like(good["scales"])})
    with pytest.raises(FormatError, match="need exactly"):
        QuantizedTensor.unpack(fmt, (n, 100), good)


# ---- grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_dequantized_values_lie_on_the_grid(fmt):
    n, k = 16, 256
    w = gaussian(n, k, seed=1) * 0.02
    qt = quantize_rtn(w, fmt)
    g = fmt.num_groups(k)
    gw = k // g
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) < 2**fmt.bits
    # Scales are exactly representable in the scale dtype and positive.
    assert torch.equal(qt.scales.to(fmt.scale_torch_dtype).float(), qt.scales)
    assert bool((qt.scales > 0).all())
    levels = qt.dequantize().view(n, g, gw) / qt.scales.unsqueeze(-1)  # [N, G, gw] signed integer levels
    assert torch.equal(levels, levels.round())
    if fmt.symmetric:
        assert qt.zeros is None
        lo, hi = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
        assert int(levels.min()) >= lo and int(levels.max()) <= hi
        assert torch.equal(levels + 2 ** (fmt.bits - 1), qt.codes.view(n, g, gw).float())
    else:
        z = qt.zeros
        assert torch.equal(z, z.round()) and int(z.min()) >= 0 and int(z.max()) < 2**fmt.bits
        assert torch.equal(levels + z.unsqueeze(-1), qt.codes.view(n, g, gw).float())


@pytest.mark.parametrize("fmt", [QuantFormat.parse(s) for s in ["w2g16", "w3g64-sym", "w4pc", "w8g32-bf16"]], ids=str)
def test_codes_are_round_to_nearest(fmt):
    """No neighbouring code (q +- 1, inside the grid) is closer to w than the chosen one."""
    n, k = 32, 128
    w = gaussian(n, k, seed=2)
    g = fmt.num_groups(k)
    wg = w.view(n, g, k // g)  # [N, G, gw]
    scale, zero = choose_qparams(wg, fmt)
    scale_, zero_ = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    q = quantize(wg, scale_, zero_, fmt.bits)
    err = (wg - dequantize(q, scale_, zero_, fmt.bits)).abs()
    for step in (-1, 1):
        q_alt = (q.long() + step).clamp(0, 2**fmt.bits - 1).to(torch.uint8)
        err_alt = (wg - dequantize(q_alt, scale_, zero_, fmt.bits)).abs()
        assert bool((err <= err_alt).all())
    # Inside the covered range the error is at most half a step (plus fp32 rounding).
    assert bool((err <= scale_ * (0.5 + 2**fmt.bits * 2**-7)).all())


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_scale_is_the_tightest_covering_grid(bits):
    half = 2 ** (bits - 1)
    # Negative extreme: uses the extra level -2**(b-1).
    scale, zero = choose_qparams(torch.tensor([[-4.0, 1.0]]), QuantFormat(bits, 16, symmetric=True))
    assert zero is None and scale.shape == (1,)
    assert scale.item() == pytest.approx(max(4.0 / half, 1.0 / (half - 1)), rel=2**-10)
    # Positive extreme: the largest level is 2**(b-1)-1.
    scale, _ = choose_qparams(torch.tensor([[-1.0, 4.0]]), QuantFormat(bits, 16, symmetric=True))
    assert scale.item() == pytest.approx(max(4.0 / (half - 1), 1.0 / half), rel=2**-10)


def test_asymmetric_qparams_by_hand():
    # Range [-1, 2] at 2 bits: scale 3/3 = 1, zero round(1/1) = 1 -> levels -1, 0, 1, 2.
    scale, zero = choose_qparams(torch.tensor([[-1.0, 0.5, 2.0]]), QuantFormat(2, 16))
    assert scale.tolist() == [1.0] and zero.tolist() == [1.0]
    # All-positive range still includes 0: [0, 3] -> scale 0.2 (fp16-rounded), zero 0.
    scale, zero = choose_qparams(torch.tensor([[1.0, 3.0]]), QuantFormat(4, 16))
    assert scale.item() == torch.tensor(0.2).half().item() and zero.tolist() == [0.0]
    # Shrink scales the range per group.
    scale, zero = choose_qparams(torch.tensor([[-1.0, 2.0], [-1.0, 2.0]]), QuantFormat(2, 16), torch.tensor([1.0, 0.5]))
    assert scale.tolist() == [1.0, 0.5] and zero.tolist() == [1.0, 1.0]


# ---- error floors ----------------------------------------------------------------------------

# Measured RTN SQNR (dB) with clip search on gaussian [256, 512], seed 0, w{b}g128 asymmetric fp16:
#   2: 8.7  3: 14.6  4: 20.4  5: 26.4  6: 32.4  8: 44.5   (about 6 dB per bit)
# Floors are 0.5 dB below; a scale or zero off by one grid step, a lost bit or a dropped clip
# search falls well below them.
REFERENCE_FLOOR_DB = {2: 8.2, 3: 14.1, 4: 19.9, 5: 25.9, 6: 31.9, 8: 44.0}


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("bits", BITS)
def test_rtn_sqnr_reference_floor(bits, scale_dtype):
    w = gaussian(256, 512, seed=0)
    fmt = QuantFormat(bits, 128, scale_dtype=scale_dtype)
    assert sqnr_db(w, quantize_rtn(w, fmt).dequantize()) > REFERENCE_FLOOR_DB[bits]


@pytest.mark.parametrize("fmt", FP16_SCALE_FORMATS, ids=lambda f: f.name)
def test_rtn_sqnr_floor_every_format(fmt):
    # Measured on this weight: the worst format per bit width (per channel, symmetric) is at
    # 6.0*b - 5.4 dB (8 bits) or better; a lost bit costs 6 dB.
    w = gaussian(64, 512, seed=0)
    assert sqnr_db(w, quantize_rtn(w, fmt).dequantize()) > 6.0 * fmt.bits - 6.5


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_smaller_groups_are_more_accurate(bits, symmetric):
    w = gaussian(128, 512, seed=3)
    sqnr = [sqnr_db(w, quantize_rtn(w, QuantFormat(bits, g, symmetric)).dequantize()) for g in GROUP_SIZES]
    assert sqnr == sorted(sqnr, reverse=True)  # 16 > 32 > 64 > 128 > per channel


@pytest.mark.parametrize("fmt", FP16_SCALE_FORMATS, ids=lambda f: f.name)
def test_clip_search_never_increases_group_error(fmt):
    w = gaussian(64, 256, seed=4)
    w[:, 7] *= 8.0  # an outlier column, where clipping pays off
    plain = group_sq_err(w, quantize_rtn(w, fmt, clip_search=False))
    clipped = group_sq_err(w, quantize_rtn(w, fmt, clip_search=True))
    assert bool((clipped <= plain).all())
    if fmt.bits <= 3:
        assert clipped.sum() < 0.95 * plain.sum()  # and at low bits it clearly helps


def test_search_shrink_weighted():
    fmt = QuantFormat.parse("w3g32")
    w = gaussian(32, 128, seed=5).view(32, 4, 32)  # [N, G, gw]
    importance = torch.rand(32, generator=torch.Generator().manual_seed(6))  # [gw]
    shrink = search_shrink(w, fmt, weight=importance)
    assert shrink.shape == (32, 4) and bool(((shrink >= 0.5) & (shrink <= 1.0)).all())

    def weighted_err(s):
        scale, zero = choose_qparams(w, fmt, s)
        scale_, zero_ = scale.unsqueeze(-1), zero.unsqueeze(-1)
        w_hat = dequantize(quantize(w, scale_, zero_, fmt.bits), scale_, zero_, fmt.bits)
        return ((w - w_hat).square() * importance).sum(-1)  # [N, G]

    best = weighted_err(shrink)
    for p in (1.0, 0.9, 0.75, 0.5):
        assert bool((best <= weighted_err(p)).all())
    # Ties keep the earliest grid entry: an all-zero weight is exact at every shrink.
    assert torch.equal(search_shrink(torch.zeros(3, 4, 32), fmt, grid=(0.9, 1.0, 0.5)), torch.full((3, 4), 0.9))
    # A grid of one value returns that value everywhere.
    assert torch.equal(search_shrink(w, fmt, grid=(0.8,)), torch.full((32, 4), 0.8))


# ---- exact cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_constant_rows_dequantize_exactly(fmt):
    k = 256
    values = [0.0, 0.5, -1.25, 3.0, -0.0078125, 96.0]  # representable in fp16 and bf16
    w = torch.tensor(values).unsqueeze(1).expand(-1, k).contiguous()  # [6, 256]
    w = torch.cat([w, torch.zeros(1, k), torch.full((1, k), 1e-30)])  # all zero, and below fp16 range
    for clip_search in (False, True):
        qt = quantize_rtn(w, fmt, clip_search=clip_search)
        w_hat = qt.dequantize()
        assert bool(torch.isfinite(w_hat).all()) and bool(torch.isfinite(qt.scales).all())
        assert bool((qt.scales > 0).all())
        assert torch.equal(w_hat[: len(values) + 1], w[: len(values) + 1])
        assert (w_hat[-1] - w[-1]).abs().max().item() < 1e-29
        back = QuantizedTensor.unpack(fmt, qt.shape, qt.pack())
        assert torch.equal(back.dequantize(), w_hat)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_rtn_of_weight_on_a_grid_is_lossless(bits, symmetric):
    """W = (q - z) * s with fp16 s, every group hitting both ends of the code range, comes back exactly."""
    n, k, gs = 24, 256, 32
    g = k // gs
    gen = torch.Generator().manual_seed(100 + bits)
    q = torch.randint(0, 2**bits, (n, g, gs), generator=gen, dtype=torch.uint8)  # [N, G, gs]
    q[:, :, 0] = 0  # the extremes fix the range, so min/max RTN can recover the grid
    q[:, :, 1] = 2**bits - 1
    if symmetric:
        z = torch.full((n, g), 2.0 ** (bits - 1))
    else:
        z = torch.randint(0, 2**bits, (n, g), generator=gen).float()  # [N, G]
    s = (torch.rand(n, g, generator=gen) * 0.05 + 1e-3).half().float()  # [N, G] fp16-exact
    w = ((q.float() - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(n, k)  # [N, K]

    fmt = QuantFormat(bits, gs, symmetric=symmetric)
    qt = quantize_rtn(w, fmt)
    assert torch.equal(qt.codes, q.reshape(n, k))
    assert torch.equal(qt.scales, s)
    if not symmetric:
        assert torch.equal(qt.zeros, z)
    assert torch.equal(qt.dequantize(), w)
    assert torch.equal(QuantizedTensor.unpack(fmt, (n, k), qt.pack()).dequantize(), w)


def test_bad_weights_rejected():
    fmt = QuantFormat.parse("w4g32")
    w = gaussian(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(FormatError, match="NaN or inf"):
        quantize_rtn(w, fmt)
    with pytest.raises(FormatError, match="overflows fp16.*w4g32-bf16"):
        quantize_rtn(gaussian(4, 64) * 1e7, fmt)
    assert bool(torch.isfinite(quantize_rtn(gaussian(4, 64) * 1e7, QuantFormat.parse("w4g32-bf16")).scales).all())
    with pytest.raises(FormatError, match="shrink"):
        choose_qparams(gaussian(4, 32), fmt, 1.5)


@pytest.mark.parametrize("name", ["w3g128", "w4g64-sym", "w2g32"])
def test_ragged_last_group(name):
    """576 = 4 x 128 + 64: the last group of a row is narrower and has its own scale and zero."""
    fmt = QuantFormat.parse(name)
    w = gaussian(8, 576)
    q = quantize_rtn(w, fmt)
    g = fmt.group_width(576)
    assert q.scales.shape == (8, -(-576 // g))
    # each group dequantizes with its own parameters: requantizing one group alone gives the same codes
    lo = (576 // g) * g if 576 % g else 576 - g
    alone = quantize_rtn(w[:, lo:].contiguous(), QuantFormat(fmt.bits, 576 - lo, fmt.symmetric) if (576 - lo) in (16, 32, 64, 128) else fmt)
    assert torch.equal(alone.codes, q.codes[:, lo:])
    assert torch.equal(q.dequantize()[:, lo:], alone.dequantize())
    back = QuantizedTensor.unpack(fmt, (8, 576), q.pack())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert sum(t.numel() * t.element_size() for t in q.pack().values()) == fmt.nbytes(8, 576).total

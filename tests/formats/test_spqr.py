"""SpQR format: names, exact byte accounting, exact round trips of both statistic levels and the
sparse table, outlier selection, and GPTQ with SpQR."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tightfit.algorithms import gptq_quantize
from tightfit.algorithms.spqr import group_stats, quantize_spqr_rtn
from tightfit.errors import FormatError
from tightfit.formats import QuantFormat, quantize_rtn
from tightfit.formats.registry import parse_format, unpack_tensor
from tightfit.formats.spqr import (
    STAT_GROUP,
    SpQRFormat,
    SpQRTensor,
    dequantize_stats,
    quantize_dense,
    quantize_stats,
)


def _weight(n=64, k=96, seed=0, outlier_share=0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    spikes = torch.rand(n, k, generator=g) < outlier_share
    return torch.where(spikes, w * 10, w)


def _sqnr(w, w_hat) -> float:
    return 10 * math.log10(float((w**2).sum() / ((w - w_hat) ** 2).sum()))


@pytest.mark.parametrize("name", ["spqr-w3g16-s3-o1.0", "spqr-w2g32-s3-o0.5", "spqr-w4g8-s2-o0.0", "spqr-w3g16-s4-o2.5"])
def test_name_round_trip(name):
    fmt = parse_format(name)
    assert isinstance(fmt, SpQRFormat) and fmt.name == name and parse_format(fmt.name) == fmt


@pytest.mark.parametrize("bad", ["spqr-w5g16-s3-o1.0", "spqr-w3g128-s3-o1.0", "spqr-w3g16-s1-o1.0", "spqr-w3g16-s3-o20", "spqr-w3g16"])
def test_bad_names(bad):
    with pytest.raises(FormatError, match="SpQR"):
        parse_format(bad)


@pytest.mark.parametrize("n", [16, 40, 192])  # 40: a ragged second-level group
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_statistics_round_trip_and_cover_the_range(n, bits):
    x = torch.rand(5, n) * 3 + 0.01
    codes, step, minimum = quantize_stats(x, bits)
    assert codes.shape == (5, n) and step.shape == minimum.shape == (5, math.ceil(n / STAT_GROUP))
    assert torch.equal(step, step.half().float()) and torch.equal(minimum, minimum.half().float())
    x_hat = dequantize_stats(codes, step, minimum)
    # error at most half a step, the grid covers [min, max] of every group
    step_n = step.repeat_interleave(STAT_GROUP, 1)[:, :n]
    assert bool(((x - x_hat).abs() <= step_n / 2 + 1e-6).all())


@pytest.mark.parametrize("name", ["spqr-w3g16-s3-o1.0", "spqr-w2g32-s3-o0.5", "spqr-w4g8-s2-o0.0"])
@pytest.mark.parametrize("shape", [(64, 96), (40, 100)])  # 100: ragged last first-level group
def test_pack_unpack_is_exact_and_bytes_are_exact(name, shape):
    fmt = parse_format(name)
    w = _weight(*shape)
    q = quantize_spqr_rtn(w, fmt)
    packed = q.pack()
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert stored == q.nbytes().total == fmt.nbytes(*shape, n_outliers=q.n_outliers).total
    back = unpack_tensor(fmt, shape, packed)
    for field in ("codes", "rowptr", "cols", "values"):
        assert torch.equal(getattr(back, field), getattr(q, field)), field
    for stat in ("scale", "zero"):
        for field in ("codes", "step", "minimum"):
            assert torch.equal(getattr(getattr(back, stat), field), getattr(getattr(q, stat), field)), (stat, field)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.n_outliers <= fmt.max_outliers(*shape)


def test_outliers_are_the_spikes_and_are_nearly_exact():
    fmt = SpQRFormat(3, 16, 3, 1.0)
    w = _weight(128, 128, outlier_share=0.005)
    q = quantize_spqr_rtn(w, fmt)
    assert 0 < q.n_outliers <= fmt.max_outliers(128, 128)
    rows = torch.repeat_interleave(torch.arange(128), q.rowptr.diff())
    w_hat = q.dequantize()
    # kept weights are exact up to the fp16 rounding of the residual
    assert bool(((w_hat[rows, q.cols] - w[rows, q.cols]).abs() <= 1e-3 * w[rows, q.cols].abs() + 1e-3).all())
    # the large spikes (|w| far beyond the gaussian bulk) are nearly all kept
    kept = torch.zeros_like(w, dtype=torch.bool)
    kept[rows, q.cols] = True
    spikes = w.abs() > 8
    assert spikes.sum() > 10 and kept[spikes].float().mean() > 0.9
    # and keeping them helps: same recipe without outliers is worse
    assert _sqnr(w, w_hat) > _sqnr(w, quantize_spqr_rtn(w, SpQRFormat(3, 16, 3, 0.0)).dequantize()) + 1.0


def test_small_groups_beat_uniform_at_similar_size():
    """spqr-w3g16-s3-o0.0 (3.68 bpw here) must beat uniform w3g32 (3.59) and w3g64 on error."""
    w = _weight(256, 256, outlier_share=0.0)
    spqr = _sqnr(w, quantize_spqr_rtn(w, SpQRFormat(3, 16, 3, 0.0)).dequantize())
    assert spqr > _sqnr(w, quantize_rtn(w, QuantFormat(3, 64), clip_search=False).dequantize())
    assert spqr > _sqnr(w, quantize_rtn(w, QuantFormat(3, 32), clip_search=False).dequantize())


def test_corrupt_sparse_table_is_refused():
    fmt = SpQRFormat(3, 16, 3, 1.0)
    q = quantize_spqr_rtn(_weight(), fmt)
    packed = q.pack()
    bad = dict(packed, outlier_rowptr=packed["outlier_rowptr"].flip(0))
    with pytest.raises(FormatError, match="row pointers"):
        SpQRTensor.unpack(fmt, (64, 96), bad)
    cols = packed["outlier_cols"].clone()
    if cols.numel():
        cols[0] = 999
        with pytest.raises(FormatError, match="columns"):
            SpQRTensor.unpack(fmt, (64, 96), dict(packed, outlier_cols=cols))


def test_gptq_with_spqr_reduces_output_error():
    torch.manual_seed(0)
    w = _weight(96, 128)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(2048, 128)  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    fmt = SpQRFormat(2, 16, 3, 1.0)
    rtn = quantize_spqr_rtn(w, fmt).dequantize()
    result = gptq_quantize(w, h, fmt)
    assert isinstance(result.quantized, SpQRTensor)
    assert result.quantized.n_outliers <= fmt.max_outliers(96, 128)
    out_err = lambda w_hat: float(((x @ (w - w_hat).T) ** 2).mean())  # noqa: E731
    assert out_err(result.quantized.dequantize()) < 0.8 * out_err(rtn)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_groups_far_from_zero_or_constant_stay_finite(bits):
    """Regression: a group whose (non-outlier) weights are all equal, or far from 0, once produced an
    infinite zero point (and NaN weights) through a near-zero scale."""
    w = _weight(64, 64)
    w[:8, :16] = 3.0  # constant groups away from 0
    w[8:16, 16:32] = 0.0  # all-zero groups
    w[16:24, 32:48] = 5.0 + 0.001 * torch.randn(8, 16)  # nearly constant, far from 0
    for fmt in (SpQRFormat(bits, 16, 3, 1.0), SpQRFormat(bits, 16, 3, 0.0)):
        q = quantize_spqr_rtn(w, fmt)
        w_hat = q.dequantize()
        assert bool(torch.isfinite(w_hat).all())
        assert float((w_hat[8:16, 16:32]).abs().max()) == 0.0
        assert float((w_hat[:8, :16] - 3.0).abs().max()) < 3.0 / ((1 << bits) - 1)
        x = torch.randn(256, 64)
        result = gptq_quantize(w, 2 * x.T @ x / 256, fmt)
        assert bool(torch.isfinite(result.quantized.dequantize()).all())


def _nearest_level_stats(w: torch.Tensor, fmt: SpQRFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and real zero of w [N, g], each rounded to its nearest second-level level
    (the statistics SpQR used before the search): -> scale, zero [N]."""
    levels = (1 << fmt.bits) - 1
    lo, hi = torch.clamp(w.amin(1), max=0.0), torch.clamp(w.amax(1), min=0.0)
    scale = (hi - lo) / levels
    s = torch.clamp(dequantize_stats(*quantize_stats(scale[None], fmt.stat_bits))[0], min=torch.finfo(torch.float16).tiny)
    z = dequantize_stats(*quantize_stats((-lo / scale)[None], fmt.stat_bits))[0]
    return s, z


@pytest.mark.parametrize("name", ["spqr-w2g32-s3-o0.0", "spqr-w3g16-s2-o0.0", "spqr-w4g8-s4-o0.0"])
def test_group_statistics_are_the_best_pair_on_their_stored_grids(name):
    """Each row's stored (scale, zero) is the pair of second-level levels with the least weighted
    loss (brute force over all pairs), and together they beat min-max statistics rounded to their
    nearest levels by a clear margin."""
    fmt = parse_format(name)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(80, fmt.group_size, generator=g) * (0.2 + torch.rand(80, 1, generator=g))  # 80: ragged stat group
    importance = torch.rand(fmt.group_size, generator=g) + 0.1
    stats = group_stats(w, None, fmt, importance)
    tiny = torch.finfo(torch.float16).tiny
    # what is stored decodes to what is used
    assert torch.equal(stats.scale, torch.clamp(stats.scale_q.dequantize()[0], min=tiny))
    assert torch.equal(stats.zero, stats.zero_q.dequantize()[0])

    def loss(s, z):  # s, z [80] -> [80]
        w_hat = (quantize_dense(w, s[:, None], z[:, None], fmt.bits).float() - z[:, None]) * s[:, None]
        return ((w_hat - w) ** 2 * importance).sum(1)

    searched = loss(stats.scale, stats.zero)
    for cs in range(1 << fmt.stat_bits):
        for cz in range(1 << fmt.stat_bits):
            code = lambda q, c: dataclasses.replace(q, codes=torch.full_like(q.codes, c)).dequantize()[0]  # noqa: E731
            other = loss(torch.clamp(code(stats.scale_q, cs), min=tiny), code(stats.zero_q, cz))
            assert bool((searched <= other).all()), (cs, cz)
    assert float(searched.sum()) < 0.9 * float(loss(*_nearest_level_stats(w, fmt)).sum())


def test_gptq_spqr_keeps_tiny_weights_of_a_massive_input_exact():
    """Regression (issue 3): one input channel carries most of tr(H) (massive activations, as in
    SmolLM2's last down_proj) and its weights are tiny. Statistics rounded to their nearest levels
    put no grid point at 0 for those rows, and SpQR lost 4x to uniform GPTQ of the same size; the
    statistic search must find the zero that keeps that column (almost) exact."""
    torch.manual_seed(0)
    n, k = 64, 128
    w = torch.randn(n, k) * 0.3
    w[:, 5] = 0.01 * torch.randn(n)  # tiny weights on the massive channel
    x = torch.randn(4096, k)
    x[:, 5] *= 150.0  # massive activation
    h = 2 * x.T @ x / x.shape[0]
    out_err = lambda w_hat: float(torch.einsum("nk,kl,nl->", w - w_hat, h, w - w_hat))  # noqa: E731
    spqr = gptq_quantize(w, h, SpQRFormat(2, 32, 3, 0.0))
    uniform = gptq_quantize(w, h, QuantFormat(2, 32))
    assert spqr.quantized.nbytes().total <= uniform.quantized.nbytes().total + 4 * (n + 1)  # + SpQR's outlier row pointers
    w_hat = spqr.quantized.dequantize()
    assert out_err(w_hat) < 0.8 * out_err(uniform.quantized.dequantize())
    assert float((w_hat[:, 5] - w[:, 5]).abs().max()) < 0.02

"""GPTQ's column order, its inverse-Hessian factor, and several formats in one sweep."""

from __future__ import annotations

import pytest
import torch

from tightfit.algorithms import gptq
from tightfit.algorithms.gptq import gptq_quantize, gptq_quantize_many, group_aware_order, nested_group_order
from tightfit.formats.registry import parse_format
from tightfit.formats.table import QuantFormat


def _problem(n: int = 24, k: int = 320, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g) * torch.rand(k, generator=g) * 3  # uneven input scales
    return torch.randn(n, k, generator=g), 2 * x.T @ x / len(x)


def _contiguous(perm: torch.Tensor, bounds: list[tuple[int, int]]) -> bool:
    position = torch.empty_like(perm)
    position[perm] = torch.arange(len(perm))
    return all(int(position[lo:hi].max() - position[lo:hi].min()) == hi - lo - 1 for lo, hi in bounds)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse():
    _, h = _problem(k=96)
    u, lam = gptq._inverse_hessian_factor(h, 0.01)
    damped = h + lam * h.diagonal().mean() * torch.eye(96)
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close((u.T @ u).double(), torch.linalg.inv(damped.double()), rtol=1e-3, atol=1e-6)


def test_one_level_order_visits_groups_by_summed_diagonal_and_columns_by_diagonal():
    diag = torch.tensor([1.0, 5.0, 2.0, 9.0, 0.5, 0.1])
    bounds = [(0, 3), (3, 6)]  # sums 8.0 and 9.6
    assert group_aware_order(diag, bounds).tolist() == [3, 4, 5, 1, 2, 0]


@pytest.mark.parametrize("k", [320, 512])  # 320: a partial last group of 128 and of 64
def test_nested_order_keeps_every_level_contiguous(k):
    diag = torch.rand(k, generator=torch.Generator().manual_seed(1))
    levels = [parse_format(f).group_bounds(k) for f in ("w3g32", "w4g128", "w2g64")]
    perm = nested_group_order(diag, levels)
    assert sorted(perm.tolist()) == list(range(k))
    assert all(_contiguous(perm, bounds) for bounds in levels)


def test_levels_that_do_not_nest_have_no_shared_order():
    assert nested_group_order(torch.ones(6), [[(0, 3), (3, 6)], [(0, 2), (2, 6)]]) is None


def test_many_with_one_format_is_gptq_quantize():
    w, h = _problem()
    fmt = parse_format("w3g64")
    (many,) = gptq_quantize_many(w, h, [fmt])
    one = gptq_quantize(w, h, fmt)
    assert torch.equal(many.quantized.dequantize(), one.quantized.dequantize()) and many.loss == one.loss


def test_formats_with_the_same_groups_match_separate_runs_exactly():
    w, h = _problem()
    formats = [parse_format(f) for f in ("w4g128", "w6g128", "w2g128")]
    for together, alone in zip(gptq_quantize_many(w, h, formats), (gptq_quantize(w, h, f) for f in formats)):
        assert torch.equal(together.quantized.dequantize(), alone.quantized.dequantize())
        assert together.loss == pytest.approx(alone.loss, rel=1e-5)


def test_nested_formats_share_one_factor_and_lose_about_what_they_lose_alone(monkeypatch):
    w, h = _problem(n=64)
    formats = [parse_format(f) for f in ("w2g64", "w3g32", "w4g128", "nl4g32", "w3pc")]
    calls = []
    factor = gptq._inverse_hessian_factor
    monkeypatch.setattr(gptq, "_inverse_hessian_factor", lambda *a: calls.append(1) or factor(*a))
    together = gptq_quantize_many(w, h, formats)
    assert len(calls) == 1
    for fmt, result in zip(formats, together):
        alone = gptq_quantize(w, h, fmt)
        assert type(result.quantized) is type(alone.quantized) and result.quantized.fmt == fmt
        # only the visit inside groups differs; a per-channel format's columns now follow the g32 groups
        assert result.loss == pytest.approx(alone.loss, rel=0.1 if fmt.name == "w3pc" else 0.03)


def test_formats_that_do_not_nest_are_swept_apart(monkeypatch):
    w, h = _problem(k=192)
    fake = [parse_format("w4g64"), parse_format("w3g64")]
    real = QuantFormat.group_bounds

    def shifted(fmt, k):  # w3g64's groups moved by 32 columns: no shared order with w4g64's
        return [(0, 32), (32, 96), (96, 192)] if fmt.name == "w3g64" else real(fmt, k)

    monkeypatch.setattr(QuantFormat, "group_bounds", shifted)
    sweeps = []
    sweep = gptq._sweep
    monkeypatch.setattr(gptq, "_sweep", lambda w, h, builders, **kw: sweeps.append(len(builders)) or sweep(w, h, builders, **kw))
    results = gptq_quantize_many(w, h, fake)
    assert sweeps == [1, 1] and [r.quantized.fmt.name for r in results] == ["w4g64", "w3g64"]


def test_row_loss_is_the_rows_quadratic_form_in_the_damped_hessian():
    w, h = _problem(n=16, k=192)
    h[:, 7] = h[7, :] = 0  # an input that never fires
    for fmt in ("w3g64", "w2g32", "nl4g32"):
        result = gptq_quantize(w, h, parse_format(fmt))
        assert result.loss == pytest.approx(float(result.row_loss.sum()), rel=1e-5)
        swept = w.clone()
        swept[:, 7] = 0  # GPTQ zeroes a dead input's weights and counts its H_jj as 1
        h_swept = h.clone().double()
        h_swept[7, 7] = 1
        dw = (result.quantized.dequantize() - swept).double()
        quad = torch.einsum("nk,kl,nl->n", dw, h_swept + result.ridge * torch.eye(192, dtype=torch.float64), dw) / 2
        torch.testing.assert_close(result.row_loss.double(), quad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["w4g32-sym", "w3g32", "nl4g32", "w4g32-dq"])
def test_group_scales_are_searched_on_gptqs_loss_weighted_error(name):
    """start_group's d (GPTQ's Cholesky diagonal) weights each column's rounding error by 1 / d^2:
    the chosen scale's weighted error is never above the plain search's, and lower where one
    column dominates."""
    from tightfit.algorithms.builders import builder_for, loss_weight

    torch.manual_seed(0)
    fmt = parse_format(name)
    w = torch.randn(64, 32) * torch.linspace(0.5, 3.0, 32)  # [N, g]: the last columns hold the largest weights
    w[:, 3] *= 0.2  # a small column ...
    d = torch.ones(32)
    d[3] = 0.05  # ... that GPTQ's loss weighs 400x the others
    weight = loss_weight(d)
    assert weight.shape == (32,) and float(weight.mean()) == pytest.approx(1.0) and loss_weight(None) is None

    def weighted_error(with_d: bool) -> float:
        b = builder_for(fmt, torch.cat([w, w], 1), torch.ones(64))
        if fmt.dq:
            b.fix_super_scales(torch.cat([w, w], 1))
        b.start_group(0, w, d if with_d else None)
        w_hat = torch.stack([b.quantize_column(j, w[:, j]) for j in range(32)], 1)
        return float(((w_hat - w).square() * weight).sum())

    plain, weighted = weighted_error(False), weighted_error(True)
    assert weighted <= plain * (1 + 1e-6)
    if not fmt.dq:
        assert weighted < plain

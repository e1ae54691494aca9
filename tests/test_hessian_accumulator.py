"""HessianAccumulator: H = 2/T sum_t x_t x_t^T, formed block-triangle by block-triangle."""

from __future__ import annotations

import pytest
import torch

from tightfit.algorithms import gptq
from tightfit.algorithms.gptq import HessianAccumulator


@pytest.mark.parametrize("k, block", [(40, 16), (48, 16), (33, 2048)])
def test_hessian_is_the_full_gram_matrix_over_every_batch(k, block, monkeypatch):
    """Row blocks of GRAM_BLOCK features (a partial last one included) against the columns from
    there on, mirrored: the same matrix as x^T x in fp64, over batches of several shapes."""
    monkeypatch.setattr(gptq, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, k, generator=g), torch.randn(5, k, generator=g) * 3, torch.randn(1, k, generator=g)]
    acc = HessianAccumulator(k)
    for x in batches:
        acc.add_batch(x)
    x = torch.cat([b.reshape(-1, k) for b in batches]).double()
    expected = 2.0 / x.shape[0] * x.T @ x
    h = acc.hessian()
    assert acc.n_tokens == x.shape[0]
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)


def test_hessian_without_inputs_is_an_error():
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(4).hessian()

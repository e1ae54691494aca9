"""tightfit.metrics against the textbook formulas, computed position by position in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tightfit.metrics import (
    Reference,
    kl_per_position,
    kl_per_token,
    log_probs,
    next_token_log_probs,
    nll_per_position,
    scores_from_logits,
    top1_agreement,
)


def _pair(seed: int = 0, shape: tuple[int, ...] = (2, 5, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = 3 * torch.randn(shape, generator=g)
    b = a + torch.randn(shape, generator=g)  # before log_probs turns a into log-probs in place
    return log_probs(a), log_probs(b)  # [B, T, V] each


def test_log_probs_are_fp32_and_normalized():
    logp = log_probs(torch.randn(3, 7, dtype=torch.bfloat16))
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("shape", [(9,), (300, 11), (2, 3, 200, 5)])  # 300, 200 > LOG_PROBS_ROWS: several steps
def test_log_probs_in_place_equal_log_softmax(shape):
    logits = torch.randn(*shape) * 4
    view = logits[..., :-1, :] if len(shape) > 1 else logits  # a strided view, as logits[:, :-1] is
    wanted = torch.log_softmax(view, -1)
    out = log_probs(view)
    torch.testing.assert_close(out, wanted, rtol=0, atol=1e-5)
    assert out.data_ptr() == view.data_ptr(), "fp32 logits become the log-probs"
    grad = torch.randn(4, 6, requires_grad=True)
    assert log_probs(grad).requires_grad and torch.equal(grad.detach(), grad.detach().clone())


def test_kl_nll_and_top1_equal_the_direct_formulas():
    logp, logq = _pair()
    targets = torch.tensor([[0, 3, 10, 5, 5], [1, 1, 2, 9, 4]])  # [B, T]
    kl, nll, agree = kl_per_position(logp, logq), nll_per_position(logq, targets), top1_agreement(logp, logq)
    assert kl.shape == nll.shape == agree.shape == targets.shape and agree.dtype == torch.bool
    P, Q = logp.double().exp(), logq.double().exp()
    for b in range(2):
        for t in range(5):
            p, q = P[b, t].tolist(), Q[b, t].tolist()
            want = sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))  # KL(p || q) = sum_v p_v log(p_v / q_v)
            assert kl[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
            assert nll[b, t].item() == pytest.approx(-math.log(q[targets[b, t]]), rel=1e-6)
            assert agree[b, t].item() == (max(range(11), key=p.__getitem__) == max(range(11), key=q.__getitem__))
    assert kl_per_token(logp, logq) == pytest.approx(kl.double().mean().item(), rel=1e-6)
    assert kl_per_position(logp, logq, logp.exp()).equal(kl), "a precomputed exp(logp) changes nothing"


def test_identical_distributions_are_at_distance_zero():
    logp, _ = _pair(1)
    assert kl_per_position(logp, logp).abs().max().item() == 0.0
    assert top1_agreement(logp, logp).all()


def test_mismatched_shapes_are_refused():
    logp, logq = _pair()
    with pytest.raises(AssertionError):
        kl_per_position(logp, logq[:, :-1])
    with pytest.raises(AssertionError):
        nll_per_position(logq, torch.zeros(2, 4, dtype=torch.int64))


class _Echo(nn.Module):
    """A 'language model' whose logits at position t are one-hot on the token at t."""

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True):
        class Out:
            logits = 5.0 * nn.functional.one_hot(input_ids, 6).float()  # [B, T, V]

        return Out()


def test_next_token_log_probs_score_positions_0_to_t_minus_2():
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])  # [B, T]
    logp = next_token_log_probs(_Echo(), ids)
    assert logp.shape == (2, 3, 6)
    assert logp.argmax(-1).equal(ids[:, :-1])


def test_scores_from_logits_equal_the_log_prob_formulas():
    g = torch.Generator().manual_seed(1)
    ref_logits = 4 * torch.randn(40, 300, generator=g) + 20  # large logits: lse ~ 30, the cancellation to guard
    logits = ref_logits + torch.randn(40, 300, generator=g)
    logits[3] = ref_logits[3]  # one position where the candidate is the reference
    targets = torch.randint(0, 300, (40,), generator=g)
    logp, logq = log_probs(ref_logits.clone()), log_probs(logits.clone())
    nll, kl, agree = scores_from_logits(logits, targets, Reference.of(logp))
    torch.testing.assert_close(nll, nll_per_position(logq, targets), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kl, kl_per_position(logp, logq), rtol=1e-4, atol=2e-5)
    assert abs(kl[3].item()) < 2e-5 and kl.sum().item() == pytest.approx(kl_per_position(logp, logq).double().sum().item(), rel=1e-5)
    assert agree.equal(top1_agreement(logp, logq)) and agree[3]
    alone = scores_from_logits(logits, targets)
    assert alone[0].equal(nll) and alone[1] is None and alone[2] is None
    assert Reference.of(logp)[5:9].top.equal(logp[5:9].argmax(-1))

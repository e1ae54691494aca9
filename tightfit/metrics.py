"""How far a candidate's next-token distributions are from a reference's, per scored position.

The one home of the formulas that evaluation, sensitivity, plan losses and the benchmarks share.
A window of T tokens has T-1 scored positions: position t predicts token t+1 (`next_token_log_probs`).
Every comparison takes fp32 log-probabilities over the vocabulary at the same positions, logp of
the reference and logq of the candidate, [..., V], and returns one value per position, [...];
callers sum or average them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


LOG_PROBS_ROWS = 128  # positions per step of the in-place log softmax


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the vocabulary in fp32: logits [..., V] -> [..., V].

    Without gradients it works in place, LOG_PROBS_ROWS positions at a time: fp32 logits are
    consumed (their storage becomes the log-probs), so one 512-token window of a 151936-token
    vocabulary costs its 0.3 GB once, not twice. With gradients (the Fisher pass): F.log_softmax."""
    if logits.requires_grad and torch.is_grad_enabled():
        return F.log_softmax(logits.float(), dim=-1)
    out = logits.float()  # no copy when they are fp32 already
    planes = ([out.unsqueeze(0)] if out.dim() == 1 else [out] if out.dim() == 2
              else [out[index] for index in itertools.product(*map(range, out.shape[:-2]))])  # views of out
    for plane in planes:  # [T, V]
        for s in range(0, plane.shape[0], LOG_PROBS_ROWS):
            x = plane[s : s + LOG_PROBS_ROWS]
            x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))
    return out


def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits at the scored positions: ids [B, T] -> [B, T-1, V] (the model's dtype)."""
    assert ids.dim() == 2, ids.shape
    return model(input_ids=ids, use_cache=False).logits[:, :-1]  # [B, T-1, V]


def next_token_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities at the scored positions: ids [B, T] -> [B, T-1, V] fp32."""
    return log_probs(next_token_logits(model, ids))


def nll_per_position(logq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log q(target), nats: logq [..., V], targets [...] int64 (the next tokens) -> [...]."""
    assert logq.shape[:-1] == targets.shape, (logq.shape, targets.shape)
    return -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_per_position(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), nats: [..., V] -> [...].

    p: exp(logp) when the caller has it already (one reference scored against several candidates).
    """
    assert logp.shape == logq.shape, (logp.shape, logq.shape)
    return ((logp.exp() if p is None else p) * (logp - logq)).sum(-1)


def kl_per_token(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean KL(p || q) over the positions, nats per token."""
    return float(kl_per_position(logp, logq).mean())


def top1_agreement(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Whether both distributions put their maximum on the same token: [..., V] -> [...] bool."""
    assert logp.shape == logq.shape, (logp.shape, logq.shape)
    return logp.argmax(-1) == logq.argmax(-1)


@dataclass(frozen=True)
class Reference:
    """A reference's distributions at N positions as every comparison against them needs them,
    computed once for any number of candidates (`of`): p = exp(log p) [N, V], sum_v p_v log p_v
    [N], the mass sum_v p_v [N] (1 up to rounding) and the top token [N]."""

    p: torch.Tensor
    p_log_p: torch.Tensor
    mass: torch.Tensor
    top: torch.Tensor

    @classmethod
    def of(cls, logp: torch.Tensor) -> "Reference":
        """From fp32 log-probs [N, V] (p log p formed LOG_PROBS_ROWS positions at a time)."""
        p = logp.exp()
        p_log_p = torch.cat([(p[s : s + LOG_PROBS_ROWS] * logp[s : s + LOG_PROBS_ROWS]).sum(-1)
                             for s in range(0, max(logp.shape[0], 1), LOG_PROBS_ROWS)])  # none: an empty [0]
        return cls(p, p_log_p, p.sum(-1), logp.argmax(-1))

    def __getitem__(self, rows: slice) -> "Reference":
        """The positions `rows` of it."""
        return Reference(self.p[rows], self.p_log_p[rows], self.mass[rows], self.top[rows])


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor,
                       reference: Reference | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """NLL, KL(p || q) and top-1 agreement per position of a candidate given by its raw logits x
    [N, V] (q = softmax(x); targets [N]), without forming log q: with lse = logsumexp(x),
    log q_v = x_v - lse, so
        NLL = lse - x_target,  KL(p || q) = sum_v p_v log p_v - sum_v p_v x_v + lse sum_v p_v,
    and q's top token is x's. The same values as nll_per_position, kl_per_position and
    top1_agreement on log_probs(x) up to fp32 rounding, in a third of the passes over [N, V] (the
    sums are torch's pairwise ones: a matrix product's would lose ~1e-5 of KL). KL and top-1 are
    None without a reference."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if reference is None:
        return nll, None, None
    kl = reference.p_log_p - (reference.p * x).sum(-1) + lse * reference.mass
    return nll, kl, x.argmax(-1) == reference.top

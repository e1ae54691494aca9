"""How far a candidate's next-token distributions are from a reference's, per scored position.

The one home of the formulas that evaluation, sensitivity, plan losses and the benchmarks share.
A window of T tokens has T-1 scored positions: position t predicts token t+1 (`next_token_log_probs`).
Every comparison takes fp32 log-probabilities over the vocabulary at the same positions, logp of
the reference and logq of the candidate, [..., V], and returns one value per position, [...];
callers sum or average them.
"""

from __future__ import annotations

import itertools

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


def next_token_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities at the scored positions: ids [B, T] -> [B, T-1, V] fp32."""
    assert ids.dim() == 2, ids.shape
    return log_probs(model(input_ids=ids, use_cache=False).logits[:, :-1])  # [B, T-1, V]


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

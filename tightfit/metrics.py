"""How far a candidate's next-token distributions are from a reference's, per scored position.

The one home of the formulas that evaluation, sensitivity, plan losses and the benchmarks share.
A window of T tokens has T-1 scored positions: position t predicts token t+1 (`next_token_log_probs`).
Every comparison takes fp32 log-probabilities over the vocabulary at the same positions, logp of
the reference and logq of the candidate, [..., V], and returns one value per position, [...];
callers sum or average them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the vocabulary in fp32: logits [..., V] -> [..., V]."""
    return F.log_softmax(logits.float(), dim=-1)


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

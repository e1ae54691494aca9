"""Evaluation protocol: perplexity, KL(original || quantized) and top-1 agreement per token.

Fixed protocol (see README): the evaluation part of the text source, non-overlapping windows of
`ctx` tokens, BOS at each window start when the tokenizer has one, every position after the first
scored. KL and top-1 compare next-token distributions of the two models at the same positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tightfit.data import load_text, token_windows
from tightfit.metrics import kl_per_position, next_token_log_probs, nll_per_position, top1_agreement

FAST_WINDOWS = 8


@dataclass(frozen=True)
class EvalConfig:
    text: str = "wiki"
    n_windows: int = 64
    ctx: int = 512
    batch_size: int = 2
    version: int = 1

    @classmethod
    def from_json(cls, d: dict) -> "EvalConfig":
        return cls(**d)


@dataclass(frozen=True)
class EvalResult:
    """Per-token means over n_tokens scored positions; kl and top1 are None without a reference."""

    ppl: float
    nll: float
    kl: float | None
    top1: float | None
    n_tokens: int
    seconds: float
    reference_ppl: float | None = None


def eval_windows(tokenizer, config: EvalConfig) -> torch.Tensor:
    """[n_windows, ctx] int64 from the evaluation part of config.text."""
    return token_windows(tokenizer, load_text(config.text), "evaluation", config.n_windows, config.ctx)


@torch.no_grad()
def evaluate_many(
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    *,
    reference: nn.Module | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score each model on windows [W, T] in one pass; the reference runs once per batch.

    With `reference`, also KL(reference || model) per token and top-1 agreement.
    """
    start = time.perf_counter()
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    ref_nll = 0.0
    count = 0
    batches = range(0, windows.shape[0], batch_size)
    for b in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = windows[b : b + batch_size]  # [B, T]
        targets = ids[:, 1:]  # [B, T-1]
        count += targets.numel()
        logp = None
        if reference is not None:
            logp = next_token_log_probs(reference, ids)  # [B, T-1, V]
            ref_nll += nll_per_position(logp, targets).sum().item()
            p = logp.exp()
        for name, model in models.items():
            logq = next_token_log_probs(model, ids)  # [B, T-1, V]
            nll[name] += nll_per_position(logq, targets).sum().item()
            if logp is not None:
                kl[name] += kl_per_position(logp, logq, p).sum().item()
                agree[name] += top1_agreement(logp, logq).sum().item()
    seconds = time.perf_counter() - start
    return {
        name: EvalResult(
            ppl=math.exp(nll[name] / count),
            nll=nll[name] / count,
            kl=kl[name] / count if reference is not None else None,
            top1=agree[name] / count if reference is not None else None,
            n_tokens=count,
            seconds=seconds,
            reference_ppl=math.exp(ref_nll / count) if reference is not None else None,
        )
        for name in models
    }


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    reference: nn.Module | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> EvalResult:
    """Score one model on windows [W, T]; with `reference`, also KL(reference || model) and top-1."""
    return evaluate_many({"model": model}, windows, reference=reference, batch_size=batch_size, progress=progress)["model"]

"""Evaluation protocol: perplexity, KL(original || quantized) and top-1 agreement per token.

Fixed protocol (see README): the evaluation part of the text source, non-overlapping windows of
`ctx` tokens, BOS at each window start when the tokenizer has one, every position after the first
scored. KL and top-1 compare next-token distributions of the two models at the same positions.

Which engine computes a candidate's logits is part of the measurement: a packed model scores
through the torch reference (`engine="torch"`: its weights dequantized, fp32 activations) or
through tightfit's compiled engine (`engine="fast"`: int8 activations, fp16 KV cache, as
`tightfit generate` runs it). Any other engine (llama.cpp, ...) enters as a `Scorer`. The
reference is always a torch module, in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from tightfit.data import load_text, token_windows
from tightfit.errors import KernelUnavailable
from tightfit.formats.packed import PackedModel
from tightfit.model import LoadedModel, resident_block
from tightfit.model.blocks import block_list, last_block_outputs, replay_blocks
from tightfit.metrics import Reference, next_token_log_probs, next_token_logits, nll_per_position, scores_from_logits
from tightfit.runtime.engine_config import DEFAULT_KV_BITS

FAST_WINDOWS = 8
BATCH_LOGITS_BYTES = 256 * 2**20  # at most this much fp32 log-probs per model per batch: a batch
# of 2 windows at V = 49152 (100 MB each); one window of a 150k vocabulary (311 MB)
POSITIONS_PER_CHUNK = 512  # the metrics' [positions, V] temporaries are formed this many at a time
ENGINES = ("torch", "fast")  # what can score a packed model (`tightfit eval --engine`)

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""A candidate as an engine runs it: ids [T] int64 (one window, from an empty cache) -> logits
[T, V] fp32 of every position (position t predicts token t+1)."""


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


def backend_scorer(backend) -> Scorer:
    """A Backend with `forward_all` (runtime/engine.py FastBackend) as a Scorer: its KV cache is
    emptied before every window."""

    def score(ids: torch.Tensor) -> torch.Tensor:
        assert ids.dim() == 1, ids.shape
        backend.reset()
        return backend.forward_all(ids.tolist())  # [T, V]

    score.vocab_size = backend.vocab_size
    return score


def packed_candidate(packed: PackedModel, engine: str, *, ctx: int, exact: bool = False,
                     kv_bits: int = DEFAULT_KV_BITS) -> nn.Module | Scorer:
    """What scores a packed model: engine "torch" -> the reference module with its weights
    dequantized (batched); "fast" -> the compiled engine with a KV cache of ctx tokens, kv_bits wide
    (exact: its fp32-activation mode, see FastBackend). Raises KernelUnavailable where the engine
    cannot run (the torch engine has no quantized KV cache)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch" and kv_bits != DEFAULT_KV_BITS:
        raise KernelUnavailable(f"a {kv_bits}-bit KV cache runs on the fast engine only; use --engine fast or --kv 16")
    if engine == "torch":
        from tightfit.runtime import build_model

        return build_model(packed)
    from tightfit.runtime.engine import FastBackend

    return backend_scorer(FastBackend(packed, max_positions=ctx, exact=exact, kv_bits=kv_bits))


class ReplayedReference:
    """A streamed reference model's log-probs on windows [W, T], batch by batch: `self[b0:b1]` ->
    [B, T-1, V]. The hidden states leaving its last block are computed once for all windows, block
    by block (each block read from the files once); a slice runs only the embeddings, the final
    norm and the head, the blocks replaying those states (`replay_blocks`)."""

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor, *, batch_size: int = 2) -> None:
        self.model, self.arch, self.windows = loaded.model, loaded.arch, windows
        self.n_blocks = len(block_list(loaded.model, loaded.arch))
        hidden = last_block_outputs(loaded.model, loaded.arch, windows, batch_size, lambda i: resident_block(loaded, i))
        self.hidden = torch.cat(hidden)  # [W, T, H]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        with torch.no_grad(), replay_blocks(self.model, self.arch, self.n_blocks, self.hidden[rows]):
            return next_token_log_probs(self.model, self.windows[rows])


def reference_for(loaded: LoadedModel, windows: torch.Tensor, *, batch_size: int = 2) -> nn.Module | ReplayedReference:
    """What `evaluate` takes as the reference for windows [W, T]: the model itself when its blocks
    are in memory, else a ReplayedReference (which runs its blocks now)."""
    return ReplayedReference(loaded, windows, batch_size=batch_size) if loaded.streamed else loaded.model


def _next_token_logits(model: nn.Module | Scorer, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> logits [B, T-1, V]: a module runs the batch at once, a Scorer window by window."""
    if isinstance(model, nn.Module):
        return next_token_logits(model, ids)
    rows = [model(w)[:-1] for w in ids]
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)  # [B, T-1, V]; one window: no copy


@torch.no_grad()
def reference_log_probs(reference: nn.Module, windows: torch.Tensor, *, batch_size: int = 2) -> torch.Tensor:
    """The reference's log-probs on windows [W, T] -> [W, T-1, V] fp32, computed once for scoring
    candidates one at a time (W x (T-1) x V x 4 bytes: ~100 MB per 512-token window at V = 49152)."""
    out = None
    for b in range(0, windows.shape[0], batch_size):
        logp = next_token_log_probs(reference, windows[b : b + batch_size])  # [B, T-1, V]
        if out is None:
            out = torch.empty(windows.shape[0], *logp.shape[1:], dtype=logp.dtype)
        out[b : b + logp.shape[0]] = logp
    return out


@torch.no_grad()
def evaluate_many(
    models: dict[str, nn.Module | Scorer],
    windows: torch.Tensor,
    *,
    reference: nn.Module | torch.Tensor | ReplayedReference | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score each model (a torch module, or a Scorer for any other engine) on windows [W, T] in
    one pass; the reference runs once per batch.

    With `reference` (a module, its log-probs [W, T-1, V] from `reference_log_probs`, or a
    ReplayedReference for the same windows), also KL(reference || model) per token and top-1
    agreement.
    """
    start = time.perf_counter()
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    ref_nll = 0.0
    count = 0
    if isinstance(reference, torch.Tensor):
        assert reference.shape[:2] == (windows.shape[0], windows.shape[1] - 1), (reference.shape, windows.shape)
    batch_size = batch_size_for(windows, models, reference, batch_size)
    batches = range(0, windows.shape[0], batch_size)
    for b in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = windows[b : b + batch_size]  # [B, T]
        targets = ids[:, 1:]  # [B, T-1]
        count += targets.numel()
        ref = None
        if reference is not None:
            logp = next_token_log_probs(reference, ids) if isinstance(reference, nn.Module) else reference[b : b + batch_size]
            ref_nll += nll_per_position(logp, targets).sum().item()
            ref = Reference.of(logp.reshape(-1, logp.shape[-1]))  # once for every candidate
            del logp
        for name, model in models.items():
            logits = _next_token_logits(model, ids)  # [B, T-1, V]
            scores = _compare(ref, logits, targets)
            del logits
            nll[name] += scores[0]
            kl[name] += scores[1]
            agree[name] += scores[2]
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


def batch_size_for(windows: torch.Tensor, models: dict, reference, batch_size: int) -> int:
    """batch_size, lowered so that one batch's log-probs of one model stay within
    BATCH_LOGITS_BYTES (at least one window); windows [W, T]. The vocabulary size comes from the
    first of reference and models that states it."""
    vocab = next(filter(None, map(_vocab_size, (reference, *models.values()))), None)
    if vocab is None:
        return batch_size
    return max(1, min(batch_size, BATCH_LOGITS_BYTES // ((windows.shape[1] - 1) * vocab * 4)))


def _vocab_size(model) -> int | None:
    """V of a module, a ReplayedReference, a Scorer from backend_scorer or log-probs [..., V]."""
    if isinstance(model, torch.Tensor):
        return model.shape[-1]
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    return getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)


def _compare(ref: Reference | None, logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
    """Sums over the positions of one batch: the candidate's NLL, KL(reference || candidate) and
    top-1 agreements (both 0 without a reference). ref: the reference at the batch's B x (T-1)
    positions; logits [B, T-1, V]; targets [B, T-1]. The per-position formulas
    (metrics.scores_from_logits) run POSITIONS_PER_CHUNK positions at a time, so their
    temporaries stay small next to the logits themselves."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    nll, kl, agree = 0.0, 0.0, 0
    for s in range(0, targets.numel(), POSITIONS_PER_CHUNK):
        rows = slice(s, s + POSITIONS_PER_CHUNK)
        part = None if ref is None else ref[rows]
        n, k, a = scores_from_logits(logits[rows], targets[rows], part)
        nll += n.sum().item()
        if part is not None:
            kl += k.sum().item()
            agree += int(a.sum())
    return nll, kl, agree


def evaluate(
    model: nn.Module | Scorer,
    windows: torch.Tensor,
    *,
    reference: nn.Module | torch.Tensor | ReplayedReference | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> EvalResult:
    """Score one model on windows [W, T]; with `reference`, also KL(reference || model) and top-1."""
    return evaluate_many({"model": model}, windows, reference=reference, batch_size=batch_size, progress=progress)["model"]

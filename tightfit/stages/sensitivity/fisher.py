"""The fisher method's estimate (pure: tensors in, a number out): the KL increase a weight error
predicts through the diagonal Fisher information of a layer's outputs (the formulas are in the
sensitivity stage's doc)."""

from __future__ import annotations

import torch

from tightfit.algorithms import GPTQResult
from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.artifacts import FisherSet
from tightfit.formats.registry import Format, error_rows


def fisher_weighted_error(dw: torch.Tensor, second_moment: torch.Tensor, fisher: torch.Tensor) -> float:
    """0.5 * sum_j F_j (dW S dW^T)_jj: the predicted KL increase when a layer's output o = W x
    changes by dW x, with S = E[x x^T] [K, K] of its inputs and F [N] the Fisher diagonal of its
    outputs; dw [N, K]."""
    assert dw.dim() == 2 and second_moment.shape == (dw.shape[1],) * 2 and fisher.shape == dw.shape[:1], (
        dw.shape, second_moment.shape, fisher.shape)
    rows = ((dw @ second_moment) * dw).sum(1)  # [N] (dW S dW^T)_jj
    return float(0.5 * (fisher * rows).sum())


def fisher_error_of(result: GPTQResult, weight: torch.Tensor, h: torch.Tensor, fisher: torch.Tensor) -> float:
    """fisher_weighted_error(dW, H / 2, fisher) of a GPTQ result on weight [N, K] with Hessian h,
    from its per-row objective instead of an [N, K] x [K, K] product (the largest cost of scoring a
    layer in many formats): GPTQ's row_loss_r = dW'_r (H' + ridge I) dW'_r^T / 2, where GPTQ worked on
    H' (the diagonal of inputs that never fire set to 1) and dW' (their weights zeroed first), so
    dW_r H dW_r^T = 2 row_loss_r - ridge |dW'_r|^2 - |dW'_r, dead|^2, with dW'_r, dead = Q_r, dead."""
    q = result.quantized.dequantize().float()  # [N, K]
    dead = torch.diag(h) == 0
    dw_sweep = q - weight
    dw_sweep[:, dead] = q[:, dead]
    dead_sq = dw_sweep[:, dead].square().sum(1)
    quad = 2 * result.row_loss.double() - result.ridge * dw_sweep.square().sum(1).double() - dead_sq.double()  # dW H dW^T
    return float(0.5 * (fisher.double() * quad / 2).sum())  # S = H / 2


def fisher_embedding_error(dw: torch.Tensor, fisher: FisherSet, first_row: int = 0) -> float:
    """0.5 / T * sum_t sum_j g_tj^2 dE[x_t, j]^2, with dw = dE (summed per token in the FisherSet):
    dw [R, H] holds rows first_row .. first_row + R of dE [V, H]; tokens outside them count 0."""
    assert dw.shape[1] == fisher.embed_fisher.shape[1], (dw.shape, fisher.embed_fisher.shape)
    ids = fisher.embed_ids - first_row
    inside = (ids >= 0) & (ids < dw.shape[0])
    return float(0.5 * (fisher.embed_fisher[inside] * dw[ids[inside]].pow(2)).sum())


def embedding_damage(dw: torch.Tensor, fisher: FisherSet, *, embeddings: bool, head: bool, first_row: int = 0) -> float:
    """The Fisher estimate of an embedding-layer error: its input side (embeddings), its output side
    (head), or both for a tied pair. dw [R, H]: rows first_row .. first_row + R of the error
    [V, H] (both sides sum over rows, so a big vocabulary is scored a slice at a time)."""
    rows = slice(first_row, first_row + dw.shape[0])
    return ((fisher_embedding_error(dw, fisher, first_row) if embeddings else 0.0)
            + (fisher_weighted_error(dw, fisher.head_inputs, fisher.head_fisher[rows]) if head else 0.0))


def rtn_embedding_damage(weight: torch.Tensor, fmt: Format, fisher: FisherSet, *, embeddings: bool, head: bool) -> float:
    """embedding_damage of weight [V, H] rounded to nearest in fmt (as the quantize stage rounds
    it), RTN_ROWS rows of the error at a time: a 151936-token vocabulary's error and its products
    are 0.9 GB each in fp32."""
    return sum(embedding_damage(dw, fisher, embeddings=embeddings, head=head, first_row=r)
               for r, dw in error_rows(weight, quantize_rtn_any(weight, fmt)))


# Row-sampled GPTQ above this work (rows x columns^2, about the flops of one GPTQ run): the Fisher
# estimate sums over output rows, GPTQ quantizes rows independently, so a sample of the rows
# estimates it. Below it (every layer of a 135M model) every row is quantized.
ROW_SAMPLE_WORK = 4e9
MIN_SAMPLED_ROWS = 256


def sampled_rows(weight: torch.Tensor, h: torch.Tensor, fisher: torch.Tensor, *, seed: int
                 ) -> tuple[slice | torch.Tensor, torch.Tensor | None]:
    """The rows of weight [N, K] that estimate a big layer's Fisher error, and their weights:
    (slice(None), None) when N K^2 <= ROW_SAMPLE_WORK; else n = max(MIN_SAMPLED_ROWS, work / K^2)
    rows: the n/4 rows of largest F_j sum_k w_jk^2 H_kk (where the error can weigh most; the diagonal
    of w_j H w_j^T, no [N, K] x [K, K] product) with weight 1, and 3n/4 drawn uniformly from the
    others (seeded) with weight (N - n/4) / (3n/4): an unbiased estimate of the sum over all rows."""
    n_rows, k = weight.shape
    n = max(MIN_SAMPLED_ROWS, int(ROW_SAMPLE_WORK / k**2))
    if n >= n_rows:
        return slice(None), None
    energy = fisher * (weight.square() @ torch.diag(h))  # [N]: the diagonal part of F_j w_j H w_j^T, a ranking only
    top = torch.topk(energy, n // 4).indices
    rest = torch.ones(n_rows, dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().reshape(-1)
    drawn = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[: n - n // 4]]
    weights = torch.cat([torch.ones(len(top)), torch.full((len(drawn),), len(others) / len(drawn))])
    return torch.cat([top, drawn]), weights

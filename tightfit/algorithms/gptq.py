"""GPTQ: layer-wise quantization with second-order error compensation.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). For a linear layer with weight W [N, K] and calibration inputs X [T, K]
we minimize ||W X^T - W_hat X^T||^2. With H = 2 X^T X, quantizing column j and spreading its
error e_j = (w_j - q_j) / [H^-1]_jj over the not-yet-quantized columns by -e_j [H^-1]_j,j:
keeps the loss minimal (OBS update, eq. 3 of the paper). The Cholesky factor of H^-1 gives
the rows needed, and updates are applied lazily per block of columns (section 3, steps 2-3).

Act-order (quantize columns with large H_jj first) normally permutes the columns and so the
groups. We keep the packed layout a plain group layout with a static, group-aware order: whole
groups are visited in order of their summed H_jj and columns inside a group by H_jj. Each
group's scale and zero are chosen when its first column is reached, from the already updated
weights of that group, so the stored codes need no permutation at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tightfit.algorithms.builders import builder_for
from tightfit.formats.registry import AnyQuantizedTensor, Format


GRAM_BLOCK = 2048  # HessianAccumulator: input features per row block of x^T x


class HessianAccumulator:
    """Running H = 2/T * sum_t x_t x_t^T over calibration inputs of one linear layer.

    `add_batch` accumulates; `hessian` returns the float32 [K, K] matrix.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., K]: adds x^T x over its rows. Only the upper block triangle is formed (rows
        GRAM_BLOCK at a time against the columns from there on; `hessian` mirrors it): 61 % of the
        products at K = 8960, the cost that dominates calibrating a model with a wide MLP."""
        k = self.in_features
        assert x.shape[-1] == k, (x.shape, k)
        x = x.reshape(-1, k).to(torch.float32)  # [T, K]
        with torch.autocast(x.device.type, enabled=False):  # inputs may come from bf16 forwards; H never does
            for i in range(0, k, GRAM_BLOCK):
                self._h[i : i + GRAM_BLOCK, i:] += (x[:, i : i + GRAM_BLOCK].T @ x[:, i:]).to(torch.float64)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise ValueError("no calibration inputs were accumulated")
        upper = torch.triu(self._h)
        return (2.0 / self.n_tokens * (upper + torch.triu(upper, 1).T)).to(torch.float32)  # [K, K]


@dataclass(frozen=True)
class GPTQResult:
    """Quantized weight and the GPTQ objective sum_j e_j^2 / 2 (proxy of the output error)."""

    quantized: AnyQuantizedTensor
    loss: float
    damp: float


def group_aware_order(diag: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Column order: groups by decreasing summed H_jj, columns within a group by decreasing H_jj.

    diag [K], bounds: [start, end) of each group -> permutation [K] keeping groups contiguous.
    """
    group_order = sorted(range(len(bounds)), key=lambda i: -diag[bounds[i][0] : bounds[i][1]].sum().item())
    pieces = []
    for i in group_order:
        lo, hi = bounds[i]
        pieces.append(lo + torch.argsort(diag[lo:hi], descending=True, stable=True))
    return torch.cat(pieces)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = (H + lambda I)^-1), raising lambda until
    H is positive definite.

    With J the order-reversing permutation and J (H + lambda I) J = L L^T: U = J L^-1 J, one
    Cholesky and one triangular inverse (half the work of inverting and factoring again: a K = 8960
    factor is the largest single cost of quantizing a 1.5B model)."""
    mean_diag = torch.mean(torch.diag(h)).item()
    for attempt in range(6):
        lam = damp * (10**attempt)
        damped = h.flip(0, 1)  # J H J, a new matrix
        damped.diagonal().add_(lam * mean_diag)
        l, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype)
            l_inv = torch.linalg.solve_triangular(l, eye, upper=False)
            del l, eye
            return l_inv.flip(0, 1), lam
    raise ArithmeticError("Hessian is not positive definite even with 1e5 x dampening")


SUB_BLOCK = 32  # columns whose errors spread one by one; the rest of a block gets them as one product


def _sub_blocks(i1: int, i2: int, width: dict[int, int]) -> list[tuple[int, int]]:
    """[start, end) of the sub-blocks of block [i1, i2), relative to i1: at most SUB_BLOCK columns,
    a group's first column always first in its sub-block (its group is then fully updated when its
    parameters are chosen). Errors spread column by column inside a sub-block, and to the columns
    after it as one product: the same updates as column by column over the block, with far less
    memory traffic (a rank-1 update of [N, 128] per column costs more than the product)."""
    out, lo = [], i1
    for j in range(i1 + 1, i2):
        if j in width or j - lo >= SUB_BLOCK:
            out.append((lo - i1, j - i1))
            lo = j
    out.append((lo - i1, i2 - i1))
    return out


def _blocks(starts: list[int], k: int, block_size: int) -> list[tuple[int, int]]:
    """Lazy-update blocks of about block_size columns that never split a group."""
    out, lo = [], 0
    for s in starts[1:] + [k]:
        if s - lo >= block_size or s == k:
            out.append((lo, s))
            lo = s
    return out


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: Format,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    clip_search: bool = True,
    factors: dict[bytes, tuple[torch.Tensor, float]] | None = None,
) -> GPTQResult:
    """Quantize w [N, K] given the Hessian h [K, K] of its inputs, in any format with a builder.

    The builder (algorithms.builders.builder_for) chooses each group's parameters from the updated
    weights when the group's first column comes up (SpQR: also its outliers, from the Cholesky
    diagonal) and decodes columns; this function only orders columns and spreads errors.
    factors: a cache of the inverse Hessian's Cholesky factor by column order, for calls on the same
    h and damp (formats of one group size share an order): a K = 8960 factor takes seconds.
    """
    n, k = w.shape
    assert h.shape == (k, k), (h.shape, k)
    w = w.detach().to(torch.float32).clone()
    h = h.detach().to(torch.float32)

    diag = torch.diag(h).clone()
    dead = diag == 0  # inputs that never fire: their weights cannot matter (their H_jj counts as 1)
    diag[dead] = 1.0
    w[:, dead] = 0.0

    builder = builder_for(fmt, (n, k), clip_search=clip_search)
    bounds = builder.bounds
    perm = group_aware_order(diag, bounds) if act_order else torch.arange(k)
    w = w[:, perm]
    key = perm.numpy().tobytes()
    if factors is not None and key in factors:
        u, lam = factors[key]
    else:
        h = h[perm][:, perm]  # a new matrix: the caller's h is never written
        h.diagonal()[dead[perm]] = 1.0
        u, lam = _inverse_hessian_factor(h, damp)  # [K, K] upper
        if factors is not None:
            factors[key] = (u, lam)
    d_all = torch.diag(u)  # [K]

    group_of = torch.empty(k, dtype=torch.long)  # original column -> its group
    for gi, (lo, hi) in enumerate(bounds):
        group_of[lo:hi] = gi
    pgroup = group_of[perm].tolist()  # permuted column -> group
    starts = [j for j in range(k) if j == 0 or pgroup[j] != pgroup[j - 1]]
    width = {j: bounds[pgroup[j]][1] - bounds[pgroup[j]][0] for j in starts}
    one_group = len(bounds) == 1

    if one_group:  # the group spans every block: its parameters come from the whole row up front
        builder.start_group(0, w, d_all, perm)
        blocks = [(lo, min(lo + block_size, k)) for lo in range(0, k, block_size)]
    else:
        blocks = _blocks(starts, k, block_size)
    loss = torch.zeros(n)
    for i1, i2 in blocks:
        w1 = w[:, i1:i2].clone()  # [N, b]
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for s1, s2 in _sub_blocks(i1, i2, width):  # relative to i1
            for i in range(s1, s2):
                col = i1 + i
                if not one_group and col in width:  # first column of a group: all of it lies in w1, updated
                    cols = slice(col, col + width[col])
                    builder.start_group(pgroup[col], w1[:, i : i + width[col]], d_all[cols], perm[cols])
                w_hat = builder.quantize_column(int(perm[col]), w1[:, i])  # [N]
                e = (w1[:, i] - w_hat) / u1[i, i]  # [N]
                loss += e * e / 2
                w1[:, i:s2] -= e.unsqueeze(1) * u1[i, i:s2].unsqueeze(0)
                err1[:, i] = e
            w1[:, s2:] -= err1[:, s1:s2] @ u1[s1:s2, s2:]
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    return GPTQResult(quantized=builder.result(), loss=loss.sum().item(), damp=lam)

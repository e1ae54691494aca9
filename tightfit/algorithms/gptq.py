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


# HessianAccumulator: input features per row block of x^T x. Narrow blocks skip more of the lower
# triangle: at T = 4096 tokens a K = 1536 Hessian takes 66 ms in blocks of 256 against 101 ms in one
# block of 2048, K = 576 10 against 16 ms (2-core AMD EPYC, 2026-11-27; K = 8960 at 256 within 7 % of 512)
GRAM_BLOCK = 256


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
        GRAM_BLOCK at a time against the columns from there on; `hessian` mirrors it): 51 % of the
        products at K = 8960, 58 % at K = 1536 (the products are most of the Hessians' time)."""
        k = self.in_features
        assert x.shape[-1] == k, (x.shape, k)
        x = x.reshape(-1, k).to(torch.float32)  # [T, K]
        with torch.autocast(x.device.type, enabled=False):  # inputs may come from bf16 forwards; H never does
            for i in range(0, k, GRAM_BLOCK):
                self._h[i : i + GRAM_BLOCK, i:] += (x[:, i : i + GRAM_BLOCK].T @ x[:, i:]).to(torch.float64)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """The fp32 [K, K] Hessian, written a row block at a time from the fp64 upper block triangle
        and mirrored: besides the accumulator only the result and one row block exist (a K = 8960
        Hessian is 0.64 GB in fp64; mirroring with whole-matrix triu and transposes took four copies)."""
        if self.n_tokens == 0:
            raise ValueError("no calibration inputs were accumulated")
        k = self.in_features
        out = torch.empty(k, k, dtype=torch.float32)
        for i in range(0, k, GRAM_BLOCK):
            j = min(i + GRAM_BLOCK, k)
            out[i:j, i:].copy_(self._h[i:j, i:] * (2.0 / self.n_tokens))  # the row block's valid part, one rounding
            out[j:, i:j].copy_(out[i:j, j:].T)
        return out


@dataclass(frozen=True)
class GPTQResult:
    """Quantized weight and the GPTQ objective sum_j e_j^2 / 2 (proxy of the output error).

    row_loss [N]: the objective per row; it equals dW_r (H + ridge I) dW_r^T / 2 exactly, with dW_r
    the row's final error (the columns' errors are that quadratic form in the Cholesky basis), so
    a row-weighted output error needs no [N, K] x [K, K] product (`fisher_error_of`).
    damp: the dampening chosen (a fraction of the mean H_jj); ridge: what it added to H's diagonal.
    """

    quantized: AnyQuantizedTensor
    loss: float
    damp: float
    row_loss: torch.Tensor
    ridge: float


def _levels_nest(levels: list[list[tuple[int, int]]]) -> bool:
    """Whether every boundary of a coarser level (fewer groups) is a boundary of each finer one."""
    unique = sorted({tuple(b) for b in levels}, key=len)
    return all({lo for lo, _ in coarse} <= {lo for lo, _ in fine} for coarse, fine in zip(unique, unique[1:]))


def nested_group_order(diag: torch.Tensor, levels: list[list[tuple[int, int]]]) -> torch.Tensor | None:
    """A column order [K] in which the groups of every level stay contiguous (GPTQ's act-order
    kept group-aware), or None when the levels do not nest.

    levels: the groups ([start, end) bounds partitioning [0, K)) of several formats; they nest when
    every boundary of a coarser level is one of each finer level (g128, g64 and g32 do; a format
    with one group per row is the coarsest). Groups of one parent are visited by decreasing summed
    H_jj, columns inside a finest group by decreasing H_jj; with one level this is the plain
    group-aware order. One order serves every format of the levels, so they share one Cholesky
    factor and one GPTQ sweep (`gptq_quantize_many`)."""
    if not _levels_nest(levels):
        return None
    unique = sorted({tuple(b) for b in levels}, key=len)  # coarse to fine

    def visit(lo: int, hi: int, depth: int) -> list[torch.Tensor]:
        if depth == len(unique):
            return [lo + torch.argsort(diag[lo:hi], descending=True, stable=True)]
        parts = sorted((p for p in unique[depth] if lo <= p[0] and p[1] <= hi), key=lambda p: -diag[p[0] : p[1]].sum().item())
        return [piece for p in parts for piece in visit(*p, depth + 1)]

    return torch.cat(visit(0, diag.shape[0], 0))


def group_aware_order(diag: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Column order of one format: groups by decreasing summed H_jj, columns within a group by
    decreasing H_jj. diag [K], bounds: [start, end) of each group -> permutation [K]."""
    return nested_group_order(diag, [bounds])


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = (H + lambda I)^-1), raising lambda until
    H is positive definite.

    With J the order-reversing permutation and J (H + lambda I) J = L L^T: U = J L^-1 J, one
    Cholesky and one triangular inverse (LAPACK's trtri, in place: a third of the flops of solving
    L X = I; a K = 8960 factor is the largest single cost of quantizing a 1.5B model: 5.7 -> 2.5 s)."""
    from scipy.linalg.lapack import get_lapack_funcs

    mean_diag = torch.mean(torch.diag(h)).item()
    for attempt in range(6):
        lam = damp * (10**attempt)
        damped = h.flip(0, 1)  # J H J, a new matrix
        damped.diagonal().add_(lam * mean_diag)
        l, info = torch.linalg.cholesky_ex(damped)  # lower, zeros above the diagonal
        del damped
        if info == 0:
            upper = l.numpy().T  # L^T, upper triangular, Fortran-ordered: what LAPACK inverts in place
            (trtri,) = get_lapack_funcs(("trtri",), (upper,))
            inverse, info = trtri(upper, lower=0, overwrite_c=1)  # (L^T)^-1 = (L^-1)^T
            if info != 0:
                raise ArithmeticError(f"triangular inverse of the Hessian's Cholesky factor failed (LAPACK info {info})")
            return torch.from_numpy(inverse.T).flip(0, 1), lam  # J L^-1 J
    raise ArithmeticError("Hessian is not positive definite even with 1e5 x dampening")


SUB_BLOCK = 32  # columns whose errors spread one by one; the rest of a block gets them as one product


def _sub_blocks(i1: int, i2: int, starts: set[int] | dict[int, object]) -> list[tuple[int, int]]:
    """[start, end) of the sub-blocks of block [i1, i2), relative to i1: at most SUB_BLOCK columns,
    a group's first column (`starts`) always first in its sub-block (its group is then fully updated
    when its parameters are chosen). Errors spread column by column inside a sub-block, and to the
    columns after it as one product: the same updates as column by column over the block, with far
    less memory traffic (a rank-1 update of [N, 128] per column costs more than the product)."""
    out, lo = [], i1
    for j in range(i1 + 1, i2):
        if j in starts or j - lo >= SUB_BLOCK:
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
    h and damp: a K = 8960 factor takes seconds.
    """
    return gptq_quantize_many(w, h, [fmt], damp=damp, block_size=block_size, act_order=act_order,
                              clip_search=clip_search, factors=factors)[0]


def gptq_quantize_many(
    w: torch.Tensor,
    h: torch.Tensor,
    formats: list[Format],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    clip_search: bool = True,
    factors: dict[bytes, tuple[torch.Tensor, float]] | None = None,
) -> list[GPTQResult]:
    """gptq_quantize of w in each of `formats`, one result per format. Formats whose groups nest
    (`nested_group_order`: g128, g64 and g32 do) are swept together: one column order, one Cholesky
    factor, and one pass over the columns for a copy of w per format stacked [F N, K], so the error
    updates are one product for all of them (the sensitivity stage tries every candidate format on
    every layer). With act-order each format's columns then follow the nested order, not its own
    group-aware one: the same groups, a slightly different visit inside them."""
    bounds = [fmt.group_bounds(w.shape[1]) for fmt in formats]  # the groups each format's builder works in
    w, h_diag = w.detach().to(torch.float32), torch.diag(h).to(torch.float32)  # [N, K], [K] (learned tables fit to them)
    results: dict[int, GPTQResult] = {}
    remaining = list(range(len(formats)))
    while remaining:  # greedily: the first remaining format and every later one that nests with it
        together = [remaining[0]]
        for i in remaining[1:]:
            if _levels_nest([bounds[j] for j in together] + [bounds[i]]):
                together.append(i)
        builders = [builder_for(formats[i], w, h_diag, clip_search=clip_search) for i in together]
        results.update(zip(together, _sweep(w, h, builders, damp=damp, block_size=block_size, act_order=act_order,
                                            factors=factors)))
        remaining = [i for i in remaining if i not in together]
    return [results[i] for i in range(len(formats))]


def _sweep(w: torch.Tensor, h: torch.Tensor, builders: list, *, damp: float, block_size: int, act_order: bool,
           factors: dict[bytes, tuple[torch.Tensor, float]] | None) -> list[GPTQResult]:
    """One GPTQ pass over the columns of w [N, K] for builders whose groups nest; format f works
    on rows f N .. (f + 1) N of the stacked copy."""
    n, k = w.shape
    assert h.shape == (k, k), (h.shape, k)
    w = w.detach().to(torch.float32).clone()
    h = h.detach().to(torch.float32)

    diag = torch.diag(h).clone()
    dead = diag == 0  # inputs that never fire: their weights cannot matter (their H_jj counts as 1)
    diag[dead] = 1.0
    w[:, dead] = 0.0

    perm = nested_group_order(diag, [b.bounds for b in builders]) if act_order else torch.arange(k)
    assert perm is not None, "gptq_quantize_many sweeps together only formats whose groups nest"
    w = w[:, perm]
    if len(builders) > 1:
        w = w.repeat(len(builders), 1)  # [F N, K]
    rows = [slice(f * n, (f + 1) * n) for f in range(len(builders))]
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

    # permuted column -> [(format, its group there, the group's width)] where a group starts
    firsts: dict[int, list[tuple[int, int, int]]] = {}
    grouped_starts: list[list[int]] = []  # per format with several groups: where its groups start
    for f, b in enumerate(builders):
        if len(b.bounds) == 1:  # the group spans every block: its parameters come from the whole row up front
            b.start_group(0, w[rows[f]], d_all[torch.argsort(perm)], torch.arange(k))  # in the original order
            continue
        group_of = torch.empty(k, dtype=torch.long)  # original column -> its group
        for gi, (lo, hi) in enumerate(b.bounds):
            group_of[lo:hi] = gi
        pgroup = group_of[perm].tolist()
        starts = [j for j in range(k) if j == 0 or pgroup[j] != pgroup[j - 1]]
        for j in starts:
            lo, hi = b.bounds[pgroup[j]]
            firsts.setdefault(j, []).append((f, pgroup[j], hi - lo))
        grouped_starts.append(starts)
    # blocks never split a group of the coarsest grouped format, so (nested) never one of any format
    blocks = (_blocks(min(grouped_starts, key=len), k, block_size) if grouped_starts
              else [(lo, min(lo + block_size, k)) for lo in range(0, k, block_size)])

    loss = torch.zeros(w.shape[0])
    for i1, i2 in blocks:
        w1 = w[:, i1:i2].clone()  # [F N, b]
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for s1, s2 in _sub_blocks(i1, i2, firsts):  # relative to i1
            for i in range(s1, s2):
                col = i1 + i
                for f, gi, width in firsts.get(col, ()):  # all of the group lies in w1, updated
                    cols = slice(col, col + width)
                    builders[f].start_group(gi, w1[rows[f], i : i + width], d_all[cols], perm[cols])
                original = int(perm[col])
                if len(builders) == 1:
                    w_hat = builders[0].quantize_column(original, w1[:, i])  # [N]
                else:
                    w_hat = torch.cat([b.quantize_column(original, w1[r, i]) for b, r in zip(builders, rows)])
                e = (w1[:, i] - w_hat) / u1[i, i]  # [F N]
                loss += e * e / 2
                w1[:, i:s2] -= e.unsqueeze(1) * u1[i, i:s2].unsqueeze(0)
                err1[:, i] = e
            w1[:, s2:] -= err1[:, s1:s2] @ u1[s1:s2, s2:]
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    ridge = lam * diag.mean().item()  # diag: H's diagonal as factored (inputs that never fire count 1)
    return [GPTQResult(quantized=b.result(), loss=loss[r].sum().item(), damp=lam, row_loss=loss[r], ridge=ridge)
            for b, r in zip(builders, rows)]

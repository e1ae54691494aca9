"""The integer program: choose one candidate per layer of the plan under size and latency budgets.

Measure, then optimize (exllamav2 `conversion/optimize.py`; OHQ, Huang et al. 2023, eq. 6): an
earlier stage measures, for every layer l and candidate format c, an additive sensitivity
s[l, c] (e.g. the KL increase when only that layer is quantized), the exact bytes b[l, c] and a
decode latency t[l, c] on this machine. This stage solves the multiple-choice knapsack

    x[l, c] in {0, 1}                           layer l is stored in candidate c
    sum_c x[l, c] = 1                           for every layer l
    sum_{l,c} b[l, c] x[l, c] <= B              B = min(max_bytes - fixed_bytes, floor(max_bpw * W / 8)),
                                                W = sum_l out_l * in_l
    sum_{l,c} t[l, c] x[l, c] <= T - T0         T = max_latency_ms, T0 = fixed_latency_ms
    minimize sum_{l,c} s[l, c] x[l, c]

with `scipy.optimize.milp` (HiGHS branch and bound). Candidates are flattened layer by layer into
one vector of n = sum_l C_l variables; the constraint matrix is sparse ([L + 2, n], n + 2n
non-zeros at most). Before branching, the LP relaxation and a quick feasible plan drop the
candidates no optimal plan can use (reduced-cost fixing, see `_solve`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from tightfit.errors import InfeasibleBudget
from tightfit.stages.allocate.plan import BYTES_PER_MB, Budget, LayerChoice, Plan, _bpw_to_bytes, _is_real
from tightfit.stages.allocate.problem import _LATENCY_TOL_MS, _few, _plan, _Problem, _problem

# A plan's predicted loss is within this relative gap of the optimum (HiGHS mip_rel_gap, tighter
# than its default 1e-4 at little cost here, so budget sweeps stay monotone to 1e-6). The
# objective is scaled to ~1 first, so HiGHS's absolute gap (1e-6) is relative too.
MIP_REL_GAP = 1e-6


@contextlib.contextmanager
def _solver_chatter_hidden():
    """HiGHS inside scipy 1.17 prints debugging lines to the process's C stdout during some MIP solves
    (`HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();`, ERGO-Code/HiGHS#2783),
    in the middle of the plan table: point file descriptor 1 at /dev/null for the solve only."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)

def _solve(p: _Problem, objective: np.ndarray, K: np.ndarray, ub: np.ndarray, time_limit_s: float) -> np.ndarray | None:
    """Minimize objective @ x over binary x [n] with one candidate per layer and K @ x <= ub.

    K [m, n], ub [m]: the knapsack rows (bytes, latency). Returns the chosen candidate of each
    layer [L], or None when no assignment meets the rows.

    Before branching, the LP relaxation and a feasible incumbent prune candidates exactly
    (reduced-cost fixing, a standard MIP preprocessing step): with LP value z and reduced cost
    d_j >= 0 of candidate j, every plan using j costs at least z + d_j, so a candidate with
    z + d_j above the incumbent's cost is in no optimal plan. HiGHS's root heuristics are slow to
    find good plans for this problem; on 210 layers x 20 formats with both budgets the pruning
    keeps a quarter of the candidates and cut the worst solve times seen from ~8 s to ~2 s.
    """
    started = time.perf_counter()
    n_layers, n = len(p.names), len(p.choices)
    one_per_layer = sparse.csr_array((np.ones(n), (p.layer_of, np.arange(n))), shape=(n_layers, n))  # [L, n]
    # The LP sees costs in [-1, 1]; dual simplex returns a vertex, where at most m layers are
    # split between candidates.
    unit = float(np.max(np.abs(objective))) or 1.0
    lp = linprog(objective / unit, A_ub=K, b_ub=ub, A_eq=one_per_layer, b_eq=np.ones(n_layers), bounds=(0, 1), method="highs-ds")
    if lp.status == 2:
        return None
    if lp.status != 0:
        raise RuntimeError(f"the LP relaxation of the allocation failed (status {lp.status}): {lp.message}")
    # Scale the objective so the LP value is ~1: HiGHS's absolute gap (1e-6) then acts as a relative one.
    z = lp.fun * unit
    scale = abs(z) if abs(z) > 1e-9 * unit else unit
    c, z_lp, reduced = objective / scale, z / scale, lp.lower.marginals * (unit / scale)  # [n], scalar, [n]

    keep = np.arange(n)
    pick = _incumbent(p, c, K, ub, lp.x)
    if pick is not None:
        # The LP's duals are feasible to 1e-7 per column in LP units: a bound summing L columns
        # may be off by L * 1e-7 of those; keep every candidate within that of the incumbent.
        slack = 1e-6 + n_layers * 1e-7 * unit / scale
        keep = np.union1d(np.flatnonzero(z_lp + reduced <= float(c[pick].sum()) + slack), pick)

    remaining = time_limit_s - (time.perf_counter() - started)
    rows = sparse.vstack([one_per_layer[:, keep], sparse.csr_array(K[:, keep])], format="csr")  # [L + m, n_keep]
    with _solver_chatter_hidden():
        res = milp(
            c[keep],
            integrality=np.ones(len(keep)),
            bounds=Bounds(0, 1),
            constraints=LinearConstraint(rows, np.r_[np.ones(n_layers), np.full(len(ub), -np.inf)], np.r_[np.ones(n_layers), ub]),
            options={"time_limit": max(remaining, 1e-3), "mip_rel_gap": MIP_REL_GAP},
        )
    if res.status == 2 and pick is None:
        return None
    if res.status == 1:
        found = "" if res.x is None else f"; the best plan found so far is within {100 * res.mip_gap:.3g}% of optimal"
        raise RuntimeError(
            f"the solver stopped at its {time_limit_s:g} s time limit before proving an optimal plan for "
            f"{n_layers} layers x {n} candidates{found}; raise time_limit_s"
        )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"the MILP solver failed on the allocation (status {res.status}): {res.message}")
    chosen = keep[np.round(res.x) == 1]  # [L] in layer order
    if len(chosen) != n_layers or not np.array_equal(p.layer_of[chosen], np.arange(n_layers)):
        raise RuntimeError("the MILP solver returned a solution that does not pick exactly one format per layer")
    return chosen


def _incumbent(p: _Problem, c: np.ndarray, K: np.ndarray, ub: np.ndarray, x_lp: np.ndarray) -> np.ndarray | None:
    """A feasible plan near the LP optimum, or None: layers the LP leaves whole keep their
    candidate, the few split ones are enumerated, then single-layer swaps improve it."""
    pick = np.lexsort((-x_lp, p.layer_of))[p.starts]  # [L] each layer's largest LP share
    split = np.flatnonzero(x_lp[pick] < 1 - 1e-6)
    if len(split) > 3:
        return None
    used = K[:, pick].sum(axis=1) - K[:, pick[split]].sum(axis=1)  # [m] by the whole layers
    ends = np.r_[p.starts[1:], len(c)]
    best = None
    for combo in itertools.product(*(range(p.starts[l], ends[l]) for l in split)):
        combo = list(combo)
        if np.all(used + K[:, combo].sum(axis=1) <= ub) and (best is None or c[combo].sum() < c[best].sum()):
            best = combo
    if best is None:
        return None
    pick[split] = best
    # Best-improvement descent over single-layer swaps that stay within every row.
    used = K[:, pick].sum(axis=1)  # [m]
    for _ in range(10 * len(pick)):
        current = pick[p.layer_of]  # [n] the candidate each candidate's layer holds now
        gain = c[current] - c  # [n]
        fits = np.all(used[:, None] + K - K[:, current] <= ub[:, None], axis=0)  # [n]
        gain[~fits] = 0.0
        j = int(np.argmax(gain))
        if gain[j] <= 1e-12:
            break
        used += K[:, j] - K[:, current[j]]
        pick[p.layer_of[j]] = j
    return pick


def _rows(p: _Problem, bytes_cap: int | None, latency_cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Knapsack rows K [m, n] and limits ub [m] for the limits that are set.

    Bytes are integers: the row allows cap + 0.5 so the solver's feasibility tolerance can
    neither refuse a plan of exactly cap bytes nor admit one of cap + 1. Latencies are floats
    the solver may overshoot by its tolerance: the row ends that much early, though never
    below the all-fastest plan, which is feasible whenever the limit alone is.
    """
    K, ub = [], []
    if bytes_cap is not None:
        K.append(p.nbytes.astype(np.float64))
        ub.append(bytes_cap + 0.5)
    if latency_cap is not None:
        K.append(p.latency)
        ub.append(max(latency_cap - _LATENCY_TOL_MS, p.min_latency()))
    return np.asarray(K).reshape(len(K), len(p.choices)), np.asarray(ub, dtype=np.float64)


def _shown(limit: float, minimum: float, decimals: int) -> tuple[str, str]:
    """The limit as a number and the minimum rounded UP (so the number shown is itself
    feasible), with enough decimals that the two read differently."""
    for d in range(decimals, decimals + 7):
        a = f"{limit:.{d}f}"
        b = f"{math.ceil(minimum * 10**d - 1e-9) / 10**d:.{d}f}"
        if a != b:
            break
    return a, b


def _infeasible_alone(p: _Problem, budget: Budget) -> list[str]:
    """One clause per limit that no plan meets even with every layer at its own minimum."""
    clauses = []
    min_bytes = p.min_bytes
    if budget.max_bpw is not None and _bpw_to_bytes(budget.max_bpw, p.total_weights) < min_bytes:
        lim, mn = _shown(budget.max_bpw, min_bytes * 8 / p.total_weights, 2)
        clauses.append(
            f"budget {lim} bits/weight cannot be met: "
            f"the smallest possible is {mn} bits/weight (every layer in its smallest format)"
        )
    if budget.max_bytes is not None and budget.max_bytes - budget.fixed_bytes < min_bytes:
        lim, mn = _shown(budget.max_bytes / BYTES_PER_MB, (min_bytes + budget.fixed_bytes) / BYTES_PER_MB, 1)
        fixed = f" plus {budget.fixed_bytes / BYTES_PER_MB:.1f} MB outside the plan" if budget.fixed_bytes else ""
        clauses.append(f"budget {lim} MB cannot be met: the smallest possible is {mn} MB (every layer in its smallest format{fixed})")
    if budget.max_latency_ms is not None:
        fastest = p.min_latency() + budget.fixed_latency_ms
        if fastest > budget.max_latency_ms:
            lim, mn = _shown(budget.max_latency_ms, fastest, 1)
            fixed = f" plus {budget.fixed_latency_ms:.1f} ms/token fixed" if budget.fixed_latency_ms else ""
            clauses.append(
                f"budget {lim} ms/token cannot be met: "
                f"the fastest possible is {mn} ms/token (every layer in its fastest format{fixed})"
            )
    return clauses


def _infeasible_jointly(p: _Problem, budget: Budget, bytes_cap: int, time_limit_s: float) -> str:
    """Each limit alone can be met, not all at once: name each minimum, and the fastest plan
    that fits the size limits (a second integer program: minimize latency under the byte cap)."""
    minima = []
    if budget.max_bpw is not None:
        minima.append(f"the smallest possible is {_shown(budget.max_bpw, p.min_bytes * 8 / p.total_weights, 2)[1]} bits/weight")
    if budget.max_bytes is not None:
        smallest = (p.min_bytes + budget.fixed_bytes) / BYTES_PER_MB
        minima.append(f"the smallest possible is {_shown(budget.max_bytes / BYTES_PER_MB, smallest, 1)[1]} MB")
    fastest = p.min_latency() + budget.fixed_latency_ms
    minima.append(f"the fastest possible is {_shown(budget.max_latency_ms, fastest, 1)[1]} ms/token")
    message = f"budget {budget.describe()} cannot be met: each limit alone can ({'; '.join(minima)}), but not all at once"
    chosen = _solve(p, p.latency, *_rows(p, bytes_cap, None), time_limit_s)
    if chosen is not None:
        size = " and ".join(
            ([f"{budget.max_bpw:.2f} bits/weight"] if budget.max_bpw is not None else [])
            + ([f"{budget.max_bytes / BYTES_PER_MB:.1f} MB"] if budget.max_bytes is not None else [])
        )
        within = float(p.latency[chosen].sum()) + budget.fixed_latency_ms
        message += f"; within {size} the fastest possible is {_shown(budget.max_latency_ms, within, 1)[1]} ms/token"
    return message


def allocate(
    layers: Mapping[str, tuple[int, int]],
    choices: Mapping[str, Sequence[LayerChoice]],
    budget: Budget,
    *,
    time_limit_s: float = 10.0,
) -> Plan:
    """Choose one format per layer that minimizes the summed sensitivity within `budget`.

    layers:  layer name -> (out_features, in_features)
    choices: layer name -> its candidates (nbytes as measured, never recomputed here); a latency
             limit needs latency_ms on every candidate
    The plan is optimal to a relative gap of MIP_REL_GAP. Raises InfeasibleBudget when no plan
    meets the budget, naming the smallest limit that can be met; ValueError on malformed input;
    RuntimeError when the solver stops at time_limit_s without a proven optimum.
    """
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    if not _is_real(time_limit_s) or time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be a positive number, got {time_limit_s!r}")
    p = _problem(layers, choices)
    if budget.max_latency_ms is not None and p.latency is None:
        lacking = [p.names[l] for l in sorted({int(p.layer_of[i]) for i, c in enumerate(p.choices) if c.latency_ms is None})]
        raise ValueError(
            f"a latency budget needs latency_ms on every choice; layers {_few(lacking)} have choices without one "
            "(profile them, or drop max_latency_ms)"
        )

    clauses = _infeasible_alone(p, budget)
    if clauses:
        raise InfeasibleBudget("; ".join(clauses))

    bytes_cap = budget.bytes_cap(p.total_weights)
    latency_cap = None if budget.max_latency_ms is None else budget.max_latency_ms - budget.fixed_latency_ms
    chosen = _solve(p, p.sensitivity, *_rows(p, bytes_cap, latency_cap), time_limit_s)
    if chosen is None:
        # Every limit alone can be met (checked above), so only their combination fails.
        if bytes_cap is None or latency_cap is None:
            raise RuntimeError("the MILP solver calls a budget with a single feasible limit infeasible")
        raise InfeasibleBudget(_infeasible_jointly(p, budget, bytes_cap, time_limit_s))
    return _plan(p, budget, chosen, bytes_cap)


def pareto_sweep(
    layers: Mapping[str, tuple[int, int]],
    choices: Mapping[str, Sequence[LayerChoice]],
    budgets: Sequence[Budget],
    *,
    time_limit_s: float = 10.0,
) -> list[Plan]:
    """`allocate` for each budget in order; budgets no plan can meet are left out."""
    plans = []
    for budget in budgets:
        try:
            plans.append(allocate(layers, choices, budget, time_limit_s=time_limit_s))
        except InfeasibleBudget:
            continue
    return plans

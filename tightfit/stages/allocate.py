"""Allocate stage: choose one quantization format per linear layer under size and latency budgets.

Measure, then optimize (exllamav2 `conversion/optimize.py`; OHQ, Huang et al. 2023, eq. 6): an
earlier stage measures, for every layer l and candidate format c, an additive sensitivity
s[l, c] (e.g. the KL increase when only that layer is quantized), the exact bytes b[l, c] and a
decode latency t[l, c] on this machine. This stage solves the multiple-choice knapsack

    x[l, c] in {0, 1}                           layer l is stored in candidate c
    sum_c x[l, c] = 1                           for every layer l
    sum_{l,c} b[l, c] x[l, c] <= B              B = min(max_bytes, floor(max_bpw * W / 8)),
                                                W = sum_l out_l * in_l
    sum_{l,c} t[l, c] x[l, c] <= T - T0         T = max_latency_ms, T0 = fixed_latency_ms
    minimize sum_{l,c} s[l, c] x[l, c]

with `scipy.optimize.milp` (HiGHS branch and bound). Candidates are flattened layer by layer into
one vector of n = sum_l C_l variables; the constraint matrix is sparse ([L + 2, n], n + 2n
non-zeros at most). Before branching, the LP relaxation and a quick feasible plan drop the
candidates no optimal plan can use (reduced-cost fixing, see `_solve`).

`refine` then searches around the MILP plan on the real objective (EvoPress: layer errors are
not additive), keeping every limit of the budget.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from tightfit.algorithms.evopress import EvolutionConfig, EvolutionResult, evolve
from tightfit.errors import InfeasibleBudget
from tightfit.formats.registry import Format, parse_format

PLAN_JSON_VERSION = 1
BUDGET_JSON_VERSION = 1
BYTES_PER_MB = 1_000_000  # MB in budgets and messages is decimal

# A plan's predicted loss is within this relative gap of the optimum (HiGHS mip_rel_gap, tighter
# than its default 1e-4 at little cost here, so budget sweeps stay monotone to 1e-6). The
# objective is scaled to ~1 first, so HiGHS's absolute gap (1e-6) is relative too.
MIP_REL_GAP = 1e-6
# HiGHS's mip_feasibility_tolerance: the solver may overshoot a row by this much. The latency row
# ends this much early (see `_rows`); a plan never exceeds its latency limit by more than this
# many ms (a nanosecond). Bytes are integers and are checked exactly.
_LATENCY_TOL_MS = 1e-6


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _bpw_to_bytes(bpw: float, total_weights: int) -> int:
    """floor(bpw * W / 8), with bpw read as the decimal it was written as: the float typed as
    2.28 sits just below 2.28 (repr is the shortest string that round-trips), and must not
    floor one byte short of a plan of exactly 2.28 bits/weight."""
    return math.floor(Fraction(repr(float(bpw))) * total_weights / 8)


@dataclass(frozen=True)
class LayerChoice:
    """One candidate for one layer, as measured by the sensitivity and profile stages.

    fmt:         the quantization format
    nbytes:      exact bytes of the layer packed in fmt (`fmt.nbytes(out, in).total`)
    sensitivity: additive predicted loss of quantizing only this layer in fmt (lower is better)
    latency_ms:  decode latency of this layer per token in fmt, None when not measured
    """

    fmt: Format
    nbytes: int
    sensitivity: float
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, Format.__args__):
            raise ValueError(f"choice format must be a quantization format, got {type(self.fmt).__name__}")
        if not _is_int(self.nbytes) or self.nbytes <= 0:
            raise ValueError(f"choice {self.fmt.name}: nbytes must be a positive integer, got {self.nbytes!r}")
        if not _is_real(self.sensitivity):
            raise ValueError(f"choice {self.fmt.name}: sensitivity must be a finite number, got {self.sensitivity!r}")
        if self.latency_ms is not None and (not _is_real(self.latency_ms) or self.latency_ms < 0):
            raise ValueError(
                f"choice {self.fmt.name}: latency_ms must be a finite number >= 0 or None, got {self.latency_ms!r}"
            )


@dataclass(frozen=True)
class Budget:
    """Limits on the quantized linear layers; set at least one.

    max_bytes:        total bytes of the quantized layers
    max_bpw:          average bits per quantized weight (total bytes * 8 / total weights)
    max_latency_ms:   predicted decode latency per token, the sum of the chosen layers'
                      latencies plus fixed_latency_ms
    fixed_latency_ms: measured latency of everything else per token (attention, norms, head)
    """

    max_bytes: int | None = None
    max_bpw: float | None = None
    max_latency_ms: float | None = None
    fixed_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_bytes is None and self.max_bpw is None and self.max_latency_ms is None:
            raise ValueError("a budget needs at least one of max_bytes, max_bpw, max_latency_ms")
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if self.max_bpw is not None and (not _is_real(self.max_bpw) or self.max_bpw <= 0):
            raise ValueError(f"max_bpw must be a positive finite number, got {self.max_bpw!r}")
        if self.max_latency_ms is not None and (not _is_real(self.max_latency_ms) or self.max_latency_ms <= 0):
            raise ValueError(f"max_latency_ms must be a positive finite number, got {self.max_latency_ms!r}")
        if not _is_real(self.fixed_latency_ms) or self.fixed_latency_ms < 0:
            raise ValueError(f"fixed_latency_ms must be a finite number >= 0, got {self.fixed_latency_ms!r}")

    def describe(self) -> str:
        """The limits for people, e.g. `≤ 3.00 bits/weight, ≤ 60.0 MB, ≤ 12.0 ms/token`."""
        parts = []
        if self.max_bpw is not None:
            parts.append(f"≤ {self.max_bpw:.2f} bits/weight")
        if self.max_bytes is not None:
            parts.append(f"≤ {self.max_bytes / BYTES_PER_MB:.1f} MB")
        if self.max_latency_ms is not None:
            parts.append(f"≤ {self.max_latency_ms:.1f} ms/token")
        return ", ".join(parts)

    def bytes_cap(self, total_weights: int) -> int | None:
        """B, the byte limit both size limits imply together, or None when neither is set."""
        caps = []
        if self.max_bytes is not None:
            caps.append(int(self.max_bytes))
        if self.max_bpw is not None:
            caps.append(_bpw_to_bytes(self.max_bpw, total_weights))
        return min(caps) if caps else None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": BUDGET_JSON_VERSION,
            "max_bytes": None if self.max_bytes is None else int(self.max_bytes),
            "max_bpw": None if self.max_bpw is None else float(self.max_bpw),
            "max_latency_ms": None if self.max_latency_ms is None else float(self.max_latency_ms),
            "fixed_latency_ms": float(self.fixed_latency_ms),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Budget:
        fields = _check_json(d, "budget", BUDGET_JSON_VERSION, ("max_bytes", "max_bpw", "max_latency_ms", "fixed_latency_ms"))
        return cls(**fields)


@dataclass(frozen=True)
class Plan:
    """Output of the allocate stage: one format per quantized layer and what it is predicted to cost.

    formats:              layer name -> chosen format, in the order the layers were given
    total_bytes:          exact bytes of all quantized layers in their chosen formats
    total_weights:        sum of out_features * in_features over the layers
    bits_per_weight:      total_bytes * 8 / total_weights
    predicted_loss:       sum of the chosen choices' sensitivities
    predicted_latency_ms: sum of the chosen latencies + budget.fixed_latency_ms; None when the
                          choices carry no latencies
    budget:               the budget the plan was solved for
    """

    formats: dict[str, Format]
    total_bytes: int
    total_weights: int
    bits_per_weight: float
    predicted_loss: float
    predicted_latency_ms: float | None
    budget: Budget

    def __post_init__(self) -> None:
        if not self.formats or not all(isinstance(f, Format.__args__) for f in self.formats.values()):
            raise ValueError("a plan needs at least one layer, each with a quantization format")
        if not (_is_int(self.total_bytes) and self.total_bytes > 0 and _is_int(self.total_weights) and self.total_weights > 0):
            raise ValueError(f"plan totals must be positive integers, got {self.total_bytes!r} bytes, {self.total_weights!r} weights")
        if not isinstance(self.budget, Budget):
            raise ValueError(f"plan budget must be a Budget, got {type(self.budget).__name__}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_JSON_VERSION,
            "formats": {name: fmt.name for name, fmt in self.formats.items()},
            "total_bytes": int(self.total_bytes),
            "total_weights": int(self.total_weights),
            "bits_per_weight": float(self.bits_per_weight),
            "predicted_loss": float(self.predicted_loss),
            "predicted_latency_ms": None if self.predicted_latency_ms is None else float(self.predicted_latency_ms),
            "budget": self.budget.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        keys = ("formats", "total_bytes", "total_weights", "bits_per_weight", "predicted_loss", "predicted_latency_ms", "budget")
        fields = _check_json(d, "plan", PLAN_JSON_VERSION, keys)
        if not isinstance(fields["formats"], dict):
            got = type(fields["formats"]).__name__
            raise ValueError(f"plan JSON 'formats' must be an object of layer name -> format name, got {got}")
        return cls(
            **{
                **fields,
                "formats": {name: parse_format(text) for name, text in fields["formats"].items()},
                "budget": Budget.from_json(fields["budget"]),
            }
        )


def _check_json(d: object, what: str, version: int, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} JSON must be an object, got {type(d).__name__}")
    if d.get("version") != version:
        raise ValueError(f"{what} JSON has version {d.get('version')!r}; this tightfit reads version {version}")
    got = set(d) - {"version"}
    if got != set(keys):
        missing, unknown = sorted(set(keys) - got), sorted(got - set(keys))
        raise ValueError(f"{what} JSON keys differ from the expected ones: missing {missing}, unknown {unknown}")
    return {k: d[k] for k in keys}


# ---- the integer program ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """Candidates flattened layer by layer: candidate i belongs to layer layer_of[i]."""

    names: list[str]
    choices: list[LayerChoice]  # [n]
    layer_of: np.ndarray  # [n] int64, non-decreasing
    starts: np.ndarray  # [L] int64, index of each layer's first candidate
    nbytes: np.ndarray  # [n] int64
    sensitivity: np.ndarray  # [n] float64
    latency: np.ndarray | None  # [n] float64, None unless every candidate has a latency
    total_weights: int

    @property
    def min_bytes(self) -> int:
        """Bytes with every layer in its smallest candidate."""
        return int(np.minimum.reduceat(self.nbytes, self.starts).sum())

    def min_latency(self) -> float:
        """Summed layer latency with every layer in its fastest candidate (fixed part excluded)."""
        assert self.latency is not None
        return float(np.minimum.reduceat(self.latency, self.starts).sum())


def _problem(layers: Mapping[str, tuple[int, int]], choices: Mapping[str, Sequence[LayerChoice]]) -> _Problem:
    if not layers:
        raise ValueError("no layers to allocate")
    missing, extra = [n for n in layers if n not in choices], [n for n in choices if n not in layers]
    if missing or extra:
        raise ValueError(
            f"layers and choices name different layers: no choices for {_few(missing)}, choices for unknown layers {_few(extra)}"
        )
    names, flat, layer_of, starts, total_weights = [], [], [], [], 0
    for l, (name, shape) in enumerate(layers.items()):
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
            raise ValueError(f"layer {name!r}: shape must be (out_features, in_features) positive integers, got {shape!r}")
        cands = list(choices[name])
        if not cands:
            raise ValueError(f"layer {name!r} has no candidate formats")
        if not all(isinstance(c, LayerChoice) for c in cands):
            raise ValueError(f"layer {name!r}: every candidate must be a LayerChoice")
        fmts = [c.fmt for c in cands]
        if len(set(fmts)) != len(fmts):
            dup = sorted({f.name for f in fmts if fmts.count(f) > 1})
            raise ValueError(f"layer {name!r} lists format(s) {dup} more than once; give one candidate per format")
        names.append(name)
        starts.append(len(flat))
        flat.extend(cands)
        layer_of.extend([l] * len(cands))
        total_weights += int(shape[0]) * int(shape[1])
    lat = [c.latency_ms for c in flat]
    return _Problem(
        names=names,
        choices=flat,
        layer_of=np.asarray(layer_of, dtype=np.int64),
        starts=np.asarray(starts, dtype=np.int64),
        nbytes=np.asarray([c.nbytes for c in flat], dtype=np.int64),
        sensitivity=np.asarray([c.sensitivity for c in flat], dtype=np.float64),
        latency=None if any(t is None for t in lat) else np.asarray(lat, dtype=np.float64),
        total_weights=total_weights,
    )


def _few(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


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
    if budget.max_bytes is not None and budget.max_bytes < min_bytes:
        lim, mn = _shown(budget.max_bytes / BYTES_PER_MB, min_bytes / BYTES_PER_MB, 1)
        clauses.append(f"budget {lim} MB cannot be met: the smallest possible is {mn} MB (every layer in its smallest format)")
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
        minima.append(f"the smallest possible is {_shown(budget.max_bytes / BYTES_PER_MB, p.min_bytes / BYTES_PER_MB, 1)[1]} MB")
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


def _plan(p: _Problem, budget: Budget, chosen: np.ndarray, bytes_cap: int | None) -> Plan:
    """Check the chosen candidates [L] against the budget and recompute every total from them
    (never from the solver's objective)."""
    total_bytes = int(p.nbytes[chosen].sum())
    if bytes_cap is not None and total_bytes > bytes_cap:
        raise RuntimeError(f"the MILP solver returned {total_bytes} bytes for a budget of {bytes_cap} bytes")
    latency = None
    if p.latency is not None:
        latency = float(p.latency[chosen].sum()) + budget.fixed_latency_ms
        if budget.max_latency_ms is not None and latency > budget.max_latency_ms + _LATENCY_TOL_MS:
            raise RuntimeError(f"the MILP solver returned {latency} ms/token for a budget of {budget.max_latency_ms} ms/token")
    return Plan(
        formats={p.names[int(p.layer_of[i])]: p.choices[i].fmt for i in chosen},
        total_bytes=total_bytes,
        total_weights=p.total_weights,
        bits_per_weight=total_bytes * 8 / p.total_weights,
        predicted_loss=float(p.sensitivity[chosen].sum()),
        predicted_latency_ms=latency,
        budget=budget,
    )


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


PlanFitness = Callable[[Mapping[str, Format], int], float]
"""(layer -> format, level) -> the plan's real loss, lower is better; level 0 is a cheap screen
(few tokens), level 1 the full measurement (see algorithms.evopress)."""


@dataclass(frozen=True)
class Refinement:
    """A plan improved on the real loss: plan (its predicted_loss is still the additive sum),
    the measured loss of the start and of the plan (level 1), the parent's loss per generation,
    and how many plans were scored at each level (screen, full)."""

    plan: Plan
    start_loss: float
    loss: float
    history: list[float]
    evaluations: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan.to_json(), "start_loss": self.start_loss, "loss": self.loss, "history": self.history,
                "evaluations": list(self.evaluations)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Refinement:
        return cls(plan=Plan.from_json(d["plan"]), start_loss=float(d["start_loss"]), loss=float(d["loss"]),
                   history=[float(x) for x in d["history"]], evaluations=tuple(int(x) for x in d["evaluations"]))


def refine(
    plan: Plan,
    layers: Mapping[str, tuple[int, int]],
    choices: Mapping[str, Sequence[LayerChoice]],
    fitness: PlanFitness,
    config: EvolutionConfig = EvolutionConfig(),
    *,
    progress: bool = True,
) -> Refinement:
    """EvoPress from `plan` (usually `allocate`'s) within plan.budget: level-switch mutations,
    two-step selection on `fitness`, the parent replaced only by a better plan."""
    p = _problem(layers, choices)
    if list(plan.formats) != p.names:
        raise ValueError("the plan and the choices name different layers")
    fmt_index = [{c.fmt: i for i, c in enumerate(p.choices[p.starts[l]: p.starts[l] + n])}
                 for l, n in enumerate(np.diff(np.append(p.starts, len(p.choices))))]
    try:
        start = np.asarray([fmt_index[l][plan.formats[name]] for l, name in enumerate(p.names)], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"the plan uses format {e.args[0].name}, which is not among the choices") from None
    per_layer = lambda values: [values[p.starts[l]: p.starts[l] + len(fmt_index[l])] for l in range(len(p.names))]  # noqa: E731
    budget = plan.budget
    caps = []
    bytes_cap = budget.bytes_cap(p.total_weights)
    if bytes_cap is not None:
        caps.append((per_layer(p.nbytes), bytes_cap))
    if budget.max_latency_ms is not None:
        if p.latency is None:
            raise ValueError("a latency budget needs latency_ms on every choice")
        caps.append((per_layer(p.latency), budget.max_latency_ms - budget.fixed_latency_ms + _LATENCY_TOL_MS))

    def formats_of(a: np.ndarray) -> dict[str, Format]:
        return {name: p.choices[p.starts[l] + int(a[l])].fmt for l, name in enumerate(p.names)}

    result: EvolutionResult = evolve(start, per_layer(p.nbytes), lambda a, level: fitness(formats_of(a), level), config,
                                     caps=caps, progress=progress)
    chosen = p.starts + result.best
    return Refinement(plan=_plan(p, budget, chosen, bytes_cap), start_loss=result.start_fitness, loss=result.fitness,
                      history=result.history, evaluations=result.evaluations)

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
non-zeros at most).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from tightfit.errors import InfeasibleBudget
from tightfit.formats import QuantFormat

PLAN_JSON_VERSION = 1
BUDGET_JSON_VERSION = 1
BYTES_PER_MB = 1_000_000  # MB in budgets and messages is decimal

# Latencies are floats: a plan may exceed the latency limit by this relative amount (solver
# feasibility tolerance), never more. Bytes are integers and are checked exactly.
_LATENCY_RTOL = 1e-7
# HiGHS stops at mip_rel_gap (default 1e-4); a budget sweep must be monotone, so close the gap.
_MIP_REL_GAP = 1e-9


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

    fmt: QuantFormat
    nbytes: int
    sensitivity: float
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, QuantFormat):
            raise ValueError(f"choice format must be a QuantFormat, got {type(self.fmt).__name__}")
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

    formats: dict[str, QuantFormat]
    total_bytes: int
    total_weights: int
    bits_per_weight: float
    predicted_loss: float
    predicted_latency_ms: float | None
    budget: Budget

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
            raise ValueError(f"plan JSON 'formats' must be an object of layer name -> format name, got {type(fields['formats']).__name__}")
        return cls(
            **{
                **fields,
                "formats": {name: QuantFormat.parse(text) for name, text in fields["formats"].items()},
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
        raise ValueError(
            f"{what} JSON keys differ from the expected ones: missing {sorted(set(keys) - got)}, unknown {sorted(got - set(keys))}"
        )
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
            f"layers and choices name different layers: no choices for {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"choices for unknown layers {extra[:5]}{' ...' if len(extra) > 5 else ''}"
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


def _solve(p: _Problem, objective: np.ndarray, bytes_cap: int | None, latency_cap: float | None, time_limit_s: float):
    """HiGHS on: minimize objective @ x, one candidate per layer, bytes <= cap, latency <= cap."""
    n, n_layers = len(p.choices), len(p.names)
    rows = [sparse.csr_array((np.ones(n), (p.layer_of, np.arange(n))), shape=(n_layers, n))]  # [L, n]
    lb, ub = [np.ones(n_layers)], [np.ones(n_layers)]
    if bytes_cap is not None:
        rows.append(sparse.csr_array(p.nbytes.astype(np.float64)[None, :]))  # [1, n]
        lb.append([-np.inf])
        ub.append([float(bytes_cap)])
    if latency_cap is not None:
        rows.append(sparse.csr_array(p.latency[None, :]))  # [1, n]
        lb.append([-np.inf])
        ub.append([latency_cap])
    # HiGHS also stops at an absolute gap of 1e-6: scale the objective to O(1) so that gap is
    # relative to the largest sensitivity, whatever unit the sensitivities come in.
    scale = float(np.max(np.abs(objective))) or 1.0
    return milp(
        objective / scale,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(sparse.vstack(rows, format="csr"), np.concatenate(lb), np.concatenate(ub)),
        options={"time_limit": float(time_limit_s), "mip_rel_gap": _MIP_REL_GAP},
    )


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
            f"budget {lim} bits/weight cannot be met: the smallest possible is {mn} bits/weight (every layer in its smallest format)"
        )
    if budget.max_bytes is not None and budget.max_bytes < min_bytes:
        lim, mn = _shown(budget.max_bytes / BYTES_PER_MB, min_bytes / BYTES_PER_MB, 1)
        clauses.append(f"budget {lim} MB cannot be met: the smallest possible is {mn} MB (every layer in its smallest format)")
    if budget.max_latency_ms is not None:
        fastest = p.min_latency() + budget.fixed_latency_ms
        if fastest > budget.max_latency_ms * (1 + _LATENCY_RTOL):
            lim, mn = _shown(budget.max_latency_ms, fastest, 1)
            fixed = f" plus {budget.fixed_latency_ms:.1f} ms/token fixed" if budget.fixed_latency_ms else ""
            clauses.append(
                f"budget {lim} ms/token cannot be met: the fastest possible is {mn} ms/token (every layer in its fastest format{fixed})"
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
    size = " and ".join(
        ([f"{budget.max_bpw:.2f} bits/weight"] if budget.max_bpw is not None else [])
        + ([f"{budget.max_bytes / BYTES_PER_MB:.1f} MB"] if budget.max_bytes is not None else [])
    )
    message = f"budget {budget.describe()} cannot be met: each limit alone can ({'; '.join(minima)}), but not all at once"
    res = _solve(p, p.latency, bytes_cap, None, time_limit_s)
    if res.status == 0:
        within = float(p.latency @ np.round(res.x)) + budget.fixed_latency_ms
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
    Raises InfeasibleBudget when no plan meets the budget, naming the smallest limit that can be
    met; ValueError on malformed input; RuntimeError when HiGHS stops at time_limit_s without a
    proven optimum.
    """
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    if not _is_real(time_limit_s) or time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be a positive number, got {time_limit_s!r}")
    p = _problem(layers, choices)
    if budget.max_latency_ms is not None and p.latency is None:
        lacking = [p.names[l] for l in sorted({int(p.layer_of[i]) for i, c in enumerate(p.choices) if c.latency_ms is None})]
        raise ValueError(
            f"a latency budget needs latency_ms on every choice; layers {lacking[:5]}{' ...' if len(lacking) > 5 else ''} "
            "have choices without one (profile them, or drop max_latency_ms)"
        )

    clauses = _infeasible_alone(p, budget)
    if clauses:
        raise InfeasibleBudget("; ".join(clauses))

    bytes_cap = budget.bytes_cap(p.total_weights)
    latency_cap = None
    if budget.max_latency_ms is not None:
        latency_cap = budget.max_latency_ms * (1 + _LATENCY_RTOL) - budget.fixed_latency_ms
    res = _solve(p, p.sensitivity, bytes_cap, latency_cap, time_limit_s)
    if res.status == 2:
        # Both limits alone are feasible (checked above), so only their combination can fail;
        # with one limit the program is always feasible once its minimum fits.
        if bytes_cap is None or latency_cap is None:
            raise RuntimeError(f"the MILP solver calls a single feasible limit infeasible: {res.message}")
        raise InfeasibleBudget(_infeasible_jointly(p, budget, bytes_cap, time_limit_s))
    if res.status == 1:
        found = "" if res.x is None else f"; the best plan found so far is within {100 * res.mip_gap:.3g}% of optimal"
        raise RuntimeError(
            f"the solver stopped at its {time_limit_s:g} s time limit before proving an optimal plan for "
            f"{len(p.names)} layers x {len(p.choices)} candidates{found}; raise time_limit_s"
        )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"the MILP solver failed on a feasible budget (status {res.status}): {res.message}")
    return _plan_from_solution(p, budget, res.x, bytes_cap)


def _plan_from_solution(p: _Problem, budget: Budget, x: np.ndarray, bytes_cap: int | None) -> Plan:
    """Round the solver's x, check it is one candidate per layer within the budget, and recompute
    every total from the chosen candidates (never from the solver's objective)."""
    chosen = np.flatnonzero(np.round(x) == 1)  # [L] candidate indices, in layer order
    if len(chosen) != len(p.names) or not np.array_equal(p.layer_of[chosen], np.arange(len(p.names))):
        raise RuntimeError(f"the MILP solver returned a solution that does not pick exactly one format per layer: x = {x}")
    total_bytes = int(p.nbytes[chosen].sum())
    if bytes_cap is not None and total_bytes > bytes_cap:
        raise RuntimeError(f"the MILP solver returned {total_bytes} bytes for a budget of {bytes_cap} bytes")
    latency = None
    if p.latency is not None:
        latency = float(p.latency[chosen].sum()) + budget.fixed_latency_ms
        if budget.max_latency_ms is not None and latency > budget.max_latency_ms * (1 + _LATENCY_RTOL):
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

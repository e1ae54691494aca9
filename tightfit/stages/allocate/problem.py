"""The candidates of every layer flattened into one vector, as the MILP searches it.

Candidate i (of n = sum_l C_l) belongs to layer layer_of[i]; a solution picks one candidate per
layer, `chosen` [L], and `_plan` recomputes every total of the Plan from that pick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tightfit.stages.allocate.plan import Budget, LayerChoice, Plan, _is_int

# HiGHS's mip_feasibility_tolerance: the solver may overshoot a row by this much. The latency row
# ends this much early (see `milp._rows`); a plan never exceeds its latency limit by more than this
# many ms (a nanosecond). Bytes are integers and are checked exactly.
_LATENCY_TOL_MS = 1e-6


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

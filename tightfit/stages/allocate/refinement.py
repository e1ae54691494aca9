"""Refine a plan on the real objective: EvoPress from the MILP plan (layer errors are not additive),
keeping every limit of the budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tightfit.algorithms.evopress import EvolutionConfig, EvolutionResult, evolve
from tightfit.formats.registry import Format
from tightfit.stages.allocate.plan import LayerChoice, Plan
from tightfit.stages.allocate.problem import _LATENCY_TOL_MS, _plan, _problem

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

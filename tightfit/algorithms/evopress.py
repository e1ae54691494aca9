"""Evolutionary search over per-layer choices under a budget (EvoPress, Sieberling et al. 2024).

An additive model (sum of per-layer sensitivities, solved exactly by the MILP) ignores how layer
errors interact; EvoPress shows the sum can rank whole configurations wrongly. This search starts
from a feasible assignment (the MILP plan) and improves it on the real objective:

    parent <- start
    each generation:
        `offspring` children, each the parent after 1 .. max_switches level switches: one layer
        moves one level up (next larger candidate), another one level down, and the child must
        still fit every cap (children that do not are drawn again)
        selection in two steps: every child is scored cheaply (fitness level 0: few tokens), the
        best `survivors` are scored on the full set (level 1) and the best of them replaces the
        parent if it beats it there ((1 + lambda) elitism: the parent only ever improves)

Pure search: no model, no I/O. Fitness is a callable (assignment [L], level) -> float (lower is
better); results are cached per (assignment, level), so no configuration is scored twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

SCREEN, FULL = 0, 1  # fitness levels


@dataclass(frozen=True)
class EvolutionConfig:
    """generations: rounds of mutation and selection; offspring: children per round; survivors:
    children scored on the full set per round; max_switches: level switches per child (drawn
    uniformly from 1 .. max_switches); seed: of the random draws."""

    generations: int = 24
    offspring: int = 8
    survivors: int = 2
    max_switches: int = 3
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("generations", "offspring", "survivors", "max_switches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.survivors > self.offspring:
            raise ValueError(f"survivors ({self.survivors}) cannot exceed offspring ({self.offspring})")


@dataclass
class EvolutionResult:
    """best: choice index per layer [L]; fitness: its full-level fitness; start_fitness: the
    start's; history: the parent's full-level fitness after each generation; evaluations: how
    many configurations were scored at each level (screen, full)."""

    best: np.ndarray
    fitness: float
    start_fitness: float
    history: list[float] = field(default_factory=list)
    evaluations: tuple[int, int] = (0, 0)


class _Caps:
    """Sums of per-choice costs ([L] arrays of [C_l] costs) for an assignment, against caps."""

    def __init__(self, costs: Sequence[tuple[Sequence[np.ndarray], float]]) -> None:
        self.costs = [([np.asarray(c, dtype=np.float64) for c in per_layer], cap) for per_layer, cap in costs]

    def fits(self, assignment: np.ndarray) -> bool:
        return all(sum(per_layer[l][c] for l, c in enumerate(assignment)) <= cap for per_layer, cap in self.costs)


def _levels(nbytes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per layer, its choice indices from smallest to largest (ties: by index)."""
    return [np.argsort(np.asarray(b), kind="stable") for b in nbytes]


def mutate(parent: np.ndarray, levels: list[np.ndarray], switches: int, rng: np.random.Generator) -> np.ndarray:
    """The parent after `switches` level switches: each moves one layer one level up and another
    layer one level down (layers with a single choice never move)."""
    child = parent.copy()
    rank = [int(np.flatnonzero(levels[l] == c)[0]) for l, c in enumerate(child)]
    for _ in range(switches):
        can_up = [l for l in range(len(child)) if rank[l] < len(levels[l]) - 1]
        can_down = [l for l in range(len(child)) if rank[l] > 0]
        if not can_up or not can_down:
            break
        up = int(rng.choice(can_up))
        can_down = [l for l in can_down if l != up]
        if not can_down:
            break
        down = int(rng.choice(can_down))
        rank[up] += 1
        rank[down] -= 1
        child[up] = levels[up][rank[up]]
        child[down] = levels[down][rank[down]]
    return child


def evolve(
    start: np.ndarray,
    nbytes: Sequence[np.ndarray],
    fitness: Callable[[np.ndarray, int], float],
    config: EvolutionConfig,
    *,
    caps: Sequence[tuple[Sequence[np.ndarray], float]] = (),
    progress: bool = True,
) -> EvolutionResult:
    """Improve `start` (choice index per layer [L], within caps) on `fitness`.

    nbytes[l]: bytes of each of layer l's choices [C_l] (orders the levels); caps: pairs of
    (per-layer costs [L][C_l], limit) every child must meet, e.g. (nbytes, byte budget) and
    (latency, latency budget).
    """
    start = np.asarray(start, dtype=np.int64)
    if start.shape != (len(nbytes),):
        raise ValueError(f"start must hold one choice per layer ({len(nbytes)}), got shape {tuple(start.shape)}")
    limits = _Caps(caps)
    if not limits.fits(start):
        raise ValueError("the start assignment exceeds a cap")
    levels = _levels(nbytes)
    rng = np.random.default_rng(config.seed)
    cache: dict[tuple[bytes, int], float] = {}
    counts = [0, 0]

    def score(a: np.ndarray, level: int) -> float:
        key = (a.tobytes(), level)
        if key not in cache:
            cache[key] = float(fitness(a, level))
            counts[level] += 1
        return cache[key]

    parent, parent_fit = start, score(start, FULL)
    start_fit, history = parent_fit, []
    bar = tqdm(range(config.generations), desc="evolving plan", unit="gen", disable=not progress)
    for _ in bar:
        children: list[np.ndarray] = []
        seen = {parent.tobytes()}
        for _attempt in range(50 * config.offspring):
            if len(children) == config.offspring:
                break
            child = mutate(parent, levels, int(rng.integers(1, config.max_switches + 1)), rng)
            if child.tobytes() not in seen and limits.fits(child):
                seen.add(child.tobytes())
                children.append(child)
        if not children:
            break  # no feasible neighbour: the parent is a local optimum of this move set
        screened = sorted(children, key=lambda c: score(c, SCREEN))[: config.survivors]
        best = min(screened, key=lambda c: score(c, FULL))
        if score(best, FULL) < parent_fit:
            parent, parent_fit = best, score(best, FULL)
        history.append(parent_fit)
        bar.set_postfix(fitness=f"{parent_fit:.4g}")
    return EvolutionResult(best=parent, fitness=parent_fit, start_fitness=start_fit, history=history,
                           evaluations=(counts[SCREEN], counts[FULL]))

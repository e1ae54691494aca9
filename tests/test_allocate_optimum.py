"""Allocate stage: the integer program finds the brute-force optimum, respects every limit, is fast
enough for a whole model, and a sweep of growing budgets never gives a higher loss."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from allocate_problems import (
    HAND_CHOICES,
    HAND_LAYERS,
    SMALL_FORMATS,
    F,
    brute_force,
    check_plan,
    choice,
    model_like_problem,
    random_problem,
)

from tightfit.errors import InfeasibleBudget
from tightfit.stages.allocate import Budget, LayerChoice, Plan, allocate, pareto_sweep

# ---- optimality ---------------------------------------------------------------------------------


def test_hand_made_problem_known_optimum():
    # All w2g64 is 16352 bytes; 4 bits/weight allows 28672, i.e. 12320 more. Upgrades:
    # a->w8pc +6048 (gain 9.9), b->w4g128 +3840 (3.5) fit together (9888); c->w4g128 costs 7680
    # and a->w4g128 + b->w8pc costs 14016, so the optimum is a w8pc, b w4g128, c w2g64: loss 1.6.
    budget = Budget(max_bpw=4.0)
    plan = allocate(HAND_LAYERS, HAND_CHOICES, budget)
    assert plan.formats == {"a": F("w8pc"), "b": F("w4g128"), "c": F("w2g64")}
    assert plan.predicted_loss == pytest.approx(1.6)
    assert plan.total_bytes == 8384 + 8512 + 9344
    check_plan(plan, HAND_LAYERS, HAND_CHOICES, budget)
    assert brute_force(HAND_LAYERS, HAND_CHOICES, budget) == (pytest.approx(1.6), plan.formats)


def test_hand_made_problem_every_budget_matches_brute_force():
    for max_bytes in range(16352, 33536 + 8384 + 16768 + 1000, 997):
        budget = Budget(max_bytes=max_bytes)
        loss, formats = brute_force(HAND_LAYERS, HAND_CHOICES, budget)
        plan = allocate(HAND_LAYERS, HAND_CHOICES, budget)
        check_plan(plan, HAND_LAYERS, HAND_CHOICES, budget)
        assert plan.predicted_loss == pytest.approx(loss, rel=1e-6)
        assert plan.formats == formats  # random-free sensitivities here have no ties


def test_budget_exactly_at_a_plan_is_feasible():
    # 2.28125 bits/weight is exactly all-w2g64; a budget of exactly that must not be refused.
    plan = allocate(HAND_LAYERS, HAND_CHOICES, Budget(max_bpw=2.28125))
    assert set(plan.formats.values()) == {F("w2g64")}
    plan = allocate(HAND_LAYERS, HAND_CHOICES, Budget(max_bytes=16352))
    assert plan.total_bytes == 16352
    # w2pc-sym on [192, 320] is exactly 2.05 bits/weight (15744 bytes), but the float 2.05 is a
    # hair less: 2.05 * 61440 / 8 == 15743.99..., which floors one byte short.
    layers = {"x": (192, 320)}
    choices = {"x": [choice(F("w2pc-sym"), (192, 320), 1.0), choice(F("w4g64"), (192, 320), 0.1)]}
    assert math.floor(2.05 * 192 * 320 / 8) == 15743 and F("w2pc-sym").nbytes(192, 320).total == 15744
    assert allocate(layers, choices, Budget(max_bpw=2.05)).formats == {"x": F("w2pc-sym")}


@pytest.mark.parametrize("seed", range(5))
def test_random_size_budgets_match_brute_force(seed):
    layers, choices = random_problem(seed, n_layers=6, formats=SMALL_FORMATS)
    rng = np.random.default_rng(100 + seed)
    lo = sum(min(c.nbytes for c in cs) for cs in choices.values())
    hi = sum(max(c.nbytes for c in cs) for cs in choices.values())
    total_weights = sum(o * i for o, i in layers.values())
    budgets = [Budget(max_bytes=int(b)) for b in rng.integers(lo, hi + 1, size=4)]
    budgets += [Budget(max_bpw=float(b)) for b in rng.uniform(lo * 8 / total_weights, hi * 8 / total_weights, size=3)]
    for budget in budgets:
        loss, _ = brute_force(layers, choices, budget)
        plan = allocate(layers, choices, budget)
        check_plan(plan, layers, choices, budget)
        assert plan.predicted_loss == pytest.approx(loss, rel=1e-6), budget


@pytest.mark.parametrize("seed", range(5))
def test_random_size_and_latency_budgets_match_brute_force(seed):
    layers, choices = random_problem(seed, n_layers=6, formats=SMALL_FORMATS)
    rng = np.random.default_rng(200 + seed)
    lo = sum(min(c.nbytes for c in cs) for cs in choices.values())
    hi = sum(max(c.nbytes for c in cs) for cs in choices.values())
    fast = sum(min(c.latency_ms for c in cs) for cs in choices.values())
    slow = sum(max(c.latency_ms for c in cs) for cs in choices.values())
    n_infeasible = 0
    for _ in range(6):
        fixed = float(rng.uniform(0, 2))
        budget = Budget(
            max_bytes=int(rng.integers(lo, hi + 1)), max_latency_ms=float(rng.uniform(fast, slow)) + fixed, fixed_latency_ms=fixed
        )
        best = brute_force(layers, choices, budget)
        if best is None:  # each limit alone can be met, so only the combination fails
            n_infeasible += 1
            with pytest.raises(InfeasibleBudget, match="each limit alone can"):
                allocate(layers, choices, budget)
            continue
        plan = allocate(layers, choices, budget)
        check_plan(plan, layers, choices, budget)
        assert plan.predicted_loss == pytest.approx(best[0], rel=1e-6), budget
    assert n_infeasible < 6  # the test exercised the solver, not only the refusal


def test_equal_sensitivities_still_give_a_valid_plan():
    layers, choices = random_problem(7, n_layers=5, formats=SMALL_FORMATS)
    flat = {n: [LayerChoice(c.fmt, c.nbytes, 1.0, c.latency_ms) for c in cs] for n, cs in choices.items()}
    budget = Budget(max_bpw=4.0, max_latency_ms=100.0)
    plan = allocate(layers, flat, budget)
    check_plan(plan, layers, flat, budget)
    assert plan.predicted_loss == pytest.approx(5.0)


def test_single_candidate_layers():
    layers = {"a": (64, 64), "b": (64, 64)}
    choices = {
        "a": [choice(F("w4g64"), (64, 64), 0.3)],
        "b": [choice(F("w4g64"), (64, 64), 0.2), choice(F("w8pc"), (64, 64), 0.1)],
    }
    plan = allocate(layers, choices, Budget(max_bpw=8.5))
    assert plan.formats == {"a": F("w4g64"), "b": F("w8pc")}
    assert plan.predicted_latency_ms is None


# ---- speed --------------------------------------------------------------------------------------


def timed_allocate(layers, choices, budget) -> tuple[Plan, float]:
    start = time.perf_counter()
    plan = allocate(layers, choices, budget)
    return plan, time.perf_counter() - start


@pytest.mark.parametrize("n_layers", [30, 210])  # 30 layers; a 30-block model (7 linear layers each)
def test_solves_a_model_times_20_formats_under_2_seconds(n_layers):
    layers, choices = model_like_problem(n_layers)
    allocate(*model_like_problem(3, seed=1), Budget(max_bpw=4.0))  # warm-up: first-call costs are not solving
    for bpw in (2.5, 3.5, 4.5, 6.0):
        budget = Budget(max_bpw=bpw)
        plan, seconds = timed_allocate(layers, choices, budget)
        check_plan(plan, layers, choices, budget)
        assert seconds < 2.0, f"{n_layers} layers x 20 formats at {bpw} bits/weight took {seconds:.2f} s"
        assert bpw - 0.5 < plan.bits_per_weight <= bpw  # the size limit binds: the plan uses the room it has
    fast = sum(min(c.latency_ms for c in cs) for cs in choices.values())
    slow = sum(max(c.latency_ms for c in cs) for cs in choices.values())
    budget = Budget(max_bpw=3.5, max_latency_ms=0.5 * (fast + slow) + 1.0, fixed_latency_ms=1.0)
    plan, seconds = timed_allocate(layers, choices, budget)
    check_plan(plan, layers, choices, budget)
    assert seconds < 2.0, f"{n_layers} layers x 20 formats with a latency limit took {seconds:.2f} s"


@pytest.mark.parametrize("seed", range(3))
def test_pruning_before_branching_never_changes_the_optimum(seed, monkeypatch):
    import tightfit.stages.allocate.milp as milp

    layers, choices = model_like_problem(28, seed=seed)
    fast = sum(min(c.latency_ms for c in cs) for cs in choices.values())
    slow = sum(max(c.latency_ms for c in cs) for cs in choices.values())
    budgets = [Budget(max_bpw=b) for b in (2.6, 3.3, 4.2, 5.5)]
    budgets += [Budget(max_bpw=b, max_latency_ms=fast + f * (slow - fast)) for b, f in ((3.3, 0.3), (4.2, 0.2), (6.0, 0.4))]
    pruned = [allocate(layers, choices, b).predicted_loss for b in budgets]
    # Without an incumbent nothing is pruned and HiGHS branches over every candidate.
    monkeypatch.setattr(milp, "_incumbent", lambda *args: None)
    full = [allocate(layers, choices, b).predicted_loss for b in budgets]
    assert pruned == pytest.approx(full, rel=2e-6)


# ---- sweeps -------------------------------------------------------------------------------------


def test_more_budget_never_gives_higher_loss():
    layers, choices = model_like_problem(35, seed=3)
    bpws = [1.0, *np.linspace(2.2, 8.5, 15).tolist()]  # 1.0 cannot be met and is left out
    plans = pareto_sweep(layers, choices, [Budget(max_bpw=b) for b in bpws])
    assert [p.budget.max_bpw for p in plans] == bpws[1:]
    losses = [p.predicted_loss for p in plans]
    assert all(b <= a + 1e-6 * abs(a) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]
    for p in plans:
        assert p.bits_per_weight <= p.budget.max_bpw

    fast = sum(min(c.latency_ms for c in cs) for cs in choices.values())
    slow = sum(max(c.latency_ms for c in cs) for cs in choices.values())
    plans = pareto_sweep(layers, choices, [Budget(max_bpw=4.0, max_latency_ms=t) for t in np.linspace(fast, slow, 8)])
    losses = [p.predicted_loss for p in plans]
    assert len(plans) >= 4
    assert all(b <= a + 1e-6 * abs(a) for a, b in zip(losses, losses[1:])), losses

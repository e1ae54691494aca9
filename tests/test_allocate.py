"""Allocate stage: the integer program finds the brute-force optimum, respects every limit, names
the smallest feasible budget when none fits, and is fast enough for a whole model."""

from __future__ import annotations

import itertools
import json
import math
import re
import time

import numpy as np
import pytest

from tightfit.artifacts import FP16
from tightfit.errors import FormatError, InfeasibleBudget, TightfitError
from tightfit.formats import QuantFormat
from tightfit.stages.allocate import Budget, LayerChoice, Plan, allocate, pareto_sweep

F = QuantFormat.parse
SMALL_FORMATS = [F("w2g64"), F("w3g64"), F("w4g128"), F("w8pc")]
# 20 real formats: every bit width x (g32, g64, g128, per channel), less four nobody would pick.
MANY_FORMATS = [
    QuantFormat(bits=b, group_size=g)
    for b in (2, 3, 4, 5, 6, 8)
    for g in (32, 64, 128, None)
    if (b, g) not in {(2, None), (3, None), (6, 32), (8, 32)}
]
assert len(MANY_FORMATS) == 20


def choice(fmt: QuantFormat, shape: tuple[int, int], sensitivity: float, latency_ms: float | None = None) -> LayerChoice:
    return LayerChoice(fmt=fmt, nbytes=fmt.nbytes(*shape).total, sensitivity=sensitivity, latency_ms=latency_ms)


def shown_up(value: float, decimals: int) -> str:
    """value rounded up to `decimals`: the smallest budget of that precision that can be met."""
    return f"{math.ceil(value * 10**decimals - 1e-9) / 10**decimals:.{decimals}f}"


def brute_force(layers, choices, budget: Budget):
    """(loss, formats) of the best assignment meeting the budget by enumeration, or None."""
    names = list(layers)
    total_weights = sum(o * i for o, i in layers.values())
    best = None
    for combo in itertools.product(*(choices[n] for n in names)):
        total_bytes = sum(c.nbytes for c in combo)
        if budget.max_bytes is not None and total_bytes + budget.fixed_bytes > budget.max_bytes:
            continue
        if budget.max_bpw is not None and total_bytes * 8 > budget.max_bpw * total_weights:
            continue
        latency = sum(c.latency_ms or 0.0 for c in combo) + budget.fixed_latency_ms
        if budget.max_latency_ms is not None and latency > budget.max_latency_ms:
            continue
        loss = sum(c.sensitivity for c in combo)
        if best is None or loss < best[0]:
            best = (loss, {n: c.fmt for n, c in zip(names, combo)})
    return best


def check_plan(plan: Plan, layers, choices, budget: Budget) -> None:
    """The plan picks one listed candidate per layer, meets the budget and reports its own totals."""
    assert list(plan.formats) == list(layers)
    picked = []
    for name, fmt in plan.formats.items():
        matches = [c for c in choices[name] if c.fmt == fmt]
        assert len(matches) == 1, (name, fmt)
        picked.append(matches[0])
    total_weights = sum(o * i for o, i in layers.values())
    assert plan.total_weights == total_weights
    assert plan.total_bytes == sum(c.nbytes for c in picked)
    assert plan.bits_per_weight == pytest.approx(plan.total_bytes * 8 / total_weights, rel=1e-12)
    assert plan.predicted_loss == pytest.approx(sum(c.sensitivity for c in picked), rel=1e-12, abs=1e-12)
    if all(c.latency_ms is not None for cs in choices.values() for c in cs):
        latency = sum(c.latency_ms for c in picked) + budget.fixed_latency_ms
        assert plan.predicted_latency_ms == pytest.approx(latency, rel=1e-12)
    else:
        assert plan.predicted_latency_ms is None
    if budget.max_bytes is not None:
        assert plan.total_bytes <= budget.max_bytes
    if budget.max_bpw is not None:
        assert plan.total_bytes * 8 <= budget.max_bpw * total_weights
    if budget.max_latency_ms is not None:
        assert plan.predicted_latency_ms <= budget.max_latency_ms + 1e-6
    assert plan.budget == budget


def random_problem(seed: int, n_layers: int, formats: list[QuantFormat]):
    """Random shapes, sensitivities and latencies; no structure the solver could lean on."""
    rng = np.random.default_rng(seed)
    layers = {f"l{i}": (64 * int(rng.integers(1, 9)), 64 * int(rng.integers(1, 9))) for i in range(n_layers)}
    choices = {
        name: [choice(f, shape, float(rng.uniform(0, 10)), float(rng.uniform(0.1, 1.0))) for f in formats]
        for name, shape in layers.items()
    }
    return layers, choices


def model_like_problem(n_layers: int, seed: int = 0):
    """SmolLM2-135M-like linear layers (hidden 576, intermediate 1536, 3 kv heads of 64), cycled
    7 per block, with sensitivities falling ~4x per bit and latencies that track bytes."""
    rng = np.random.default_rng(seed)
    block = {
        "q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
        "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536),
    }
    layers = {}
    for i in range(n_layers):
        kind = list(block)[i % 7]
        layers[f"model.layers.{i // 7}.{kind}"] = block[kind]
    choices = {}
    for name, shape in layers.items():
        weight = rng.lognormal(0, 1)
        cands = []
        for f in MANY_FORMATS:
            group_penalty = 1.0 if f.group_size is None else 1 - 0.1 * (128 // f.group_size)
            sens = weight * 4.0 ** (-f.bits) * (1 + group_penalty) * rng.lognormal(0, 0.1)
            nbytes = f.nbytes(*shape).total
            latency = (0.002 + nbytes / 2e8) * rng.lognormal(0, 0.2)  # ms: ~200 GB/s plus launch cost
            cands.append(LayerChoice(fmt=f, nbytes=nbytes, sensitivity=float(sens), latency_ms=float(latency)))
        choices[name] = cands
    return layers, choices


# ---- optimality ---------------------------------------------------------------------------------

HAND_LAYERS = {"a": (64, 128), "b": (128, 128), "c": (256, 128)}  # W = 57344 weights
HAND_SENS = {"a": (10.0, 1.0, 0.1), "b": (4.0, 0.5, 0.05), "c": (1.0, 0.2, 0.02)}  # w2g64, w4g128, w8pc
HAND_CHOICES = {
    name: [choice(F(f), HAND_LAYERS[name], s) for f, s in zip(("w2g64", "w4g128", "w8pc"), HAND_SENS[name])]
    for name in HAND_LAYERS
}


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


# ---- infeasible budgets -------------------------------------------------------------------------


def test_infeasible_bpw_names_the_smallest_possible():
    layers, choices = model_like_problem(14)
    total_weights = sum(o * i for o, i in layers.values())
    smallest = sum(min(c.nbytes for c in cs) for cs in choices.values()) * 8 / total_weights
    with pytest.raises(InfeasibleBudget) as info:
        allocate(layers, choices, Budget(max_bpw=1.5))
    message = str(info.value)
    assert "\n" not in message
    assert f"budget 1.50 bits/weight cannot be met: the smallest possible is {shown_up(smallest, 2)} bits/weight" in message
    # The number shown is itself a budget that can be met, and barely: 0.01 less cannot.
    shown = float(re.search(r"smallest possible is ([0-9.]+) bits/weight", message)[1])
    assert smallest <= shown < smallest + 0.01
    assert allocate(layers, choices, Budget(max_bpw=shown)).bits_per_weight <= shown
    with pytest.raises(InfeasibleBudget):
        allocate(layers, choices, Budget(max_bpw=shown - 0.01))


def test_hand_made_bpw_minimum_rounds_up():
    # All w2g64 is 2.28125 bits/weight: 2.28 cannot be met, so the smallest shown is 2.29.
    expected = r"^budget 2\.28 bits/weight cannot be met: the smallest possible is 2\.29 bits/weight"
    with pytest.raises(InfeasibleBudget, match=expected):
        allocate(HAND_LAYERS, HAND_CHOICES, Budget(max_bpw=2.28))


def test_infeasible_bytes_names_the_smallest_possible_in_mb():
    layers, choices = model_like_problem(21)
    smallest = sum(min(c.nbytes for c in cs) for cs in choices.values())
    expected = rf"budget 1\.0 MB cannot be met: the smallest possible is {shown_up(smallest / 1e6, 1)} MB"
    with pytest.raises(InfeasibleBudget, match=expected):
        allocate(layers, choices, Budget(max_bytes=1_000_000))


def test_infeasible_latency_names_the_fastest_possible():
    layers, choices = model_like_problem(21)
    fastest = sum(min(c.latency_ms for c in cs) for cs in choices.values()) + 3.0
    with pytest.raises(InfeasibleBudget) as info:
        allocate(layers, choices, Budget(max_latency_ms=3.02, fixed_latency_ms=3.0))
    message = str(info.value)
    assert f"the fastest possible is {shown_up(fastest, 1)} ms/token" in message
    assert "plus 3.0 ms/token fixed" in message
    # A latency budget below the fixed part alone cannot be met either.
    with pytest.raises(InfeasibleBudget, match=r"budget 2\.0 ms/token cannot be met"):
        allocate(layers, choices, Budget(max_latency_ms=2.0, fixed_latency_ms=3.0))


def test_two_infeasible_limits_are_both_named_on_one_line():
    layers, choices = model_like_problem(7)
    with pytest.raises(InfeasibleBudget) as info:
        allocate(layers, choices, Budget(max_bpw=1.0, max_latency_ms=0.001))
    message = str(info.value)
    assert "\n" not in message
    assert "budget 1.00 bits/weight cannot be met" in message and "ms/token cannot be met" in message


def test_jointly_infeasible_names_both_minima():
    # Small formats are slow here, fast ones big: each limit alone can be met, both cannot.
    layers = {"a": (128, 128), "b": (128, 128)}
    lat = {"w2g64": 5.0, "w4g128": 3.0, "w8pc": 1.0}
    choices = {n: [choice(F(f), layers[n], s, lat[f]) for f, s in zip(lat, (3.0, 2.0, 1.0))] for n in layers}
    budget = Budget(max_bpw=3.0, max_latency_ms=4.5, fixed_latency_ms=0.5)
    # Independent minima: all w2g64 is 2.28125 bits/weight, all w8pc 0.5 + 2 x 1.0 ms. Within
    # 3 bits/weight (12288 bytes) no layer may leave w2g64 (4672 + 8512 = 13184), so the
    # fastest plan that fits is all w2g64: 0.5 + 2 x 5.0 ms.
    assert brute_force(layers, choices, budget) is None
    assert brute_force(layers, choices, Budget(max_bpw=3.0, max_latency_ms=10.5, fixed_latency_ms=0.5)) is not None
    with pytest.raises(InfeasibleBudget) as info:
        allocate(layers, choices, budget)
    message = str(info.value)
    assert message.startswith("budget ≤ 3.00 bits/weight, ≤ 4.5 ms/token cannot be met: each limit alone can")
    assert "the smallest possible is 2.29 bits/weight" in message
    assert "the fastest possible is 2.5 ms/token" in message
    assert message.endswith("within 3.00 bits/weight the fastest possible is 10.5 ms/token")
    assert "\n" not in message
    assert isinstance(info.value, TightfitError)


# ---- budgets, input checks, JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "at least one of max_bytes, max_bpw, max_latency_ms"),
        ({"max_bytes": 0}, "max_bytes must be a positive integer"),
        ({"max_bytes": 1.5e6}, "max_bytes must be a positive integer"),
        ({"max_bpw": -1.0}, "max_bpw must be a positive finite number"),
        ({"max_bpw": float("nan")}, "max_bpw must be a positive finite number"),
        ({"max_latency_ms": 0.0}, "max_latency_ms must be a positive finite number"),
        ({"max_latency_ms": float("inf")}, "max_latency_ms must be a positive finite number"),
        ({"max_bpw": 4.0, "fixed_latency_ms": -1.0}, "fixed_latency_ms must be a finite number >= 0"),
        ({"fixed_latency_ms": 1.0}, "at least one of"),
        ({"max_bytes": 10, "fixed_bytes": -1}, "fixed_bytes must be an integer >= 0"),
    ],
)
def test_budget_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_budget_describe():
    assert Budget(max_bpw=3.0, max_bytes=60_000_000).describe() == "≤ 3.00 bits/weight, ≤ 60.0 MB"
    assert Budget(max_latency_ms=12.0).describe() == "≤ 12.0 ms/token"


def test_latency_budget_needs_latency_on_every_choice():
    with pytest.raises(ValueError, match=r"latency budget needs latency_ms on every choice; layers \['a', 'b', 'c'\]"):
        allocate(HAND_LAYERS, HAND_CHOICES, Budget(max_latency_ms=10.0))


@pytest.mark.parametrize(
    "layers, choices, match",
    [
        ({}, {}, "no layers"),
        ({"a": (64, 128)}, {"b": HAND_CHOICES["a"]}, r"no choices for \['a'\], choices for unknown layers \['b'\]"),
        ({"a": (64, 128)}, {"a": []}, "layer 'a' has no candidate formats"),
        ({"a": (64, 128)}, {"a": HAND_CHOICES["a"] + HAND_CHOICES["a"][:1]}, r"format\(s\) \['w2g64'\] more than once"),
        ({"a": (64, 0)}, {"a": HAND_CHOICES["a"]}, "shape must be"),
    ],
)
def test_malformed_input_is_refused(layers, choices, match):
    with pytest.raises(ValueError, match=match):
        allocate(layers, choices, Budget(max_bpw=4.0))


def test_layer_choice_validation():
    with pytest.raises(ValueError, match="nbytes must be a positive integer"):
        LayerChoice(F("w4g128"), 0, 1.0)
    with pytest.raises(ValueError, match="sensitivity must be a finite number"):
        LayerChoice(F("w4g128"), 10, float("nan"))
    with pytest.raises(ValueError, match="latency_ms must be a finite number >= 0"):
        LayerChoice(F("w4g128"), 10, 1.0, -0.1)
    with pytest.raises(ValueError, match="must be a quantization format or fp16"):
        LayerChoice("w4g128", 10, 1.0)
    with pytest.raises(ValueError, match="time_limit_s must be a positive number"):
        allocate(HAND_LAYERS, HAND_CHOICES, Budget(max_bpw=4.0), time_limit_s=0)


def test_plan_json_round_trip():
    layers, choices = model_like_problem(14)
    plan = allocate(layers, choices, Budget(max_bpw=4.0, max_latency_ms=1.0, fixed_latency_ms=0.25))
    d = json.loads(json.dumps(plan.to_json()))
    assert d["version"] == 2 and d["formats"]["model.layers.0.q"] == plan.formats["model.layers.0.q"].name
    again = Plan.from_json(d)
    assert again == plan
    assert list(again.formats) == list(plan.formats)
    with pytest.raises(ValueError, match="plan JSON has version 1; this tightfit reads version 2"):
        Plan.from_json({**d, "version": 1})
    with pytest.raises(ValueError, match=r"missing \['total_bytes'\]"):
        Plan.from_json({k: v for k, v in d.items() if k != "total_bytes"})
    with pytest.raises(ValueError, match="plan totals must be positive integers"):
        Plan.from_json({**d, "total_bytes": 1.5})
    with pytest.raises(FormatError, match="cannot parse quantization format 'w9'"):
        Plan.from_json({**d, "formats": {"model.layers.0.q": "w9"}})
    with pytest.raises(ValueError, match=r"budget JSON keys differ.*unknown \['max_tokens'\]"):
        Plan.from_json({**d, "budget": {**d["budget"], "max_tokens": 3}})


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


# ---- embeddings and fixed bytes -----------------------------------------------------------------


def embedding_problem():
    """Two linear layers and a tied embedding [512, 64] whose candidates are fp16 or w8/w4."""
    layers, choices = {"a": (128, 128), "b": (128, 128)}, {}
    for n, s in (("a", 1.0), ("b", 3.0)):
        choices[n] = [choice(F("w2g64"), layers[n], 4.0 * s), choice(F("w4g128"), layers[n], s)]
    layers["model.embed_tokens"] = (512, 64)
    choices["model.embed_tokens"] = [LayerChoice(FP16, FP16.nbytes(512, 64).total, 0.0),
                                     choice(F("w8g32-sym"), (512, 64), 0.1), choice(F("w4g32-sym"), (512, 64), 5.0)]
    return layers, choices


def test_a_plan_chooses_fp16_or_a_format_for_the_embeddings_and_round_trips():
    layers, choices = embedding_problem()
    assert FP16.nbytes(512, 64).total == 2 * 512 * 64
    roomy = allocate(layers, choices, Budget(max_bytes=10**6))
    assert roomy.formats["model.embed_tokens"] == FP16 and roomy.quantized == {n: F("w4g128") for n in ("a", "b")}
    tight = allocate(layers, choices, Budget(max_bpw=6.0))
    assert tight.formats["model.embed_tokens"] == F("w8g32-sym")
    for plan in (roomy, tight):
        check_plan(plan, layers, choices, plan.budget)
        d = json.loads(json.dumps(plan.to_json()))
        assert Plan.from_json(d) == plan
    assert json.loads(json.dumps(roomy.to_json()))["formats"]["model.embed_tokens"] == "fp16"


def test_fixed_bytes_count_against_max_bytes_and_name_the_whole_size():
    layers, choices = embedding_problem()
    smallest = sum(min(c.nbytes for c in cs) for cs in choices.values())
    fixed = 1_500_000  # e.g. the norms and header of a packed file
    plan = allocate(layers, choices, Budget(max_bytes=smallest + fixed, fixed_bytes=fixed))
    assert plan.total_bytes == smallest and plan.budget.fixed_bytes == fixed
    assert brute_force(layers, choices, plan.budget)[0] == pytest.approx(plan.predicted_loss)
    with pytest.raises(InfeasibleBudget) as info:
        allocate(layers, choices, Budget(max_bytes=smallest + fixed - 1, fixed_bytes=fixed))
    message = str(info.value)
    assert "\n" not in message and "cannot be met: the smallest possible is" in message
    assert f"the smallest possible is {shown_up((smallest + fixed) / 1e6, 1)} MB" in message and "plus 1.5 MB outside the plan" in message


def test_solver_chatter_on_c_stdout_is_hidden_during_the_solve(capfd):
    """HiGHS writes debugging lines straight to file descriptor 1 (not sys.stdout) during some MIP solves."""
    import os

    from tightfit.stages.allocate.milp import _solver_chatter_hidden

    print("before", flush=True)
    with _solver_chatter_hidden():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"

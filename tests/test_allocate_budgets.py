"""Allocate stage: a budget that cannot be met names the smallest feasible one; budgets, candidates
and plans are checked on input and round-trip through JSON; embeddings (fp16 or a format) and bytes
outside the plan count against the budget; the solver's C-level chatter is hidden."""

from __future__ import annotations

import json
import re

import pytest
from allocate_problems import HAND_CHOICES, HAND_LAYERS, F, brute_force, check_plan, choice, model_like_problem, shown_up

from tightfit.artifacts import FP16
from tightfit.errors import FormatError, InfeasibleBudget, TightfitError
from tightfit.stages.allocate import Budget, LayerChoice, Plan, allocate

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

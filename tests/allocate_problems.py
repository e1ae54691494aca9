"""Allocation problems for the allocate-stage tests (test_allocate_optimum.py, test_allocate_budgets.py):
hand-made, random and model-like layers with their candidates, the brute-force optimum, and the
checks every plan must pass."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tightfit.formats import QuantFormat
from tightfit.stages.allocate import Budget, LayerChoice, Plan

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


HAND_LAYERS = {"a": (64, 128), "b": (128, 128), "c": (256, 128)}  # W = 57344 weights
HAND_SENS = {"a": (10.0, 1.0, 0.1), "b": (4.0, 0.5, 0.05), "c": (1.0, 0.2, 0.02)}  # w2g64, w4g128, w8pc
HAND_CHOICES = {
    name: [choice(F(f), HAND_LAYERS[name], s) for f, s in zip(("w2g64", "w4g128", "w8pc"), HAND_SENS[name])]
    for name in HAND_LAYERS
}

"""EvoPress refinement: the search (pure), the allocate stage's `refine`, and PlanLoss on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tightfit.algorithms import gptq_quantize
from tightfit.algorithms.evopress import FULL, SCREEN, EvolutionConfig, evolve, mutate
from tightfit.artifacts import CalibrationConfig
from tightfit.formats.registry import parse_format
from tightfit.model import get_module, load_model
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages.allocate import Budget, LayerChoice, Refinement, allocate, refine
from tightfit.stages.sensitivity import PlanLoss

# ---- the search ---------------------------------------------------------------------------------

L, C = 12, 3
NBYTES = [np.array([100, 150, 200]) * (1 + l % 3) for l in range(L)]  # three layer sizes
SENS = [np.array([4.0, 2.0, 1.0]) * (1 + (l * 7) % 5) for l in range(L)]


def interacting_loss(a: np.ndarray) -> float:
    """Additive part plus a penalty when neighbouring layers are both at their lowest level: the
    additive optimum is not the real one."""
    base = sum(SENS[l][c] for l, c in enumerate(a))
    return base + sum(6.0 for l in range(L - 1) if a[l] == 0 and a[l + 1] == 0)


def test_mutate_moves_one_level_up_and_one_down_per_switch():
    levels = [np.argsort(b) for b in NBYTES]
    rng = np.random.default_rng(0)
    parent = np.ones(L, dtype=np.int64)
    for switches in (1, 2, 3):
        for _ in range(50):
            child = mutate(parent, levels, switches, rng)
            diff = child - parent
            assert np.abs(diff).max() <= switches and diff.sum() == 0
            assert ((child >= 0) & (child < C)).all()
    single = [np.array([0])] + levels[1:]
    child = mutate(np.array([0] + [1] * (L - 1)), single, 3, np.random.default_rng(1))
    assert child[0] == 0, "a layer with one choice never moves"


def test_evolve_improves_a_non_additive_objective_within_the_cap_and_caches():
    cap = sum(b[1] for b in NBYTES)
    # the additive optimum under the cap (greedy is exact enough here): start from all level 1
    start = np.ones(L, dtype=np.int64)
    calls = {SCREEN: 0, FULL: 0}

    def fitness(a, level):
        calls[level] += 1
        return interacting_loss(a) + (0.01 if level == SCREEN else 0.0)

    cfg = EvolutionConfig(generations=40, offspring=8, survivors=2, seed=3)
    result = evolve(start, NBYTES, fitness, cfg, caps=[(NBYTES, cap)], progress=False)
    assert result.start_fitness == interacting_loss(start)
    assert result.fitness == interacting_loss(result.best) < result.start_fitness
    assert sum(NBYTES[l][c] for l, c in enumerate(result.best)) <= cap
    assert all(b >= a for a, b in zip(result.history[1:], result.history[:-1])), "the parent only ever improves"
    assert result.evaluations == (calls[SCREEN], calls[FULL]), "every configuration is scored once per level"
    again = evolve(start, NBYTES, fitness, cfg, caps=[(NBYTES, cap)], progress=False)
    assert (again.best == result.best).all(), "same seed, same search"


def test_evolve_refuses_a_start_over_the_cap_and_bad_configs():
    with pytest.raises(ValueError, match="exceeds a cap"):
        evolve(np.full(L, 2), NBYTES, lambda a, _: 0.0, EvolutionConfig(), caps=[(NBYTES, 10)], progress=False)
    with pytest.raises(ValueError, match="one choice per layer"):
        evolve(np.ones(3), NBYTES, lambda a, _: 0.0, EvolutionConfig(), progress=False)
    with pytest.raises(ValueError, match="survivors"):
        EvolutionConfig(offspring=2, survivors=3)
    with pytest.raises(ValueError, match="generations"):
        EvolutionConfig(generations=0)


# ---- the allocate stage's refine -----------------------------------------------------------------

FMTS = [parse_format(f) for f in ("w2g32", "w3g64", "w4g64")]


def _choices(with_latency: bool):
    layers = {f"l{l}": (64 * (1 + l % 3), 128) for l in range(L)}
    choices = {
        name: [LayerChoice(fmt=f, nbytes=f.nbytes(*shape).total, sensitivity=float(SENS[l][c]),
                           latency_ms=(0.01 * (c + 1) * (1 + l % 3)) if with_latency else None)
               for c, f in enumerate(FMTS)]
        for l, (name, shape) in enumerate(layers.items())
    }
    return layers, choices


@pytest.mark.parametrize("with_latency", [False, True])
def test_refine_keeps_every_limit_and_never_loses_to_the_milp_plan(with_latency):
    layers, choices = _choices(with_latency)
    budget = Budget(max_bpw=3.0, max_latency_ms=0.5 if with_latency else None, fixed_latency_ms=0.1 if with_latency else 0.0)
    plan = allocate(layers, choices, budget)
    index = {f: c for c, f in enumerate(FMTS)}

    def fitness(formats, level):
        return interacting_loss(np.array([index[formats[n]] for n in layers]))

    result = refine(plan, layers, choices, fitness, EvolutionConfig(generations=30, seed=1), progress=False)
    assert result.start_loss == fitness(plan.formats, 1)
    assert result.loss == fitness(result.plan.formats, 1) <= result.start_loss
    assert result.plan.bits_per_weight <= 3.0 and result.plan.total_bytes <= plan.budget.bytes_cap(plan.total_weights)
    if with_latency:
        assert result.plan.predicted_latency_ms <= 0.5 + 1e-9
    again = Refinement.from_json(json.loads(json.dumps(result.to_json())))
    assert again.plan.formats == result.plan.formats and again.loss == result.loss and again.history == result.history


def test_refine_rejects_a_plan_for_other_layers():
    layers, choices = _choices(False)
    plan = allocate(layers, choices, Budget(max_bpw=3.0))
    other = {f"x{n}": s for n, s in layers.items()}
    with pytest.raises(ValueError, match="different layers"):
        refine(plan, other, {f"x{n}": c for n, c in choices.items()}, lambda f, l: 0.0, progress=False)


# ---- PlanLoss on a tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    config = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64, batch_size=4)
    cal = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=11, seq_len=64))
    hessians = calibrate_stage.collect_hessians(loaded, calibrate_stage.CalibrationSet(config=config, tokens=cal.tokens[:8]),
                                                progress=False)
    return loaded, hessians, cal.tokens[8:]


def _plain_kl(loaded, hessians, windows, formats) -> float:
    """KL of the plan by brute force: every layer quantized, one plain forward."""
    model = loaded.model
    saved = {n: get_module(model, n).weight.data.clone() for n in formats}
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        for n, f in formats.items():
            get_module(model, n).weight.data.copy_(gptq_quantize(saved[n], hessians.hessians[n], f).quantized.dequantize())
        logq = F.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        for n, w in saved.items():
            get_module(model, n).weight.data.copy_(w)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_plan_loss_equals_the_plain_kl_with_and_without_the_anchor(tiny):
    loaded, hessians, windows = tiny
    names = list(hessians.hessians)
    w2, w4 = parse_format("w2g32"), parse_format("w4g64")
    plan_a = {n: w4 for n in names}
    plan_b = dict(plan_a)
    late = [n for n in names if f"{loaded.arch.blocks}.1." in n]  # only block 1 differs: block 0 is replayed
    plan_b.update({n: w2 for n in late})
    originals = {n: get_module(loaded.model, n).weight.data.clone() for n in names}
    with PlanLoss(loaded, hessians, windows, screen_windows=1) as pl:
        a = pl.loss(plan_a, 1)
        assert pl._first_changed_block(plan_b) == 1
        b = pl.loss(plan_b, 1)
        b_screen = pl.loss(plan_b, 0)
        assert pl.loss(plan_a, 1) == a, "the anchor's own loss"
        pl.reset_anchor()
        assert pl.loss(plan_b, 1) == pytest.approx(b, rel=1e-5)
        assert pl.loss(plan_b, 1) == pl.loss(plan_b, 1)  # plan_b is now the anchor: no blocks run
        assert pl.loss(plan_b, 0) == pytest.approx(b_screen, rel=1e-5), "screen level from the anchor's last output"
    for n in names:
        assert torch.equal(get_module(loaded.model, n).weight.data, originals[n]), "weights restored on exit"
    assert a == pytest.approx(_plain_kl(loaded, hessians, windows, plan_a), rel=1e-4, abs=1e-8)
    assert b == pytest.approx(_plain_kl(loaded, hessians, windows, plan_b), rel=1e-4, abs=1e-8)
    assert b_screen == pytest.approx(_plain_kl(loaded, hessians, windows[:1], plan_b), rel=1e-4, abs=1e-8)
    assert b > a > 0


def test_plan_command_refines_and_caches_the_refinement(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from tightfit.cli import main

    args = ["plan", str(tiny_model_dir), "--bpw", "3.4", "--candidates", "w2g32,w3g64,w4g64", "--calib-text", str(tiny_text_file),
            "--calib-samples", "8", "--calib-len", "64", "--work", str(tmp_path / "work"), "--refine", "3",
            "--refine-windows", "2", "--out", str(tmp_path / "plan.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "refined (EvoPress, 3 generations" in printed
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["bits_per_weight"] <= 3.4
    cache = tmp_path / "work" / "refined.json"
    before = cache.stat().st_mtime_ns
    assert main(args) == 0
    assert cache.stat().st_mtime_ns == before, "the same refinement is read back, not searched again"
    assert json.loads((tmp_path / "plan.json").read_text())["formats"] == plan["formats"]
    assert main([*args[:-4], "--refine", "-1", "--out", str(tmp_path / "p.json")]) == 2
    assert "--refine must be 0" in capsys.readouterr().err

"""Sensitivity stage and the planner end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tightfit.algorithms import gptq_quantize
from tightfit.artifacts import CalibrationConfig
from tightfit.cli import main
from tightfit.formats.registry import parse_format
from tightfit.model import get_module, load_model
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages.sensitivity import SensitivityTable, measure_sensitivity


@pytest.fixture(scope="module")
def measured(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    cal = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=10, seq_len=64, batch_size=5))
    calibration = calibrate_stage.CalibrationSet(config=CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64, batch_size=4),
                                                 tokens=cal.tokens[:8])
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    formats = [parse_format("w2g32"), parse_format("w4g64")]
    table = measure_sensitivity(loaded, hessians, formats, cal.tokens[8:], progress=False)
    return loaded, hessians, cal.tokens[8:], table


def test_measured_damage_is_the_kl_of_the_model_with_one_layer_quantized(measured):
    """The replayed-prefix measurement equals a plain full forward with that one layer quantized."""
    loaded, hessians, slice_tokens, table = measured
    model = loaded.model
    name = f"{loaded.arch.blocks}.1.mlp.down_proj"  # block 1: blocks before it are replayed
    linear = get_module(model, name)
    original = linear.weight.data.clone()
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=slice_tokens).logits[:, :-1], -1)
        q = gptq_quantize(original, hessians.hessians[name], parse_format("w2g32")).quantized
        linear.weight.data.copy_(q.dequantize())
        logq = F.log_softmax(model(input_ids=slice_tokens).logits[:, :-1], -1)
        linear.weight.data.copy_(original)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert kl > 0
    assert table.measured[name]["w2g32"] == pytest.approx(kl, rel=1e-3, abs=1e-7)


def test_fewer_bits_do_more_damage_and_table_round_trips(measured):
    _, _, slice_tokens, table = measured
    layers = list(table.shapes)
    worse = sum(table.measured[l]["w2g32"] > table.measured[l]["w4g64"] for l in layers)
    assert worse >= 0.8 * len(layers)
    assert all(table.proxy[l]["w2g32"] > table.proxy[l]["w4g64"] for l in layers)
    assert table.slice_tokens == slice_tokens.shape[0] * (slice_tokens.shape[1] - 1)
    again = SensitivityTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.measured == table.measured and again.formats == table.formats
    assert set(table.rank_agreement()) == {"w2g32", "w4g64"}


def test_plan_then_compress_with_the_plan(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    common = ["--candidates", "w2g32,w4g64", "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64",
              "--work", str(tmp_path / "work")]
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(tiny_model_dir), "--bpw", "3.4", "--out", str(plan_file), *common]) == 0
    printed = capsys.readouterr().out
    assert "plan for" in printed and "Spearman" in printed
    plan = json.loads(plan_file.read_text())
    formats = set(plan["formats"].values())
    assert formats == {"w2g32", "w4g64"}, "3.4 bits/weight lies between the candidates: the plan must mix them"
    assert plan["bits_per_weight"] <= 3.4

    # cached measurements: a second budget is solved without re-measuring (the work folder is reused)
    before = (tmp_path / "work" / "sensitivity.json").stat().st_mtime_ns
    assert main(["plan", str(tiny_model_dir), "--bpw", "4.0", "--out", str(tmp_path / "p2.json"), *common]) == 0
    assert (tmp_path / "work" / "sensitivity.json").stat().st_mtime_ns == before

    out = tmp_path / "mixed"
    assert main(["compress", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out), "--no-eval",
                 "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["format"] for k, v in manifest["layers"].items()} == plan["formats"]
    assert manifest["summary"]["bits_per_weight"] == pytest.approx(plan["bits_per_weight"])


def test_impossible_budget_states_the_smallest_feasible(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    rc = main(["plan", str(tiny_model_dir), "--bpw", "1.0", "--out", str(tmp_path / "p.json"), "--candidates", "w2g32,w4g64",
               "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64", "--slice-windows", "0",
               "--work", str(tmp_path / "work")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tightfit: error:") and "2.57" in err  # w2g32 everywhere: 2 + 18/32 = 2.5625, shown rounded up

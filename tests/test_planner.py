"""The sensitivity stage's measured method, and the planner end to end on a tiny model: plan, compress
with the plan, --max-size over the whole file, embeddings in the plan, SpQR candidates, clean errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tightfit.algorithms import gptq_quantize_many
from tightfit.artifacts import CalibrationConfig
from tightfit.cli import main
from tightfit.formats.packed import TENSORS_FILE, load_packed
from tightfit.formats.registry import parse_format
from tightfit.model import get_module, load_model
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages.allocate import Plan
from tightfit.stages.sensitivity import SENSITIVITY_VERSION, SensitivityTable, measure_sensitivity


@pytest.fixture(scope="module")
def measured(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    cal = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=10, seq_len=64, batch_size=5))
    calibration = calibrate_stage.CalibrationSet(config=CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64, batch_size=4),
                                                 tokens=cal.tokens[:8])
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    formats = [parse_format("w2g32"), parse_format("w4g64")]
    table = measure_sensitivity(loaded, hessians, formats, method="measured", slice_tokens=cal.tokens[8:], progress=False)
    return loaded, hessians, cal.tokens[8:], table


def test_measured_damage_is_the_kl_of_the_model_with_one_layer_quantized(measured):
    """The replayed-prefix measurement equals a plain full forward with that one layer quantized."""
    loaded, hessians, slice_tokens, table = measured
    model, formats = loaded.model, [parse_format("w2g32"), parse_format("w4g64")]
    name = f"{loaded.arch.blocks}.1.mlp.down_proj"  # block 1: blocks before it are replayed
    linear = get_module(model, name)
    original = linear.weight.data.clone()
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=slice_tokens).logits[:, :-1], -1)
        q = gptq_quantize_many(original, hessians.hessians[name], formats)[0].quantized  # the stage's one sweep
        linear.weight.data.copy_(q.dequantize())
        logq = F.log_softmax(model(input_ids=slice_tokens).logits[:, :-1], -1)
        linear.weight.data.copy_(original)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert kl > 0
    assert table.damages[name]["w2g32"] == pytest.approx(kl, rel=1e-3, abs=1e-7)


def test_fewer_bits_do_more_damage_and_table_round_trips(measured):
    _, _, slice_tokens, table = measured
    layers = list(table.shapes)
    assert layers == list(table.proxy), "no embedding candidates: only the linear layers"
    worse = sum(table.damages[l]["w2g32"] > table.damages[l]["w4g64"] for l in layers)
    assert worse >= 0.8 * len(layers)
    assert all(table.proxy[l]["w2g32"] > table.proxy[l]["w4g64"] for l in layers)
    assert table.method == "measured" and table.tokens == slice_tokens.shape[0] * (slice_tokens.shape[1] - 1)
    again = SensitivityTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again == table
    assert set(table.rank_agreement()) == {"w2g32", "w4g64"}
    with pytest.raises(ValueError, match=f"version 1 is not {SENSITIVITY_VERSION}"):
        SensitivityTable.from_json({**table.to_json(), "version": 1})


# ---- the planner end to end ---------------------------------------------------------------------


def _flags(text, tmp_path: Path, candidates: str = "w2g32,w4g64") -> list[str]:
    return ["--candidates", candidates, "--calib-text", str(text), "--calib-samples", "8", "--calib-len", "64",
            "--work", str(tmp_path / "work")]


def test_plan_then_compress_with_the_plan(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    common = _flags(tiny_text_file, tmp_path)
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(tiny_model_dir), "--bpw", "3.4", "--out", str(plan_file), *common]) == 0
    printed = capsys.readouterr().out
    assert "damage = Fisher-weighted GPTQ error (predicted KL)" in printed and "Spearman" not in printed
    assert "the linear layers' estimates put on the measured scale per layer kind and format (14 probes" in printed
    assert "14 probes, 28 forwards" in printed and "2 interleaved parts quantized in turn, on 63 held-back tokens" in printed
    assert "embeddings and head: model.embed_tokens" in printed
    plan = Plan.from_json(json.loads(plan_file.read_text()))
    loaded = load_model(str(tiny_model_dir))
    embeddings, head = loaded.arch.embeddings, loaded.arch.head  # the tiny llama's head is untied: two decisions
    assert {embeddings, head} <= set(plan.formats) and not plan.pinned
    linear = {f.name for n, f in plan.formats.items() if n not in (embeddings, head)}
    assert linear == {"w2g32", "w4g64"}, "3.4 bits/weight lies between the candidates: the plan must mix them"
    assert plan.bits_per_weight <= 3.4 and plan.formats[embeddings].name != "fp16"
    assert plan.total_weights == sum(get_module(loaded.model, n).weight.numel() for n in plan.formats)

    # cached measurements: a second budget is solved without re-measuring (the work folder is reused)
    cached = [tmp_path / "work" / f for f in ("sensitivity.json", "fisher.safetensors", "hessians.safetensors")]
    before = [p.stat().st_mtime_ns for p in cached]
    assert main(["plan", str(tiny_model_dir), "--bpw", "4.0", "--out", str(tmp_path / "p2.json"), *common]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == before

    out = tmp_path / "mixed"
    assert main(["compress", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out), "--no-eval",
                 "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["format"] for k, v in manifest["layers"].items()} == {n: f.name for n, f in plan.quantized.items()}
    assert manifest["summary"]["bits_per_weight"] == pytest.approx(plan.bits_per_weight)

    # --embed-format overrides the plan's embeddings and head
    pinned = tmp_path / "pinned"
    assert main(["compress", str(tiny_model_dir), "--plan", str(plan_file), "--embed-format", "fp16", "--out", str(pinned), "--no-eval",
                 "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64"]) == 0
    layers = json.loads((pinned / "manifest.json").read_text())["layers"]
    assert embeddings not in layers and head not in layers and len(layers) == len(manifest["layers"]) - 2


def test_max_size_counts_the_whole_file(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    """The written tensor file fits --max-size: norms and header are taken off, the embeddings are planned."""
    out = tmp_path / "small"
    assert main(["compress", str(tiny_model_dir), "--max-size", "380KB", "--out", str(out), "--no-eval",
                 *_flags(tiny_text_file, tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "outside the plan (norms, file header)" in printed
    assert (out / TENSORS_FILE).stat().st_size <= 380_000
    packed = load_packed(out)
    assert "model.embed_tokens" in packed.layers, "fp16 embeddings and head do not fit: the plan quantizes them"


def test_pinned_embeddings_stay_outside_the_plan(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(tiny_model_dir), "--max-size", "450KB", "--embed-format", "w8g32-sym", "--out", str(plan_file),
                 *_flags(tiny_text_file, tmp_path)]) == 0
    assert "pinned outside the plan" in capsys.readouterr().out
    plan = Plan.from_json(json.loads(plan_file.read_text()))
    assert {f.name for f in plan.pinned.values()} == {"w8g32-sym"} and not set(plan.pinned) & set(plan.formats)
    assert set(plan.pinned) <= set(plan.quantized)
    fixed = plan.budget.fixed_bytes
    assert fixed > 200_000 + sum(parse_format("w8g32-sym").nbytes(384, 128).total for _ in plan.pinned) - 1
    assert plan.total_bytes <= 450_000 - fixed


def test_measured_and_proxy_sensitivity(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    common = _flags(tiny_text_file, tmp_path)
    assert main(["plan", str(tiny_model_dir), "--bpw", "3.4", "--sensitivity", "measured", "--out", str(tmp_path / "m.json"), *common]) == 0
    printed = capsys.readouterr().out
    assert "damage = KL increase on held-back text" in printed and "proxy vs measured rank agreement (Spearman)" in printed
    assert main(["plan", str(tiny_model_dir), "--bpw", "3.4", "--sensitivity", "proxy", "--out", str(tmp_path / "p.json"), *common]) == 0
    printed = capsys.readouterr().out
    assert "Hessian proxy" in printed and "pinned outside the plan" in printed
    plan = Plan.from_json(json.loads((tmp_path / "p.json").read_text()))
    assert {f.name for f in plan.pinned.values()} == {"fp16"} and not plan.pinned.keys() & plan.quantized.keys()
    entries = json.loads((tmp_path / "work" / "sensitivity.json").read_text())["entries"]
    assert [e["key"]["method"] for e in entries] == ["measured", "proxy"], "one cached table per method"


def test_a_plan_mixes_spqr_and_uniform_layers_packs_reloads_and_runs(tiny_model_dir, tiny_text_file, tmp_path):
    from tightfit.runtime import build_model
    from tightfit.runtime.engine import FastBackend

    out = tmp_path / "spqr"
    assert main(["compress", str(tiny_model_dir), "--bpw", "3.3", "--out", str(out), "--no-eval",
                 *_flags(tiny_text_file, tmp_path, "w2g32,spqr-w3g16-s3-o1.0,w4g64")]) == 0
    packed = load_packed(out)
    kinds = {type(q.fmt).__name__ for q in packed.layers.values()}
    assert kinds == {"QuantFormat", "SpQRFormat"}, kinds
    ids = torch.randint(4, 384, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = build_model(packed)(input_ids=ids).logits[0, -1]
    fast = FastBackend(packed, max_positions=32, threads=1)
    assert fast.slow_layers == [], "SpQR layers run on the SpQR kernel"
    assert torch.isfinite(logits).all() and int(fast.forward(ids[0].tolist()).argmax()) >= 0


def test_a_plan_with_a_grid_candidate_mixes_it_and_runs_it_on_the_kernels(tiny_model_dir, tiny_text_file, tmp_path):
    from tightfit.runtime.engine import FastBackend

    out = tmp_path / "grid"
    assert main(["compress", str(tiny_model_dir), "--bpw", "3.3", "--out", str(out), "--no-eval", "--embed-format", "w8g32-sym",
                 *_flags(tiny_text_file, tmp_path, "w2g32,nl4g32")]) == 0
    packed = load_packed(out)
    linear = {q.fmt.name for name, q in packed.layers.items() if "layers." in name}
    assert linear == {"w2g32", "nl4g32"}, "3.3 bits/weight lies between the candidates: the plan must mix them"
    assert FastBackend(packed, max_positions=32, threads=1).slow_layers == []  # the grid has a fast kernel


@pytest.mark.parametrize("flags, expected", [
    # pinned embeddings (the proxy): w2g32 everywhere is 2 + 18/32 = 2.5625, shown rounded up
    (["--bpw", "1.0", "--sensitivity", "proxy"], "the smallest possible is 2.57 bits/weight"),
    # planned embeddings count: w2g64 (2 + 24/64 = 2.375 bits/weight) is their smallest candidate,
    # below the linear layers' w2g32
    (["--bpw", "1.0"], "the smallest possible is 2.50 bits/weight (every layer in its smallest format)"),
    (["--max-size", "150KB"], "--max-size 0.1 MB cannot be met: the tensors outside the plan (norms) and the file header alone take 0.2 MB"),
    (["--max-size", "260KB"], "budget 0.3 MB cannot be met: the smallest possible is 0.4 MB (every layer in its smallest format plus "
                              "0.2 MB outside the plan)"),
])
def test_impossible_budgets_give_one_clean_line(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch, flags, expected):
    """... and before any Hessian, Fisher or sensitivity is computed: bytes need none of them."""
    from tightfit.stages import calibrate as calibrate_stage

    def too_late(*a, **k):
        raise AssertionError("an impossible size budget must be refused before the calibration statistics")

    monkeypatch.setattr(calibrate_stage, "collect_hessians", too_late)
    monkeypatch.setattr(calibrate_stage, "collect_fisher", too_late)
    rc = main(["plan", str(tiny_model_dir), *flags, "--out", str(tmp_path / "p.json"), *_flags(tiny_text_file, tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or not err[-2].startswith("Traceback")
    assert err[-1].startswith("tightfit: error:") and expected in err[-1]


def test_budgeted_compress_quantizes_with_the_planners_hessians(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    """With a budget, GPTQ takes the original-model Hessians the planner collected (no second pass through
    the quantized blocks); --sequential collects them again block by block, and the layers come out different."""
    from tightfit.stages import quantize as quantize_stage

    seen = []
    real = quantize_stage.quantize_model
    monkeypatch.setattr(quantize_stage, "quantize_model", lambda *a, **k: seen.append(k.get("hessians")) or real(*a, **k))
    common = _flags(tiny_text_file, tmp_path)
    assert main(["compress", str(tiny_model_dir), "--bpw", "3.4", "--out", str(tmp_path / "a"), "--no-eval", *common]) == 0
    assert main(["compress", str(tiny_model_dir), "--bpw", "3.4", "--out", str(tmp_path / "b"), "--no-eval", "--sequential",
                 *common]) == 0
    assert seen[0] is not None and seen[1] is None
    a, b = load_packed(tmp_path / "a"), load_packed(tmp_path / "b")
    assert a.layers.keys() == b.layers.keys()
    assert any(not torch.equal(a.layers[n].dequantize(), b.layers[n].dequantize()) for n in a.layers if ".layers.1." in n)
    capsys.readouterr()
    assert main(["compress", str(tiny_model_dir), "--format", "w4g64", "--sequential", "--out", str(tmp_path / "c")]) == 2
    assert "--sequential applies to planned compression" in capsys.readouterr().err


def test_a_plan_hands_its_sweeps_gptq_results_to_the_quantize_stage(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    """The fisher sweep GPTQ-quantized every layer in every candidate with the original Hessians: the plan
    keeps the results of its choices (exactly the sweep's, format by format), the quantize stage takes
    them as they are when its settings match, and quantizes again when they do not (another --damp,
    SmoothAttention, RTN) or when the table came from the cache (nothing kept)."""
    from tightfit.artifacts import QuantizeConfig
    from tightfit.pipeline import PlanRequest, make_plan
    from tightfit.pipeline.planning import original_hessians
    from tightfit.stages import quantize as quantize_stage
    from tightfit.stages.allocate import Budget

    loaded = load_model(str(tiny_model_dir))
    calib = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64)
    request = PlanRequest(model=str(tiny_model_dir), budget=Budget(max_bpw=3.4), work=tmp_path / "work",
                          formats=("w2g32", "w4g64"), calibration=calib, progress=False)
    report = make_plan(request, loaded)
    ready, plan = report.ready, report.plan
    linear = {n: f for n, f in plan.quantized.items() if n not in (loaded.arch.embeddings, loaded.arch.head)}
    assert ready is not None and set(ready.layers) == set(linear) and {f.name for f in linear.values()} == {"w2g32", "w4g64"}
    hessians = original_hessians(loaded, calib, tmp_path / "work", False, lambda _: None)
    formats = [parse_format("w2g32"), parse_format("w4g64")]
    for name, fmt in linear.items():
        weight, loss = ready.layers[name]
        swept = gptq_quantize_many(get_module(loaded.model, name).weight.data, hessians.hessians[name], formats, damp=0.01)
        # the sweep ran in a forked worker (one thread: other rounding in the products, a rare tie decided otherwise)
        same = weight.dequantize() == swept[[f.name for f in formats].index(fmt.name)].quantized.dequantize()
        assert weight.fmt == fmt and same.float().mean() > 0.99, (name, same.float().mean())
        assert loss == report.sensitivity.proxy[name][fmt.name] and loss == pytest.approx(swept[0].loss if fmt == formats[0] else swept[1].loss, rel=0.05)

    config = QuantizeConfig(fmt=formats[0], plan=plan.quantized)
    assert ready.usable_with(config)
    assert not any(ready.usable_with(dataclasses.replace(config, **c))
                   for c in ({"damp": 0.02}, {"method": "rtn"}, {"smooth_attention": 0.5}, {"act_order": False}))
    taken = quantize_stage.quantize_model(loaded, None, config, hessians=hessians, ready=ready, progress=False)
    again = quantize_stage.quantize_model(loaded, None, config, hessians=hessians, progress=False)
    for name in linear:
        assert torch.equal(taken.layers[name].dequantize(), ready.layers[name][0].dequantize())
        assert taken.reports[name].loss == ready.layers[name][1]
    # its own column order (not the sweep's nested one): other codes, a GPTQ objective of the same size
    assert any(not torch.equal(again.layers[n].dequantize(), taken.layers[n].dequantize()) for n in linear)
    assert sum(again.reports[n].loss for n in linear) == pytest.approx(sum(taken.reports[n].loss for n in linear), rel=0.2)
    with pytest.raises(ValueError, match="ready GPTQ results need"):
        quantize_stage.quantize_model(loaded, None, dataclasses.replace(config, damp=0.02), hessians=hessians, ready=ready)
    assert make_plan(request, loaded).ready is None  # the table from the cache: no results kept

    common = _flags(tiny_text_file, tmp_path / "cli")
    for extra, taken_line in (([], True), (["--damp", "0.02"], False)):
        assert main(["compress", str(tiny_model_dir), "--bpw", "3.4", "--out", str(tmp_path / f"cli{len(extra)}"), "--no-eval",
                     *common, *extra]) == 0
        printed = capsys.readouterr()
        assert ("taken from the sensitivity sweep" in printed.out + printed.err) == taken_line
        common[-1] = str(tmp_path / "cli2" / "work")  # a fresh work folder: the sweep runs again


def test_compress_evaluates_through_the_fast_engine(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "fast"
    assert main(["compress", str(tiny_model_dir), "--format", "w4g64", "--out", str(out), "--eval-engine", "fast",
                 "--text", str(tiny_text_file), "--windows", "2", "--ctx", "32",
                 "--calib-text", str(tiny_text_file), "--calib-samples", "8", "--calib-len", "64"]) == 0
    printed = capsys.readouterr()
    assert "(fast engine)" in printed.err + printed.out
    written = json.loads((out / "eval.json").read_text())
    assert written["engine"] == "fast" and written["result"]["kl"] >= 0


def test_fewer_candidates_are_read_from_a_cached_table_of_more(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """A plan over a subset of a cached table's candidates (linear and embedding) takes the table
    restricted to them, nothing scored again; with the embeddings pinned it does not (the cached
    table has them as layers), and a table that lacks a candidate is not used."""
    from tightfit.pipeline import PlanRequest, make_plan
    from tightfit.stages import sensitivity as sensitivity_stage
    from tightfit.stages.allocate import Budget

    loaded = load_model(str(tiny_model_dir))
    calib = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64)
    ask = lambda formats, embed: PlanRequest(model=str(tiny_model_dir), budget=Budget(max_bpw=4.5), work=tmp_path / "work",  # noqa: E731
                                             formats=formats, embed_formats=embed, calibration=calib, progress=False)
    full = make_plan(ask(("w2g32", "w3g64", "w4g64"), ("fp16", "w4g32-sym", "w3g32")), loaded).sensitivity

    def no_sweep(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(sensitivity_stage, "sweep_block", no_sweep)
    report = make_plan(ask(("w4g64", "w2g32"), ("w3g32", "fp16")), loaded)
    part = report.sensitivity
    assert report.sensitivity_origin == "cached" and [f.name for f in part.formats] == ["w4g64", "w2g32"]
    assert part.probes == tuple(p for p in full.probes if p.format in ("w4g64", "w2g32")) and part.probes
    for layer, row in part.damages.items():
        assert list(row) == (["w4g64", "w2g32"] if layer in part.proxy else ["w3g32", "fp16"])
        assert all(row[c] == full.damages[layer][c] and part.nbytes[layer][c] == full.nbytes[layer][c] for c in row)
    assert {c.name for c in report.plan.formats.values()} <= {"w4g64", "w2g32", "w3g32", "fp16"}
    with pytest.raises(AssertionError, match="scored again"):
        make_plan(ask(("w4g64", "w2g32"), ("fp16",)), loaded)  # embeddings pinned: not in the cached table's plan
    with pytest.raises(AssertionError, match="scored again"):
        make_plan(ask(("w4g64", "w4g128"), ("fp16", "w3g32")), loaded)  # w4g128 is not in it
    with pytest.raises(ValueError, match="w4g128"):
        full.restricted([parse_format("w4g128")], [])


def test_other_embedding_candidates_reuse_the_cached_linear_scores(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """A second plan whose embedding candidates differ scores only the embeddings and head: the
    linear layers' sweep (most of the sensitivity stage's time) is taken from the cached table."""
    from tightfit.pipeline import PlanRequest, make_plan
    from tightfit.stages import sensitivity as sensitivity_stage
    from tightfit.stages.allocate import Budget

    loaded = load_model(str(tiny_model_dir))
    calib = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64)
    ask = lambda embed: PlanRequest(model=str(tiny_model_dir), budget=Budget(max_bpw=4.0), work=tmp_path / "work",  # noqa: E731
                                    formats=("w2g32", "w4g64"), embed_formats=embed, calibration=calib, progress=False)
    report = make_plan(ask(("fp16", "w4g32-sym")), loaded)
    first = report.sensitivity
    assert report.sensitivity_origin == "scored" and make_plan(ask(("fp16", "w4g32-sym")), loaded).sensitivity_origin == "cached"
    def no_sweep(*args, **kwargs):  # raises in a forked sweep worker too: the error comes back to the caller
        raise AssertionError("the linear layers were scored again")

    monkeypatch.setattr(sensitivity_stage, "sweep_block", no_sweep)
    report = make_plan(ask(("w4g32-sym", "w3g32", "w3g64")), loaded)
    second = report.sensitivity
    assert report.sensitivity_origin == "lent"
    linear = [n for n in first.damages if n not in (loaded.arch.embeddings, loaded.arch.head)]
    assert linear and all(second.damages[n] == first.damages[n] and second.proxy[n] == first.proxy[n] for n in linear)
    emb = second.damages[loaded.arch.embeddings]
    assert set(emb) == {"w4g32-sym", "w3g32", "w3g64"} and emb["w4g32-sym"] == first.damages[loaded.arch.embeddings]["w4g32-sym"]
    assert emb["w3g64"] > emb["w3g32"] > emb["w4g32-sym"] > 0, "fewer bits, more predicted damage"
    entries = json.loads((tmp_path / "work" / "sensitivity.json").read_text())["entries"]
    assert len(entries) == 2
    # the same linear candidates but another set of them: scored in full
    with pytest.raises(AssertionError, match="scored again"):
        make_plan(dataclasses.replace(ask(("w4g32-sym",)), formats=("w2g32", "w3g64")), loaded)

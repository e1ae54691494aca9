"""The Fisher statistics of the calibrate stage and the sensitivity stage's Fisher estimate, on the tiny models."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from scipy.stats import spearmanr
from tiny_models import TINY_MODEL_TYPES

from tightfit.algorithms import gptq_quantize_many
from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.artifacts import FP16, CalibrationConfig, CalibrationSet, parse_choice
from tightfit.formats.registry import parse_format
from tightfit.model import get_module, load_model
from tightfit.model.blocks import embedding_layers, linear_layer_names
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages.allocate import Budget, LayerChoice, allocate
from tightfit.stages import sensitivity
from tightfit.stages.sensitivity import fisher as fisher_estimate
from tightfit.stages.sensitivity import embedding_damage, fisher_error_of, fisher_weighted_error, measure_sensitivity

EMBED = [parse_choice(c) for c in ("fp16", "w8g32-sym", "w4g32-sym", "w2g32")]
LINEAR = [parse_format("w2g32"), parse_format("w4g64")]


def _calibration(loaded, text, n: int = 4, seq_len: int = 48) -> tuple[CalibrationSet, torch.Tensor]:
    """n calibration windows and 2 held-back ones."""
    return calibrate_stage.calibrate_with_held_back(loaded.tokenizer, CalibrationConfig(text=str(text), n_samples=n, seq_len=seq_len,
                                                                                         batch_size=n), 2)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fisher_statistics_shapes_and_a_seeded_sampler(model_type, make_tiny_model, tiny_text_file, tmp_path):
    loaded = load_model(str(make_tiny_model(model_type, tmp_path)))
    calibration, _ = _calibration(loaded, tiny_text_file)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, windows=3, progress=False)
    vocab, hidden = get_module(loaded.model, loaded.arch.embeddings).weight.shape
    assert fisher.tokens == 3 * 47 and fisher.windows == 3 and fisher.seed == 0
    assert list(fisher.outputs) == linear_layer_names(loaded.model, loaded.arch)
    for name, f in fisher.outputs.items():
        assert f.shape == (get_module(loaded.model, name).out_features,) and bool((f >= 0).all()) and f.sum() > 0
    assert torch.equal(fisher.embed_ids, torch.unique(calibration.tokens[:3]))
    assert fisher.embed_fisher.shape == (len(fisher.embed_ids), hidden) and bool((fisher.embed_fisher >= 0).all())
    assert fisher.head_fisher.shape == (vocab,) and 0 < float(fisher.head_fisher.sum()) <= 1  # sum_v p (1 - p) <= 1
    h = fisher.head_inputs.double()
    assert h.shape == (hidden, hidden) and torch.allclose(h, h.T) and bool((torch.linalg.eigvalsh(h) > -1e-5).all())

    again = calibrate_stage.collect_fisher(loaded, calibration, windows=3, progress=False)
    assert all(torch.equal(again.outputs[n], f) for n, f in fisher.outputs.items()), "the sampler is seeded"
    other = calibrate_stage.collect_fisher(loaded, calibration, windows=3, seed=1, progress=False)
    assert not torch.equal(other.embed_fisher, fisher.embed_fisher), "another seed samples other tokens"
    assert all(not p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(ValueError, match="Fisher windows must lie in 1 .. 4"):
        calibrate_stage.collect_fisher(loaded, calibration, windows=5, progress=False)


def test_fisher_cache_round_trip_and_invalidation(tiny_model_dir, tiny_text_file, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    calibration, _ = _calibration(loaded, tiny_text_file)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, windows=2, progress=False)
    path = tmp_path / "fisher.safetensors"
    calibrate_stage.save_fisher(fisher, path)
    again = calibrate_stage.load_fisher(path, loaded, calibration.config, windows=2, seed=0)
    assert again is not None and again.tokens == fisher.tokens
    for field in ("embed_ids", "embed_fisher", "head_fisher", "head_inputs"):
        assert torch.equal(getattr(again, field), getattr(fisher, field))
    assert again.outputs.keys() == fisher.outputs.keys() and all(torch.equal(again.outputs[n], f) for n, f in fisher.outputs.items())
    assert calibrate_stage.load_fisher(path, loaded, calibration.config, windows=3, seed=0) is None
    assert calibrate_stage.load_fisher(path, loaded, calibration.config, windows=2, seed=1) is None
    other = dataclasses.replace(calibration.config, seq_len=32)
    assert calibrate_stage.load_fisher(path, loaded, other, windows=2, seed=0) is None
    assert calibrate_stage.load_fisher(tmp_path / "none.safetensors", loaded, calibration.config, windows=2, seed=0) is None


def _direct_fisher(loaded, tokens: torch.Tensor, name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """F [N] and E[x x^T] [K, K] of one layer from plain autograd on each window, the next tokens
    drawn as collect_fisher draws them."""
    model = loaded.model
    layer = get_module(model, name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    generator = torch.Generator().manual_seed(seed)
    g2, xx, n = 0, 0, 0
    try:
        for w in range(tokens.shape[0]):
            ids = tokens[w : w + 1]
            x = get_module(model, loaded.arch.embeddings)(ids).detach().requires_grad_(True)
            logp = torch.log_softmax(model(inputs_embeds=x, use_cache=False).logits[:, :-1].float(), -1)
            y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=generator).reshape(1, -1)
            (g,) = torch.autograd.grad(logp.gather(-1, y[..., None]).sum(), seen["out"])
            g2 = g2 + g[0].pow(2).sum(0)
            inputs = seen["x"][0].detach()
            xx = xx + inputs.T @ inputs
            n += ids.shape[1] - 1
    finally:
        handle.remove()
    return g2 / n, xx / tokens.shape[0] / tokens.shape[1]


def test_the_estimate_of_one_layer_equals_a_direct_computation(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    calibration, _ = _calibration(loaded, tiny_text_file)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, windows=4, progress=False)
    table = measure_sensitivity(loaded, hessians, LINEAR, method="fisher", fisher=fisher, progress=False)
    name = f"{loaded.arch.blocks}.1.mlp.down_proj"
    f, second_moment = _direct_fisher(loaded, calibration.tokens, name)
    assert torch.allclose(fisher.outputs[name], f, rtol=1e-4, atol=1e-12)
    assert torch.allclose(hessians.hessians[name] / 2, second_moment, rtol=1e-4, atol=1e-6)  # H = 2/T X^T X
    w = get_module(loaded.model, name).weight.data
    dw = gptq_quantize_many(w, hessians.hessians[name], list(LINEAR))[0].quantized.dequantize() - w  # the stage's one sweep
    direct = 0.5 * float(sum(f[j] * (dw[j] @ second_moment @ dw[j]) for j in range(w.shape[0])))
    assert table.damage(name, LINEAR[0]) == pytest.approx(direct, rel=1e-3)
    assert fisher_weighted_error(dw, second_moment, f) == pytest.approx(direct, rel=1e-4)


def test_the_estimate_ranks_layers_and_predicts_the_kl_of_the_embeddings(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = _calibration(loaded, tiny_text_file, n=8, seq_len=64)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, progress=False)
    est = measure_sensitivity(loaded, hessians, LINEAR, method="fisher", fisher=fisher, embed_choices=EMBED, progress=False)
    meas = measure_sensitivity(loaded, hessians, LINEAR, method="measured", slice_tokens=held_back, embed_choices=EMBED,
                               progress=False)
    assert est.method == "fisher" and est.tokens == fisher.tokens and est.rank_agreement() == {}
    assert all(v > 0.6 for v in est.rank_agreement(meas).values()), est.rank_agreement(meas)
    layers = list(est.proxy)
    assert spearmanr([est.proxy[l]["w2g32"] for l in layers], [est.damages[l]["w2g32"] for l in layers]).statistic < 0.99
    for name in (loaded.arch.embeddings, loaded.arch.head):  # untied: two layers, each its own term
        assert est.damages[name]["fp16"] == meas.damages[name]["fp16"] == 0.0
        assert est.damages[name]["w8g32-sym"] < est.damages[name]["w4g32-sym"] < est.damages[name]["w2g32"]
        for c in ("w4g32-sym", "w2g32"):
            assert est.damages[name][c] == pytest.approx(meas.damages[name][c], rel=0.5)


def test_a_tied_embedding_is_one_decision_and_counts_its_bytes_once(make_tiny_model, tiny_text_file, tmp_path):
    loaded = load_model(str(make_tiny_model("gemma3_text", tmp_path)))  # ties its head to the embeddings
    assert embedding_layers(loaded.model, loaded.arch) == [loaded.arch.embeddings]
    calibration, _ = _calibration(loaded, tiny_text_file)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, windows=4, progress=False)
    table = measure_sensitivity(loaded, hessians, LINEAR, method="fisher", fisher=fisher, embed_choices=EMBED, progress=False)
    name = loaded.arch.embeddings
    assert loaded.arch.head not in table.shapes and table.candidates(name) == EMBED
    vocab, hidden = table.shapes[name]
    assert table.nbytes[name] == {c.name: c.nbytes(vocab, hidden).total for c in EMBED} and table.nbytes[name]["fp16"] == 2 * vocab * hidden
    w = get_module(loaded.model, name).weight.data
    dw = quantize_rtn_any(w, EMBED[2]).dequantize() - w
    both = embedding_damage(dw, fisher, embeddings=True, head=True)
    assert table.damage(name, EMBED[2]) == pytest.approx(both, rel=1e-5)
    assert both > embedding_damage(dw, fisher, embeddings=True, head=False) > 0

    choices = {layer: [LayerChoice(c, table.nbytes[layer][c.name], table.damage(layer, c)) for c in table.candidates(layer)]
               for layer in table.shapes}
    linear = sum(n * k for layer, (n, k) in table.shapes.items() if layer != name)
    plan = allocate(table.shapes, choices, Budget(max_bpw=5.0))
    assert plan.total_weights == linear + vocab * hidden, "the tied pair's weights count once"
    assert plan.formats[name] != FP16 and name in plan.quantized

    # The quantize stage applies the plan's embedding format to the pair; the kept tensors hold neither copy.
    from tightfit.artifacts import QuantizeConfig
    from tightfit.stages import quantize as quantize_stage

    qmodel = quantize_stage.quantize_model(loaded, None, QuantizeConfig(fmt=LINEAR[1], method="rtn", plan=plan.quantized),
                                           progress=False)
    assert qmodel.layers[name].fmt == plan.formats[name] and not any(k.endswith("embed_tokens.weight") for k in qmodel.kept)
    head = qmodel.module.get_output_embeddings().weight
    assert torch.equal(head, qmodel.module.get_input_embeddings().weight)
    assert torch.allclose(head, qmodel.layers[name].dequantize().to(head.dtype))


@pytest.mark.parametrize("embeddings, head", [(True, True), (True, False), (False, True)])
def test_embedding_damage_of_a_big_vocabulary_is_summed_in_row_slices(embeddings, head, monkeypatch):
    """rtn_embedding_damage scores RTN_ROWS rows of the error at a time (a 151936-token head's error
    is 0.9 GB): the slices add up to the whole, tokens of every slice and a partial last one counted."""
    import types

    from tightfit.formats import registry

    g = torch.Generator().manual_seed(0)
    vocab, hidden, tokens = 300, 32, 200
    a = torch.randn(hidden, hidden, generator=g)
    fisher = types.SimpleNamespace(embed_ids=torch.randint(0, vocab, (tokens,), generator=g),
                                   embed_fisher=torch.rand(tokens, hidden, generator=g),
                                   head_fisher=torch.rand(vocab, generator=g), head_inputs=a @ a.T / hidden)
    w = torch.randn(vocab, hidden, generator=g)
    fmt = EMBED[2]
    whole = embedding_damage(quantize_rtn_any(w, fmt).dequantize() - w, fisher, embeddings=embeddings, head=head)
    monkeypatch.setattr(registry, "RTN_ROWS", 64)  # error_rows' slices
    sliced = fisher_estimate.rtn_embedding_damage(w, fmt, fisher, embeddings=embeddings, head=head)
    assert whole > 0 and sliced == pytest.approx(whole, rel=1e-6)


def test_the_fisher_error_of_a_gptq_result_needs_no_hessian_product():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 160, generator=g) * torch.rand(160, generator=g)
    x[:, 11] = 0  # an input that never fires: GPTQ zeroes its weights, the error there costs nothing
    h, w, f = 2 * x.T @ x / 400, torch.randn(24, 160, generator=g), torch.rand(24, generator=g)
    for fmt in ("w2g32", "w4g64"):
        result = gptq_quantize_many(w, h, [parse_format(fmt)])[0]
        direct = fisher_weighted_error(result.quantized.dequantize() - w, h / 2, f)
        assert fisher_error_of(result, w, h, f) == pytest.approx(direct, rel=1e-4)


def test_sampled_rows_estimate_the_sum_over_all_rows_without_bias(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w, f = torch.randn(400, 8, generator=g) * torch.rand(400, 1, generator=g), torch.rand(400, generator=g)
    h = torch.diag(torch.rand(8, generator=g))
    monkeypatch.setattr(fisher_estimate, "ROW_SAMPLE_WORK", 64 * 8**2)  # 64 of 400 rows
    monkeypatch.setattr(fisher_estimate, "MIN_SAMPLED_ROWS", 16)
    value = f * (w.square() @ torch.diag(h))  # what each row contributes
    estimates = []
    for seed in range(400):
        rows, weights = fisher_estimate.sampled_rows(w, h, f, seed=seed)
        assert len(rows) == 64 and len(set(rows.tolist())) == 64
        estimates.append(float((value[rows] * weights).sum()))
    assert sum(estimates) / len(estimates) == pytest.approx(float(value.sum()), rel=0.02)


def test_with_held_back_text_the_embeddings_are_measured_and_the_linear_layers_put_on_the_measured_scale(
        tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = _calibration(loaded, tiny_text_file, n=8, seq_len=64)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, progress=False)
    formats = [parse_format(f) for f in ("w2g32", "w3g64", "w4g64")]
    plain = measure_sensitivity(loaded, hessians, formats, method="fisher", fisher=fisher, embed_choices=EMBED, progress=False)
    scaled = measure_sensitivity(loaded, hessians, formats, method="fisher", fisher=fisher, slice_tokens=held_back,
                                 embed_choices=EMBED, progress=False)
    meas = measure_sensitivity(loaded, hessians, formats, method="measured", slice_tokens=held_back, embed_choices=EMBED,
                               progress=False)
    assert plain.probes == () and meas.probes == ()
    linear = list(scaled.proxy)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(dict.fromkeys(sensitivity.layer_kind(l) for l in linear)) == sorted(kinds)
    assert [(p.kind, p.format) for p in scaled.probes] == [(k, f.name) for f in formats for k in kinds]
    scales = sensitivity.probe_scales(scaled.probes)
    for probe in scaled.probes:
        assert probe.tokens == 2 * 63
        of_kind = [l for l in linear if l.endswith("." + probe.kind)]
        assert probe.predicted == pytest.approx(sum(plain.damages[l][probe.format] for l in of_kind), rel=1e-6)
        if probe.scale is not None:
            assert scales[(probe.kind, probe.format)] == probe.scale == probe.measured / probe.predicted
        for l in of_kind:
            assert scaled.damages[l][probe.format] == pytest.approx(plain.damages[l][probe.format] * scales[(probe.kind, probe.format)],
                                                                   rel=1e-6)
    assert sum(p.measured for p in scaled.probes if p.format == "w2g32") > sum(p.measured for p in scaled.probes if p.format == "w4g64")
    # a probe's KL: the k_proj layers in their GPTQ results, one part at a time, measured directly here
    k_layers = [l for l in linear if l.endswith(".k_proj")]
    weights = {l: get_module(loaded.model, l).weight.data.clone() for l in linear}
    quantized = {l: gptq_quantize_many(weights[l], hessians.hessians[l], formats)[1].quantized.dequantize() for l in k_layers}
    probe = next(p for p in scaled.probes if (p.kind, p.format) == ("k_proj", "w3g64"))
    assert probe.parts == len(sensitivity.probe_parts(k_layers)) == min(sensitivity.PROBE_PARTS, len(k_layers)) > 1
    assert probe.measured == pytest.approx(_parts_kl(loaded, held_back, quantized), rel=1e-4, abs=1e-7)
    assert all(torch.equal(get_module(loaded.model, l).weight.data, weights[l]) for l in linear), "the weights put back"
    for name in (loaded.arch.embeddings, loaded.arch.head):
        assert scaled.damages[name] == meas.damages[name]  # the same measurement on the same text
    text = sensitivity.probes_text(scaled.probes)
    assert "21 probes" in text and "126 held-back tokens" in text and "k_proj x" in text and "42 forwards" in text and "2 interleaved parts" in text
    assert sensitivity.probes_text(()) == ""
    # a probe without a positive KL takes the median factor of its format's other kinds
    fake = [sensitivity.ScaleProbe(kind=k, format="w2g32", predicted=1.0, measured=m, tokens=1)
            for k, m in (("a", 2.0), ("b", 4.0), ("c", 3.0), ("d", 0.0))]
    assert sensitivity.probe_scales(fake)[("d", "w2g32")] == 3.0 and fake[3].scale is None

    again = sensitivity.SensitivityTable.from_json(scaled.to_json())
    assert again.probes == scaled.probes and again.damages == scaled.damages
    old = {**meas.to_json(), "version": 3}
    assert sensitivity.SensitivityTable.from_json(old).damages == meas.damages, "version 4 changed the fisher method only"
    assert sensitivity.SensitivityTable.from_json({**meas.to_json(), "version": 4}).damages == meas.damages
    for version in (3, 4):  # fisher tables of earlier versions probed otherwise
        with pytest.raises(ValueError, match=f"version {version}"):
            sensitivity.SensitivityTable.from_json({**scaled.to_json(), "version": version})


def test_probe_parts_interleave_a_kinds_layers():
    layers = [f"model.layers.{i}.self_attn.k_proj" for i in range(7)]
    assert sensitivity.PROBE_PARTS == 3
    assert sensitivity.probe_parts(layers) == [layers[0::3], layers[1::3], layers[2::3]]
    assert sensitivity.probe_parts(layers[:2]) == [[layers[0]], [layers[1]]]
    assert sorted(sum(sensitivity.probe_parts(layers), [])) == sorted(layers)


def _parts_kl(loaded, held_back, quantized):
    """The sum over `probe_parts` of the KL increase on held_back with that part's layers set to
    their quantized weights (name -> dequantized weight), measured here without the stage."""
    logp = sensitivity.next_token_log_probs(loaded.model, held_back)
    base = sensitivity.kl_per_token(logp, logp)
    total = 0.0
    for part in sensitivity.probe_parts(list(quantized)):
        originals = {l: get_module(loaded.model, l).weight.data.clone() for l in part}
        for l in part:
            get_module(loaded.model, l).weight.data.copy_(quantized[l])
        try:
            total += max(sensitivity.kl_per_token(logp, sensitivity.next_token_log_probs(loaded.model, held_back)) - base, 0.0)
        finally:
            for l, w in originals.items():
                get_module(loaded.model, l).weight.data.copy_(w)
    return total


def test_a_row_sampled_layer_is_probed_rounded_to_nearest_with_the_estimate_of_its_sampled_rows(
        tiny_model_dir, tiny_text_file, monkeypatch):
    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = _calibration(loaded, tiny_text_file, n=8, seq_len=64)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, progress=False)
    monkeypatch.setattr(fisher_estimate, "ROW_SAMPLE_WORK", 1.0)  # every layer row-sampled: 8 rows each
    monkeypatch.setattr(fisher_estimate, "MIN_SAMPLED_ROWS", 8)
    fmt = parse_format("w2g32")
    table = measure_sensitivity(loaded, hessians, [fmt], method="fisher", fisher=fisher, slice_tokens=held_back, progress=False)
    down = [l for l in table.proxy if l.endswith(".down_proj")]
    weights = {l: get_module(loaded.model, l).weight.data.clone() for l in down}
    predicted = 0.0
    for l in down:
        h, f = hessians.hessians[l], fisher.outputs[l]
        rows, row_weight = fisher_estimate.sampled_rows(weights[l], h, f, seed=int(l.split(".")[2]))
        dw = quantize_rtn_any(weights[l], fmt).dequantize() - weights[l]
        predicted += fisher_weighted_error(dw[rows], h / 2, f[rows] * row_weight)
    probe = next(p for p in table.probes if p.kind == "down_proj")
    assert probe.predicted == pytest.approx(predicted, rel=1e-5)
    rounded = {l: quantize_rtn_any(weights[l], fmt).dequantize() for l in down}
    assert probe.measured == pytest.approx(_parts_kl(loaded, held_back, rounded), rel=1e-4, abs=1e-7)
    assert all(torch.equal(get_module(loaded.model, l).weight.data, weights[l]) for l in down)


@pytest.mark.parametrize("method", ["fisher", "proxy"])
def test_the_sweep_in_forked_workers_scores_as_in_this_process(method, tiny_model_dir, tiny_text_file, monkeypatch):
    """Blocks swept by two forked processes give the table of the sweep in this process at one
    thread, bit for bit (damages, proxy, and the scale probes built from the workers' packed results)."""
    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = _calibration(loaded, tiny_text_file, n=8, seq_len=64)
    hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=False)
    fisher = calibrate_stage.collect_fisher(loaded, calibration, progress=False) if method == "fisher" else None
    tables, pids = [], []
    real_sweep = sensitivity.sweep_block
    monkeypatch.setattr(sensitivity, "sweep_block", lambda *a, **k: pids.append(os.getpid()) or real_sweep(*a, **k))
    threads = torch.get_num_threads()
    for workers in (1, 2):
        monkeypatch.setattr(sensitivity, "worker_count", lambda workers=workers: workers)
        torch.set_num_threads(1)  # as each worker runs: sums split over threads round differently
        try:
            tables.append(measure_sensitivity(loaded, hessians, LINEAR, method=method, fisher=fisher, progress=False,
                                              slice_tokens=held_back if method == "fisher" else None))
        finally:
            torch.set_num_threads(threads)
    one, two = tables
    assert pids and set(pids) == {os.getpid()}, "one worker: every block in this process (the forked ones append in theirs)"
    assert one.damages == two.damages and one.proxy == two.proxy and one.probes == two.probes
    assert list(one.damages) == list(two.damages), "layer order whichever block finished first"
    assert (len(one.probes) > 0) == (method == "fisher")


def test_slice_kl_in_bf16_reads_what_a_change_adds_not_bf16s_own_rounding(tiny_model_dir, tiny_text_file):
    """The fisher method's probes run in the calibration's forward precision: the original model's KL
    under bf16 (its own rounding) is measured once and subtracted, so the unchanged model reads 0 and a
    quantized layer about what it reads in fp32; replaying the blocks before it changes nothing."""
    loaded = load_model(str(tiny_model_dir))
    _, held_back = _calibration(loaded, tiny_text_file, n=4, seq_len=64)
    exact = sensitivity._SliceKL(loaded, held_back)
    bf16 = sensitivity._SliceKL(loaded, held_back, CalibrationConfig(forward_dtype="bf16").forward_precision)
    assert exact.base == 0.0 and bf16.base > 0 and exact() == 0.0 and bf16() == pytest.approx(0.0, abs=1e-7)
    name = linear_layer_names(loaded.model, loaded.arch)[-3]  # a layer of the last block
    block = int(name.split(".")[2])
    quantized = {name: quantize_rtn_any(get_module(loaded.model, name).weight.data.float(), parse_format("w2g32"))}
    fp32_kl = sensitivity.whole_model_kl(loaded, quantized, exact)
    assert fp32_kl > 10 * bf16.base
    assert sensitivity.whole_model_kl(loaded, quantized, bf16) == pytest.approx(fp32_kl, rel=0.1)
    assert sensitivity.whole_model_kl(loaded, quantized, lambda: exact(block)) == pytest.approx(fp32_kl, rel=1e-5)

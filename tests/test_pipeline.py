"""End to end on tiny random models: quantize -> pack -> reload gives the same logits; resume works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_MODEL_TYPES

from tightfit.artifacts import CalibrationConfig, QuantizeConfig
from tightfit.evaluate import EvalConfig, evaluate
from tightfit.formats import QuantFormat
from tightfit.formats.registry import parse_format
from tightfit.formats.packed import FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, load_packed
from tightfit.model import load_model
from tightfit.pipeline import CompressRequest, ModelSummary, compress, work_dir_for
from tightfit.runtime import build_model
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import quantize as quantize_stage

SMALL_CALIB = dict(n_samples=8, seq_len=64, batch_size=4)


def _ids(n: int = 2, t: int = 48) -> torch.Tensor:
    return torch.randint(4, 384, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_gptq_packed_reload_matches_in_memory(model_type, make_tiny_model, tiny_text_file, tmp_path):
    loaded = load_model(str(make_tiny_model(model_type, tmp_path)))
    calib = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    config = QuantizeConfig(fmt=QuantFormat.parse("w3g32"), method="gptq")
    qmodel = quantize_stage.quantize_model(loaded, calib, config, progress=False)

    from tightfit.stages import pack as pack_stage

    out = pack_stage.write(pack_stage.pack(qmodel, loaded, calib.config), loaded.tokenizer, tmp_path / "packed")
    reloaded = build_model(load_packed(out))
    ids = _ids()
    with torch.no_grad():
        a = qmodel.module(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        orig = loaded.model(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - orig).abs().max().item() > 1e-4, "quantization changed nothing: not a real test"
    # every linear layer of every block was quantized, and nothing else
    n_blocks = loaded.model.config.num_hidden_layers
    assert len(qmodel.layers) == n_blocks * len(loaded.arch.linear_names)


def test_gptq_beats_rtn_on_output_error(tiny_model_dir, tiny_text_file):
    """Sequential GPTQ must reduce the model's output error against RTN at the same format."""
    loaded = load_model(str(tiny_model_dir))
    calib = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    fmt = QuantFormat.parse("w2g32")
    ids = calib.tokens[:4]
    with torch.no_grad():
        ref = torch.log_softmax(loaded.model(input_ids=ids).logits, -1)
        kls = {}
        for method in ("rtn", "gptq"):
            q = quantize_stage.quantize_model(loaded, calib if method == "gptq" else None,
                                              QuantizeConfig(fmt=fmt, method=method), progress=False)
            logq = torch.log_softmax(q.module(input_ids=ids).logits, -1)
            kls[method] = (ref.exp() * (ref - logq)).sum(-1).mean().item()
    assert kls["gptq"] < kls["rtn"], kls


@pytest.mark.parametrize("smooth_attention", [None, 0.5])  # a resumed SmoothAttention run folds its biases again
def test_compress_resumes_after_finished_blocks(smooth_attention, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_model_dir))
    out = tmp_path / "out"
    request = CompressRequest(
        model=str(tiny_model_dir), out=out,
        quantize=QuantizeConfig(fmt=QuantFormat.parse("w4g64"), method="gptq", smooth_attention=smooth_attention),
        calibration=CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB), evaluation=None, progress=False,
    )
    reference = compress(request, loaded)
    ref_tensors = load_packed(reference.out).tensors()

    # A run killed while quantizing block 1: block 0 is saved, nothing is published at --out.
    out.rename(tmp_path / "first")
    calls = []
    original = quantize_stage._quantize_layer

    def dying(*args):
        calls.append(1)
        if len(calls) > len(loaded.arch.linear_names):
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(quantize_stage, "_quantize_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        compress(request, loaded)
    assert not out.exists()
    assert (work_dir_for(out) / "quantize" / "block_000.json").exists()

    # The rerun quantizes only the remaining block and gives identical bytes.
    calls.clear()
    monkeypatch.setattr(quantize_stage, "_quantize_layer", original)
    counted = []
    monkeypatch.setattr(quantize_stage, "_quantize_layer", lambda *a: counted.append(1) or original(*a))
    resumed = compress(request, loaded)
    assert len(counted) == len(loaded.arch.linear_names)  # block 0 came from the checkpoint
    tensors = load_packed(resumed.out).tensors()
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], ref_tensors[k]), k
    assert not work_dir_for(out).exists()


def test_manifest_describes_the_model(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "m"
    report = compress(CompressRequest(
        model=str(tiny_model_dir), out=out, quantize=QuantizeConfig(fmt=QuantFormat.parse("w3g64-sym"), method="rtn"),
        calibration=CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB),
        evaluation=EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32), progress=False,
    ))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"]["sha256"] == load_model(str(tiny_model_dir)).source.sha256()
    assert {e["format"] for e in manifest["layers"].values()} == {"w3g64-sym"}
    assert manifest["evaluation"]["n_windows"] == 2
    assert manifest["calibration"] is None  # RTN uses no calibration text
    # bits/weight reported == bytes of the quantized layers' tensors in the file x 8 / weights
    packed = load_packed(out)
    q_bytes = sum(v.numel() * v.element_size() for k, v in packed.tensors().items() if k not in packed.kept)
    assert report.summary.quantized_bytes == q_bytes
    assert report.summary.bits_per_weight == pytest.approx(8 * q_bytes / packed.quantized_weights())
    assert report.summary.file_bytes == (out / TENSORS_FILE).stat().st_size
    assert report.evaluation is not None and report.evaluation.kl >= 0 and 0 <= report.evaluation.top1 <= 1
    assert json.loads((out / "eval.json").read_text())["result"]["ppl"] == pytest.approx(report.evaluation.ppl)


def test_evaluate_against_itself_is_exact(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    result = evaluate(loaded.model, _ids(3, 32), reference=loaded.model, batch_size=2, progress=False)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1 == 1.0
    assert result.ppl == pytest.approx(result.reference_ppl)
    assert result.n_tokens == 3 * 31


def test_original_model_hessians_and_mixed_plan(tiny_model_dir, tiny_text_file, tmp_path):
    """Hessians collected once from the original model quantize any plan without forward passes;
    a mixed plan is packed with its per-layer formats and reloads to the same logits."""
    loaded = load_model(str(tiny_model_dir))
    calib = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    hessians = calibrate_stage.collect_hessians(loaded, calib, progress=False)
    names = [f"{loaded.arch.blocks}.{i}.{n}" for i in range(2) for n in loaded.arch.linear_names]
    assert sorted(hessians.hessians) == sorted(names)
    q0 = hessians.hessians[names[0]]
    assert q0.shape == (128, 128) and torch.allclose(q0, q0.T) and bool((torch.linalg.eigvalsh(q0.double()) > -1e-4).all())

    path = tmp_path / "h.safetensors"
    calibrate_stage.save_hessians(hessians, path)
    again = calibrate_stage.load_hessians(path, loaded, calib.config)
    assert again is not None and all(torch.equal(again.hessians[k], hessians.hessians[k]) for k in names)
    other = CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=64, batch_size=4)
    assert calibrate_stage.load_hessians(path, loaded, other) is None  # another calibration: not reused

    plan = {name: QuantFormat.parse("w2g32") if "mlp" in name else QuantFormat.parse("w4g64") for name in names}
    plan[names[0]] = parse_format("spqr-w3g16-s3-o1.0")
    config = QuantizeConfig(fmt=QuantFormat.parse("w4g64"), method="gptq", plan=plan)
    qmodel = quantize_stage.quantize_model(loaded, None, config, hessians=again, progress=False)
    assert {n: q.fmt for n, q in qmodel.layers.items()} == plan

    from tightfit.stages import pack as pack_stage

    out = pack_stage.write(pack_stage.pack(qmodel, loaded, calib.config), loaded.tokenizer, tmp_path / "mixed")
    packed = load_packed(out)
    assert {n: q.fmt for n, q in packed.layers.items()} == plan
    assert QuantizeConfig.from_json(packed.info["quantize"]).plan == plan
    ids = _ids()
    with torch.no_grad():
        assert (qmodel.module(input_ids=ids).logits - build_model(packed)(input_ids=ids).logits).abs().max() < 1e-5


def test_blocks_quantized_from_given_hessians_in_forked_workers_match_this_process(tiny_model_dir, tiny_text_file,
                                                                                    tmp_path, monkeypatch):
    """With the original model's Hessians no block needs another's outputs, so blocks go to forked
    workers: the same layers bit for bit as one process at one thread, checkpointed, and a resumed
    run quantizes only the blocks it lacks."""
    from tightfit.stages.checkpoint import BlockCheckpoint

    loaded = load_model(str(tiny_model_dir))
    calib = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=4,
                                                                          seq_len=64, batch_size=4))
    hessians = calibrate_stage.collect_hessians(loaded, calib, progress=False)
    config = QuantizeConfig(fmt=QuantFormat.parse("w3g32"), method="gptq")
    threads, runs = torch.get_num_threads(), []
    for workers in (1, 2):
        monkeypatch.setattr(quantize_stage, "worker_count", lambda workers=workers: workers)
        torch.set_num_threads(1)  # as each worker runs
        try:
            runs.append(quantize_stage.quantize_model(loaded, None, config, hessians=hessians, progress=False,
                                                      checkpoint_dir=tmp_path / f"w{workers}"))
        finally:
            torch.set_num_threads(threads)
    one, two = runs
    assert list(one.layers) == list(two.layers) and len(one.layers) == 2 * len(loaded.arch.linear_names)
    for name, q in one.layers.items():
        assert torch.equal(q.codes, two.layers[name].codes) and torch.equal(q.scales, two.layers[name].scales), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(one.module(input_ids=ids).logits, two.module(input_ids=ids).logits)
    job = json.loads((tmp_path / "w2" / "job.json").read_text())
    assert all(BlockCheckpoint(tmp_path / "w2", job).done(i) for i in range(2))
    (tmp_path / "w2" / "block_001.json").unlink()  # as if killed before block 1 was saved
    swept = []
    real = quantize_stage._quantize_block
    monkeypatch.setattr(quantize_stage, "_quantize_block", lambda block, i, *a: swept.append(i) or real(block, i, *a))
    again = quantize_stage.quantize_model(loaded, None, config, hessians=hessians, progress=False,
                                          checkpoint_dir=tmp_path / "w2")
    assert swept == [1] and all(torch.equal(q.codes, two.layers[n].codes) for n, q in again.layers.items())


@pytest.mark.parametrize(("model_type", "tied_head"), [("gemma3_text", True), ("qwen2", False)])
def test_quantized_embeddings_round_trip(model_type, tied_head, make_tiny_model, tiny_text_file, tmp_path):
    folder = make_tiny_model(model_type, tmp_path)
    loaded = load_model(str(folder))
    config = QuantizeConfig(fmt=QuantFormat.parse("w4g64"), method="rtn", embed_format=QuantFormat.parse("w8g64"))
    qmodel = quantize_stage.quantize_model(loaded, None, config, progress=False)
    emb, head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    tied = emb.weight.data_ptr() == head.weight.data_ptr()
    assert tied == tied_head
    expected = {loaded.arch.embeddings} | (set() if tied else {loaded.arch.head})
    assert expected <= set(qmodel.layers)
    assert not any(k.startswith(loaded.arch.embeddings) for k in qmodel.kept)

    from tightfit.stages import pack as pack_stage

    out = pack_stage.write(pack_stage.pack(qmodel, loaded, None), loaded.tokenizer, tmp_path / "packed")
    packed = load_packed(out)
    ids = _ids()
    with torch.no_grad():
        a = qmodel.module(input_ids=ids).logits
        b = build_model(packed)(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    fp16 = QuantizeConfig(fmt=QuantFormat.parse("w4g64"), method="rtn")
    plain = pack_stage.pack(quantize_stage.quantize_model(loaded, None, fp16, progress=False), loaded, None)
    assert packed.kept_bytes() + packed.quantized_bytes() < plain.kept_bytes() + plain.quantized_bytes()

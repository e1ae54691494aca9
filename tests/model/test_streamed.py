"""A streamed model (blocks read from the files one at a time) computes what the whole model does:
the same quantized layers, Hessians, Fisher statistics, sensitivities and evaluation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODEL_TYPES

from tightfit.artifacts import CalibrationConfig, QuantizeConfig
from tightfit.evaluate import evaluate, reference_for
from tightfit.formats.registry import StoredTensor, parse_format
from tightfit.model import get_module, load_model, resident_block
from tightfit.model import load as load_module
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import pack as pack_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages.sensitivity import measure_sensitivity

SMALL_CALIB = dict(n_samples=4, seq_len=48, batch_size=2)


def _pair(model_type, make_tiny_model, tmp_path):
    folder = str(make_tiny_model(model_type, tmp_path))
    return load_model(folder, streamed=False), load_model(folder, streamed=True)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_streamed_quantization_equals_the_whole_model(model_type, make_tiny_model, tiny_text_file, tmp_path):
    whole, streamed = _pair(model_type, make_tiny_model, tmp_path)
    assert streamed.streamed and not whole.streamed
    blocks = get_module(streamed.model, streamed.arch.blocks)
    assert all(p.is_meta for p in blocks.parameters()), "a streamed model holds no block"
    calib = calibrate_stage.calibrate(whole.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    config = QuantizeConfig(fmt=parse_format("w3g32"), method="gptq", embed_format=parse_format("w8g32-sym"))
    a = quantize_stage.quantize_model(whole, calib, config, progress=False)
    b = quantize_stage.quantize_model(streamed, calib, config, progress=False)
    assert b.module is None and all(p.is_meta for p in blocks.parameters()), "blocks go back to the files"
    assert a.layers.keys() == b.layers.keys() and a.kept.keys() == b.kept.keys()
    for name in a.layers:
        assert torch.equal(a.layers[name].dequantize(), b.layers[name].dequantize()), name
        # a streamed model's layers are held packed: the same parts and bytes as the layer packs into
        assert isinstance(b.layers[name], StoredTensor) and not isinstance(a.layers[name], StoredTensor)
        assert b.layers[name].nbytes() == a.layers[name].nbytes()
        assert all(torch.equal(v, b.layers[name].pack()[k]) for k, v in a.layers[name].pack().items()), name
    for name in a.kept:
        assert torch.equal(a.kept[name], b.kept[name]), name
    assert pack_stage.pack(a, whole, calib.config).tied == pack_stage.pack(b, streamed, calib.config).tied


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_streamed_statistics_and_reference_equal_the_whole_model(model_type, make_tiny_model, tiny_text_file, tmp_path):
    whole, streamed = _pair(model_type, make_tiny_model, tmp_path)
    calib = calibrate_stage.calibrate(whole.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    h_whole = calibrate_stage.collect_hessians(whole, calib, progress=False)
    h_files = calibrate_stage.collect_hessians(streamed, calib, store=tmp_path / "h", progress=False)
    assert h_whole.hessians.keys() == set(h_files.hessians)
    assert all(torch.equal(h_whole.hessians[n], h_files.hessians[n]) for n in h_whole.hessians)
    again = calibrate_stage.load_hessian_files(tmp_path / "h", streamed, calib.config)
    assert again is not None and all(torch.equal(again.hessians[n], h_whole.hessians[n]) for n in h_whole.hessians)
    other = CalibrationConfig(text=str(tiny_text_file), **{**SMALL_CALIB, "n_samples": 2})
    assert calibrate_stage.load_hessian_files(tmp_path / "h", streamed, other) is None

    f_whole = calibrate_stage.collect_fisher(whole, calib, windows=2, progress=False)
    f_streamed = calibrate_stage.collect_fisher(streamed, calib, windows=2, progress=False)
    assert all(torch.equal(f_whole.outputs[n], f_streamed.outputs[n]) for n in f_whole.outputs)
    assert torch.equal(f_whole.embed_fisher, f_streamed.embed_fisher)

    formats = [parse_format("w2g32"), parse_format("w4g32")]
    t_whole = measure_sensitivity(whole, h_whole, formats, fisher=f_whole, progress=False)
    t_streamed = measure_sensitivity(streamed, h_files, formats, fisher=f_streamed, progress=False)
    assert t_whole.damages == t_streamed.damages

    windows = calib.tokens[:3]
    model = load_model(str(tmp_path / model_type), streamed=False).model
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.01)  # a candidate that differs from the reference
    ref = evaluate(model, windows, reference=reference_for(whole, windows), progress=False)
    replayed = evaluate(model, windows, reference=reference_for(streamed, windows), progress=False)
    assert ref.kl > 0 and replayed.kl == pytest.approx(ref.kl, rel=1e-5) and replayed.top1 == ref.top1


def test_resident_block_reads_and_releases(tiny_model_dir):
    whole, streamed = load_model(str(tiny_model_dir), streamed=False), load_model(str(tiny_model_dir), streamed=True)
    with resident_block(streamed, 1) as block:
        resident = {n: p.clone() for n, p in block.named_parameters()}
    original = dict(get_module(whole.model, whole.arch.blocks)[1].named_parameters())
    assert resident.keys() == original.keys() and all(torch.equal(resident[n], original[n]) for n in resident)
    assert all(p.is_meta for p in get_module(streamed.model, streamed.arch.blocks)[1].parameters())


def test_big_models_are_streamed_by_default(tiny_model_dir, monkeypatch):
    assert not load_model(str(tiny_model_dir)).streamed
    monkeypatch.setattr(load_module, "STREAM_ABOVE_BYTES", 0)
    assert load_model(str(tiny_model_dir)).streamed


def test_measured_sensitivity_refuses_a_streamed_model(tiny_model_dir, tiny_text_file):
    from tightfit.errors import InsufficientMemory

    streamed = load_model(str(tiny_model_dir), streamed=True)
    calib = calibrate_stage.calibrate(streamed.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    with pytest.raises(InsufficientMemory, match="needs the model in memory"):
        measure_sensitivity(streamed, None, [parse_format("w2g32")], method="measured", slice_tokens=calib.tokens[:1],
                            progress=False)

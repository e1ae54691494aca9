"""SmoothAttention: key scales folded into q_proj/k_proj leave the model's outputs unchanged (fp32),
share one scale per RoPE pair, follow the GQA grouping, fold the biases, flatten the keys; the
quantize config, the manifest and the CLI carry it; the engine's 4-bit KV cache, whose keys have a
grid per channel, neither gains nor loses by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_SHAPES, TINY_VOCAB_SIZE

from tightfit.algorithms.smooth_attention import DEFAULT_ALPHA, AttentionShape, fold_key_scales, key_scales
from tightfit.artifacts import CalibrationConfig, QuantizeConfig
from tightfit.cli import main
from tightfit.errors import UnsupportedArchitecture
from tightfit.evaluate import EvalConfig, eval_windows, evaluate_many, packed_candidate
from tightfit.formats import QuantFormat
from tightfit.formats.packed import MANIFEST_FILE, load_packed
from tightfit.model import architecture_for, get_module, load_model
from tightfit.model.architectures import ARCHITECTURES
from tightfit.pipeline import CompressRequest, compress
from tightfit.stages.quantize import check_smooth_attention, smooth_attention_obstacle, smooth_block

SMALL_CALIB = dict(n_samples=8, seq_len=64, batch_size=4)
SHAPE = AttentionShape(head_dim=TINY_SHAPES["head_dim"], n_heads=TINY_SHAPES["num_attention_heads"],
                       n_kv_heads=TINY_SHAPES["num_key_value_heads"], rotary_dim=TINY_SHAPES["head_dim"])


def _random_model(model_type: str) -> torch.nn.Module:
    """A tiny fp32 model with GQA and random q/k/v biases (llama given attention_bias)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY_SHAPES, vocab_size=TINY_VOCAB_SIZE, attention_bias=True)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for block in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(block.self_attn, name).bias
                assert bias is not None, (model_type, name)
                bias.normal_(0, 0.5)
    return model


def _key_max(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block: max |k_proj output| per channel [n_kv_heads * head_dim] over every token of ids."""
    seen: list[torch.Tensor] = []
    handles = [b.self_attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.detach().abs().reshape(-1, out.shape[-1]).amax(0)))
        for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fold_keeps_the_outputs_and_flattens_the_keys(model_type):
    model = _random_model(model_type)
    arch = architecture_for(model.config)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    key_max = _key_max(model, ids)
    shape = AttentionShape.of(model.config)
    assert shape == SHAPE
    for block, m in zip(model.model.layers, key_max):
        smooth_block(block, arch, shape, m, DEFAULT_ALPHA)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max().item() < 1e-5 * max(1.0, before.abs().max().item())
    # flatter: the spread (largest / smallest channel max) of every KV head's keys shrinks
    for m0, m1 in zip(key_max, _key_max(model, ids)):
        spread = lambda m: (m.reshape(SHAPE.n_kv_heads, -1).amax(1) / m.reshape(SHAPE.n_kv_heads, -1).amin(1))
        assert (spread(m1) < spread(m0)).all(), (spread(m0), spread(m1))


def test_rope_pairs_share_one_scale():
    key_max = torch.rand(SHAPE.n_kv_heads * SHAPE.head_dim, generator=torch.Generator().manual_seed(2)) + 0.1
    scales = key_scales(key_max, SHAPE, alpha=0.5)  # [Hkv, d]
    half = SHAPE.head_dim // 2
    m = key_max.reshape(SHAPE.n_kv_heads, SHAPE.head_dim)
    assert torch.equal(scales[:, :half], scales[:, half:])
    torch.testing.assert_close(scales[:, :half], torch.maximum(m[:, :half], m[:, half:]).sqrt())
    # partial rotary: channels past the rotary dims keep their own scale
    partial = AttentionShape(head_dim=SHAPE.head_dim, n_heads=SHAPE.n_heads, n_kv_heads=SHAPE.n_kv_heads, rotary_dim=16)
    s = key_scales(key_max, partial, alpha=1.0)
    assert torch.equal(s[:, :8], s[:, 8:16])
    torch.testing.assert_close(s[:, 16:], m[:, 16:])
    with pytest.raises(ValueError, match="alpha"):
        key_scales(key_max, SHAPE, alpha=1.5)


def test_gqa_grouping_and_biases():
    d, group = SHAPE.head_dim, SHAPE.n_heads // SHAPE.n_kv_heads
    query = torch.nn.Linear(8, SHAPE.n_heads * d, bias=True)
    key = torch.nn.Linear(8, SHAPE.n_kv_heads * d, bias=True)
    with torch.no_grad():
        for lin in (query, key):
            lin.weight.fill_(1.0)
            lin.bias.fill_(1.0)
    scales = torch.arange(1, SHAPE.n_kv_heads * d + 1, dtype=torch.float32).reshape(SHAPE.n_kv_heads, d)
    fold_key_scales(query, key, scales, SHAPE)
    for j in range(SHAPE.n_heads):  # query head j reads KV head j // group (transformers' repeat_kv)
        rows = slice(j * d, (j + 1) * d)
        torch.testing.assert_close(query.weight[rows, 0], scales[j // group])
        torch.testing.assert_close(query.bias[rows], scales[j // group])
    torch.testing.assert_close(key.weight[:, 0], 1 / scales.reshape(-1))
    torch.testing.assert_close(key.bias, 1 / scales.reshape(-1))


def test_unsupported_architectures_are_refused_with_a_reason():
    reasons = {arch.name: smooth_attention_obstacle(arch) for arch in ARCHITECTURES}
    assert reasons["llama"] is None and reasons["qwen2"] is None and reasons["mistral"] is None
    assert "q/k norms" in reasons["gemma3_text"]
    assert "fuses" in reasons["phi3"]
    gemma = next(a for a in ARCHITECTURES if a.name == "gemma3_text")
    with pytest.raises(UnsupportedArchitecture, match="SmoothAttention is not possible.*q/k norms"):
        check_smooth_attention(gemma)


def test_quantize_config_round_trips_and_checks_alpha():
    config = QuantizeConfig(fmt=QuantFormat.parse("w4g32"), smooth_attention=0.5)
    from tightfit.artifacts import config_to_json

    assert QuantizeConfig.from_json(config_to_json(config)) == config
    old = config_to_json(QuantizeConfig(fmt=QuantFormat.parse("w4g32")))
    del old["smooth_attention"]  # a config written before the field existed
    assert QuantizeConfig.from_json(old).smooth_attention is None
    with pytest.raises(ValueError, match="alpha"):
        QuantizeConfig(fmt=QuantFormat.parse("w4g32"), smooth_attention=2.0)


def test_cli_flag_parses_and_is_explained(capsys, make_tiny_model, tiny_text_file, tmp_path):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--smooth-attention [ALPHA]" in help_text and "SmoothAttention (QServe)" in help_text
    with pytest.raises(SystemExit):
        main(["compress", "x", "--format", "w4g32", "--out", str(tmp_path / "o"), "--smooth-attention", "3"])
    assert "between 0 and 1" in capsys.readouterr().err
    src = make_tiny_model("llama", tmp_path)
    assert main(["compress", str(src), "--format", "w4g32", "--method", "rtn", "--no-eval", "--calib-text", str(tiny_text_file),
                 "--calib-samples", "4", "--calib-len", "32", "--out", str(tmp_path / "l"), "--smooth-attention", "0.25"]) == 0
    assert json.loads((tmp_path / "l" / MANIFEST_FILE).read_text())["quantize"]["smooth_attention"] == 0.25
    capsys.readouterr()
    assert main(["info", str(tmp_path / "l")]) == 0
    assert "SmoothAttention alpha 0.25" in capsys.readouterr().out
    src = make_tiny_model("gemma3_text", tmp_path)
    rc = main(["compress", str(src), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(tmp_path / "g"),
               "--smooth-attention"])
    assert rc != 0
    assert "q/k norms" in capsys.readouterr().err


def _plant_key_outliers(folder: Path, channels: tuple[int, ...] = (3, 40), factor: float = 20.0,
                        sharpen: float = 6.0) -> None:
    """Scale a few key channels (and their RoPE partners) of every block by `factor` in k_proj and the
    matching query channels of their query heads by 1/factor: the same model, keys with outliers.
    Every query and key row is first scaled by `sharpen`: a random model's attention is nearly uniform,
    where key errors hardly matter; sharper scores make the keys count as in a trained model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    d, group = SHAPE.head_dim, SHAPE.n_heads // SHAPE.n_kv_heads
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight *= sharpen
            block.self_attn.k_proj.weight *= sharpen
            for c in channels:
                h, i = divmod(c, d)
                for ch in (i, (i + d // 2) % d):
                    block.self_attn.k_proj.weight[h * d + ch] *= factor
                    for j in range(h * group, (h + 1) * group):
                        block.self_attn.q_proj.weight[j * d + ch] /= factor
    model.save_pretrained(str(folder))


def test_smooth_attention_end_to_end_with_per_channel_kv4(make_tiny_model, tiny_text_file, tmp_path):
    """Planted x20 key channels, packed with and without the fold, scored through the engine at kv 16
    and kv 4. A per-token key grid lost half its KL to them and the fold won it back; the 4-bit keys
    now have a grid per channel (kv_cache.h), which a per-channel key scale only rescales: the fold
    changes KV4's KL by little either way."""
    src = make_tiny_model("llama", tmp_path)
    _plant_key_outliers(src)
    loaded = load_model(str(src))
    results = {}
    for alpha in (None, DEFAULT_ALPHA):
        out = tmp_path / f"packed-{alpha}"
        compress(CompressRequest(
            model=str(src), out=out,
            quantize=QuantizeConfig(fmt=QuantFormat.parse("w8g32"), method="rtn", smooth_attention=alpha),
            calibration=CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB), evaluation=None, progress=False,
        ), loaded)
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        assert manifest["quantize"]["smooth_attention"] == alpha  # the packed file says whether, and with which alpha
        assert (manifest["calibration"] is None) == (alpha is None)  # the key scales came from calibration text
        results[alpha] = load_packed(out)
    # the source is untouched by the fold (it works on a copy)
    torch.testing.assert_close(get_module(loaded.model, "model.layers.0.self_attn.k_proj").weight,
                               get_module(load_model(str(src)).model, "model.layers.0.self_attn.k_proj").weight)
    windows = eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=4, ctx=64))
    candidates = {f"{alpha}-{bits}": packed_candidate(p, "fast", ctx=windows.shape[1], kv_bits=bits)
                  for alpha, p in results.items() for bits in (16, 4)}
    got = evaluate_many(candidates, windows, reference=loaded.model, progress=False)
    kl = {k: v.kl for k, v in got.items()}
    # with a 16-bit cache the fold changes nothing that matters (w8 weights either way)
    assert abs(kl["0.5-16"] - kl["None-16"]) < 0.5 * kl["None-16"] + 1e-4, kl
    assert kl["None-4"] > 2 * kl["None-16"], kl  # the 4-bit cache costs something: a real comparison
    assert abs(kl["0.5-4"] - kl["None-4"]) < 0.25 * kl["None-4"], kl


def test_gptq_streamed_and_in_memory_fold_alike(make_tiny_model, tiny_text_file, tmp_path):
    """qwen2 (q/k/v biases), GPTQ: a streamed model (blocks read one at a time) folds exactly as the
    model in memory; the folded biases are the kept ones; the packed model still computes the original."""
    from tightfit.stages import calibrate as calibrate_stage
    from tightfit.stages import quantize as quantize_stage

    folder = str(make_tiny_model("qwen2", tmp_path))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.model.layers:
            for linear in (block.self_attn.q_proj, block.self_attn.k_proj):
                linear.bias.normal_(0, 0.5)  # the tiny model's are zeros: nothing to fold
    model.save_pretrained(folder)
    whole, streamed = load_model(folder, streamed=False), load_model(folder, streamed=True)
    calib = calibrate_stage.calibrate(whole.tokenizer, CalibrationConfig(text=str(tiny_text_file), **SMALL_CALIB))
    config = QuantizeConfig(fmt=QuantFormat.parse("w8g32"), method="gptq", smooth_attention=DEFAULT_ALPHA)
    a = quantize_stage.quantize_model(whole, calib, config, progress=False)
    b = quantize_stage.quantize_model(streamed, calib, config, progress=False)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        torch.testing.assert_close(a.layers[name].dequantize(), b.layers[name].dequantize(), rtol=1e-4, atol=1e-4)
    bias = "model.layers.1.self_attn.k_proj.bias"
    torch.testing.assert_close(a.kept[bias], b.kept[bias])
    original = get_module(whole.model, bias.removesuffix(".bias")).bias
    assert not torch.allclose(a.kept[bias], original), "the key bias was not folded"
    ids = torch.randint(4, TINY_VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(1))
    plain = quantize_stage.quantize_model(whole, calib, QuantizeConfig(fmt=config.fmt, method="gptq"), progress=False)
    with torch.no_grad():
        ref = whole.model(input_ids=ids).logits
        err_smooth = (a.module(input_ids=ids).logits - ref).abs().max().item()
        err_plain = (plain.module(input_ids=ids).logits - ref).abs().max().item()
    assert err_smooth < 3 * err_plain + 1e-4, (err_smooth, err_plain)  # w8 either way: the fold kept the function

"""GGUF export: exact mappings decode bit-exactly, approximate ones report their error, llama.cpp
and transformers load the file, and the CLI refuses bad requests in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tightfit.export.gguf import (
    BLOCK_TYPES,
    QK,
    decode,
    encode_layer,
    export_gguf,
    rope_row_permutation,
)
from tightfit.formats import QuantFormat
from tightfit.formats.packed import load_packed
from tightfit.formats.primitives import QuantizedTensor, quantize_rtn
from tightfit.runtime import build_model

gguf = pytest.importorskip("gguf")

EXACT = {"w4g32-sym": "Q4_0", "w8g32-sym": "Q8_0", "w4g32": "Q5_0", "w3g64": "Q4_0", "w2g128-sym": "Q4_0",
         "w6pc": "Q8_0", "w5g32-sym": "Q5_0"}


def _ids(n_tokens: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(3)
    return [1] + torch.randint(4, 384, (n_tokens - 1,), generator=g).tolist()  # BOS <s> first


def _reference_logits(packed_dir: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return build_model(load_packed(packed_dir))(input_ids=torch.tensor([ids])).logits[0].numpy()


def _written_weights(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> fp32 [N, K] decoded with gguf.quants.dequantize."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        n_cols = int(t.shape[0])  # GGUF lists ne0 (= K) first
        data = np.asarray(t.data)
        out[t.name] = decode(data, t.tensor_type.name).reshape(-1, n_cols)
    return out


def _metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ---- pure pieces ---------------------------------------------------------------------------------


def test_rope_permutation_matches_convert_hf_to_gguf():
    """Same rows as llama.cpp's LlamaModel.permute (reshape -> swapaxes -> reshape)."""
    w = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    for n_head in (1, 3):
        expected = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 8).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(w[rope_row_permutation(96, n_head)], expected)


@pytest.mark.parametrize("fmt,expected", sorted(EXACT.items()))
def test_exact_formats_choose_the_smallest_exact_type(fmt, expected):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    enc = encode_layer(quantize_rtn(w, QuantFormat.parse(fmt)))
    assert (enc.type_name, enc.exact, enc.max_abs_error) == (expected, True, 0.0)


def test_q4_1_and_q5_1_when_the_minimum_is_an_fp16_number():
    """_1 types store m = s * min(level) in fp16: exact when that product is an fp16 number (power-of-two
    scales here) and the level span exceeds what the cheaper symmetric type holds."""
    g = torch.Generator().manual_seed(1)
    for bits, expected in ((4, "Q4_1"), (5, "Q5_1")):
        fmt = QuantFormat(bits=bits, group_size=32)
        n, k = 16, 128
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.full((n, k // 32), float((1 << bits) - 1))  # levels q - z span -(2**b - 1) .. 0
        scales = 2.0 ** torch.randint(-10, -4, (n, k // 32), generator=g).float()
        enc = encode_layer(QuantizedTensor(fmt=fmt, codes=codes, scales=scales, zeros=zeros))
        assert (enc.type_name, enc.exact) == (expected, True)


@pytest.mark.parametrize("fmt,reason", [
    ("w4g16", "groups of 16 split"),
    ("w8g32", "8-bit asymmetric"),
    ("spqr-w3g16-s3-o1.0", "has no GGML equivalent"),
])
def test_approximate_formats_requantize_to_q8_0_and_measure_the_error(fmt, reason):
    from tightfit.algorithms.builders import quantize_rtn_any
    from tightfit.formats.registry import parse_format

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    t = quantize_rtn_any(w, parse_format(fmt))
    enc = encode_layer(t)
    assert enc.type_name == "Q8_0" and not enc.exact and reason in enc.note
    ours = t.dequantize().numpy()
    assert enc.max_abs_error == pytest.approx(float(np.abs(decode(enc.data, "Q8_0") - ours).max()), rel=1e-6)
    # Q8_0 rounds to half a step of absmax/127 per block of 32 (fp16 d adds a relative 2**-11)
    half_step = np.abs(ours).reshape(64, -1, QK).max(-1) / 127 / 2
    assert enc.max_abs_error <= float(half_step.max()) * (1 + 2**-10) + 1e-12


def test_ragged_rows_fall_back_to_f16():
    w = torch.randn(8, 80, generator=torch.Generator().manual_seed(0))  # 80 is not a multiple of 32
    enc = encode_layer(quantize_rtn(w, QuantFormat.parse("w4g16-sym")))
    assert enc.type_name == "F16" and "not a multiple" in enc.note


def test_block_types_are_ordered_by_bytes():
    sizes = [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[bt.name]][1] for bt in BLOCK_TYPES]
    assert sizes == sorted(sizes)


# ---- whole files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,fmt", [("llama", "w4g32-sym"), ("llama", "w8g32-sym"), ("qwen2", "w4g32"),
                                            ("mistral", "w4g32-sym")])
def test_written_file_decodes_to_our_weights(packed_tiny, tmp_path, model_type, fmt):
    packed_dir = packed_tiny(model_type, fmt)
    report = export_gguf(packed_dir, tmp_path / "m.gguf")
    packed = load_packed(packed_dir)
    cfg = packed.hf_config
    written = _written_weights(tmp_path / "m.gguf")
    assert all(t.exact and t.max_abs_error == 0.0 for t in report.tensors), [t for t in report.tensors if not t.exact]
    assert {t.target_type for t in report.tensors if t.source_format == fmt} == {EXACT[fmt]}
    by_name = {t.name: t.target_name for t in report.tensors}
    for layer, q in packed.layers.items():
        got = written[by_name[f"{layer}.weight"]]
        if model_type != "qwen2" and layer.endswith(("q_proj", "k_proj")):  # undo llama.cpp's rope row order
            heads = cfg["num_attention_heads"] if layer.endswith("q_proj") else cfg["num_key_value_heads"]
            got = got[np.argsort(rope_row_permutation(got.shape[0], heads))]
        np.testing.assert_array_equal(got, q.dequantize().numpy(), err_msg=layer)
    for name, t in packed.kept.items():
        np.testing.assert_array_equal(written[by_name[name]].reshape(t.shape), t.float().numpy(), err_msg=name)

    meta = _metadata(tmp_path / "m.gguf")
    arch = "qwen2" if model_type == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert meta[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert meta[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    # transformers saves the tiny tokenizer with its class's pre-tokenizer: GPT-2's regex, Qwen2's Split regex
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == {"llama": "gpt-2", "mistral": "gpt-2", "qwen2": "qwen2"}[model_type]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert "assistant" in meta["tokenizer.chat_template"]


def test_unquantized_model_exports_as_all_f32(packed_tiny, tmp_path):
    """A packed model with no quantized layer (every tensor kept in fp32, e.g. an original to hand to
    llama.cpp's quantizer) writes F32 tensors and general.file_type ALL_F32 (0, a falsy enum value)."""
    from tightfit.formats.packed import PackedModel

    packed_dir = packed_tiny("llama", "w4g32-sym")
    packed = load_packed(packed_dir)
    kept = {name: t.float() for name, t in packed.kept.items()}
    kept.update({f"{layer}.weight": q.dequantize() for layer, q in packed.layers.items()})
    original = PackedModel(layers={}, kept=kept, hf_config=packed.hf_config, tied=packed.tied, info=packed.info)
    report = export_gguf(packed_dir, tmp_path / "f32.gguf", packed=original)
    assert {t.target_type for t in report.tensors} == {"F32"}
    assert _metadata(tmp_path / "f32.gguf")["general.file_type"] == int(gguf.LlamaFileType.ALL_F32) == 0
    written = _written_weights(tmp_path / "f32.gguf")
    by_name = {t.name: t.target_name for t in report.tensors}
    layer = next(iter(packed.layers))
    got = written[by_name[f"{layer}.weight"]]
    if layer.endswith(("q_proj", "k_proj")):
        heads = packed.hf_config["num_attention_heads" if layer.endswith("q_proj") else "num_key_value_heads"]
        got = got[np.argsort(rope_row_permutation(got.shape[0], heads))]
    np.testing.assert_array_equal(got, kept[f"{layer}.weight"].numpy())


def test_tied_head_is_not_written(packed_tiny, tmp_path):
    """A tied head shares token_embd (llama.cpp uses it when `output` is absent)."""
    packed = load_packed(packed_tiny("qwen2", "w4g32-sym"))
    report = export_gguf(packed_tiny("qwen2", "w4g32-sym"), tmp_path / "m.gguf")
    names = {t.target_name for t in report.tensors}
    assert ("output.weight" in names) == ("lm_head.weight" not in packed.tied)


def test_transformers_reads_the_exported_gguf_back(packed_tiny, tmp_path):
    """The input side reads GGUF files of any type gguf dequantizes: our Q4_0 export loads as the same model
    (transformers undoes the q/k permutation), with a one-line warning that the input is already quantized."""
    from tightfit.errors import QuantizedSourceWarning
    from tightfit.model import load_model

    packed_dir = packed_tiny("llama", "w4g32-sym")
    export_gguf(packed_dir, tmp_path / "m.gguf")
    with pytest.warns(QuantizedSourceWarning, match=r"already quantized \(14 tensors Q4_0\)"):
        loaded = load_model(str(tmp_path / "m.gguf"))
    ids = _ids()
    with torch.no_grad():
        got = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, _reference_logits(packed_dir, ids), rtol=0, atol=1e-5)


# ---- llama.cpp ---------------------------------------------------------------------------------


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


# llama.cpp's CPU matmuls quantize the activations of a Q4_0 / Q8_0 matmul to 8 bits per block of 32
# (vec_dot_q4_0_q8_0, vec_dot_q8_0_q8_0) and keep the KV cache in fp16, so its logits differ from the
# fp32 reference even with identical weights. Measured on the tiny models: 0.032 - 0.036 x the std of
# the logits for the exact mappings; leaving out the q/k rope permutation gives 0.10, so 0.05 separates
# arithmetic from a wrong file. An approximate mapping may move the logits further by what its
# requantization changes, measured without llama.cpp: transformers reading the same file in fp32.
ARITHMETIC_TOLERANCE = 0.05  # x std(tightfit logits)


@pytest.mark.parametrize("model_type,fmt", [("llama", "w4g32-sym"), ("llama", "w8g32-sym"), ("qwen2", "w4g32-sym"),
                                            ("llama", "w4g16"), ("qwen2", "w4g16")])
def test_llama_cpp_logits_match_the_reference_model(packed_tiny, tmp_path, model_type, fmt):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    packed_dir = packed_tiny(model_type, fmt)
    report = export_gguf(packed_dir, tmp_path / "m.gguf")
    exact = all(t.exact for t in report.tensors)
    assert exact == (fmt != "w4g16")
    ids = _ids()
    ours = _reference_logits(packed_dir, ids)
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    mapping_shift = 0.0
    if not exact:
        import warnings

        from tightfit.model import load_model

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            as_written = load_model(str(tmp_path / "m.gguf")).model(input_ids=torch.tensor([ids])).logits[0].numpy()
        mapping_shift = float(np.abs(as_written - ours).max())
        assert mapping_shift > 0
    diff = float(np.abs(theirs - ours).max())
    assert diff < ARITHMETIC_TOLERANCE * ours.std() + mapping_shift, (diff, ours.std(), mapping_shift)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9

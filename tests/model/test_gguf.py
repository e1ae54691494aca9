"""tightfit.model.gguf: GGUF files load as the model transformers builds from them, bit for bit, and fast."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tightfit.errors import QuantizedSourceWarning
from tightfit.model import dequant as dequant_module
from tightfit.model import load_model, open_weights
from tightfit.model.checkpoint_files import StringArray, read_gguf_header
from tightfit.model.dequant import DECODERS, dequantize
from tightfit.model.gguf import gguf_config, gguf_config_dict, transformers_gguf_model

from tiny_models import TINY_MODEL_TYPES

from .tiny_gguf import all_f32, mixed_types, write_tiny_gguf

MakeTinyModel = Callable[[str, Path], Path]


@pytest.fixture(scope="module")
def tiny_ggufs(make_tiny_model: MakeTinyModel, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Factory (model_type, "f32" | "mixed") -> a tiny GGUF file, written once per module. Do not modify it."""
    root = tmp_path_factory.mktemp("tiny_ggufs")
    built: dict[tuple[str, str], Path] = {}

    def get(model_type: str, types: str) -> Path:
        if (model_type, types) not in built:
            folder = make_tiny_model(model_type, root / f"{model_type}-{types}")
            chooser = all_f32 if types == "f32" else mixed_types
            built[model_type, types] = write_tiny_gguf(folder, root / f"{model_type}-{types}.gguf", chooser)
        return built[model_type, types]

    return get


def test_header_holds_metadata_and_tensor_table(tiny_ggufs) -> None:
    import gguf

    path = tiny_ggufs("qwen2", "mixed")
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert header.metadata["general.architecture"] == "qwen2"
    assert header.metadata["qwen2.block_count"] == 2 and header.metadata["qwen2.embedding_length"] == 128
    assert header.metadata["tokenizer.ggml.tokens"] == StringArray(384)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape)) and ours.ggml_type == theirs.tensor_type
        assert (ours.offset, ours.nbytes) == (theirs.data_offset, theirs.n_bytes)
    assert header.data_end == path.stat().st_size


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_config_is_the_one_transformers_reads(model_type: str, tiny_ggufs) -> None:
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tiny_ggufs(model_type, "mixed")
    header = read_gguf_header(path)
    assert gguf_config_dict(header) == load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert gguf_config(header).to_dict() == theirs.to_dict()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_model_is_bit_exact_with_transformers(model_type: str, tiny_ggufs) -> None:
    """Every GGML type the file mixes (Q4_0 ... Q6_K, BF16, F16, F32), q/k un-permuted, Gemma norms - 1."""
    path = tiny_ggufs(model_type, "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedSourceWarning)
        ours = load_model(str(path)).model
    theirs = transformers_gguf_model(path)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), name
    buffers = dict(theirs.named_buffers())
    assert all(torch.equal(t, buffers[name]) for name, t in ours.named_buffers())
    assert ours.config.to_dict() == theirs.config.to_dict()
    assert ours.config._attn_implementation == theirs.config._attn_implementation
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])  # [1, T]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_f32_file_gives_back_the_source_weights(model_type: str, tiny_ggufs, make_tiny_model, tmp_path) -> None:
    """Without rounding, loading undoes exactly what the converter did (names, rope permutation, norm + 1)."""
    source = load_model(str(make_tiny_model(model_type, tmp_path))).model.state_dict()
    loaded = load_model(str(tiny_ggufs(model_type, "f32")))
    assert loaded.source.kind == "gguf"
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_tokenizer_is_the_one_transformers_builds(tiny_ggufs) -> None:
    from transformers import AutoTokenizer

    path = tiny_ggufs("llama", "mixed")
    with pytest.warns(QuantizedSourceWarning, match=r"already quantized \(.*tensors Q8_0.*\)"):
        ours = load_model(str(path)).tokenizer
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    text = "The cat sees the tall tree, and counts 42 of them!"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()


@pytest.mark.parametrize("decoders", ["tightfit", "gguf-py"])
def test_dequantize_in_chunks_equals_gguf_py(decoders: str, tiny_ggufs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 blocks (the last one short) give what gguf-py gives for the whole tensor, with
    tightfit's decoders and with gguf-py's own (the fallback for the types tightfit has none for)."""
    import gguf

    path = tiny_ggufs("qwen2", "mixed")
    header = read_gguf_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    monkeypatch.setattr(dequant_module, "CHUNK_ELEMENTS", 3 * 32)
    if decoders == "gguf-py":
        monkeypatch.setattr(dequant_module, "DECODERS", {})
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    seen = set()
    for info in header.tensors:
        ours = dequantize(raw[info.offset : info.offset + info.nbytes], info)
        theirs = gguf.quants.dequantize(reader[info.name].data, info.ggml_type).reshape(info.shape)
        assert ours.dtype == np.float32 and ours.flags.writeable and ours.flags.c_contiguous
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        seen.add(info.ggml_type.name)
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "BF16", "F16", "F32"} <= seen


@pytest.mark.parametrize("qtype", sorted(DECODERS, key=lambda t: t.name), ids=lambda t: t.name)
def test_decoders_are_bit_exact_on_random_blocks(qtype) -> None:
    """Every bit pattern of the quants, and finite fp16 scales of any size and sign."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, size=(1000, type_size), dtype=np.uint8)
    scale_fields = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}[qtype.name]
    for start in scale_fields:
        blocks[:, start : start + 2] = (rng.standard_normal(1000) * 10.0 ** rng.integers(-6, 4, 1000)).astype(
            np.float16).view(np.uint8).reshape(1000, 2)
    out = np.empty((1000, block_size), dtype=np.float32)
    DECODERS[qtype](blocks, out)
    theirs = gguf.quants.dequantize(blocks.reshape(1, -1), qtype).reshape(1000, block_size)
    np.testing.assert_array_equal(out.view(np.uint32), theirs.view(np.uint32))


def test_reading_one_tensor_maps_only_its_bytes(tiny_ggufs) -> None:
    weights = open_weights(str(tiny_ggufs("llama", "mixed")))
    first = weights.read("model.layers.0.self_attn.q_proj.weight")
    first.add_(1)  # owned, writable: not a view of the read-only map
    assert not torch.equal(first, weights.read("model.layers.0.self_attn.q_proj.weight"))

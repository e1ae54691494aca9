"""tightfit.model.weights: one block (or the embeddings, head, norm) read from the file equals the loaded model's."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tightfit.errors import QuantizedSourceWarning, UnsupportedArchitecture
from tightfit.model import get_module, load_model, open_weights

from tiny_models import TINY_MODEL_TYPES

from .tiny_gguf import mixed_types, write_tiny_gguf

MakeTinyModel = Callable[[str, Path], Path]


def _source(kind: str, model_type: str, make_tiny_model: MakeTinyModel, tmp_path: Path) -> Path:
    folder = make_tiny_model(model_type, tmp_path)
    return folder if kind == "safetensors" else write_tiny_gguf(folder, tmp_path / "m.gguf", mixed_types)


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_parts_equal_the_loaded_model(kind: str, model_type: str, make_tiny_model: MakeTinyModel,
                                      tmp_path: Path) -> None:
    path = _source(kind, model_type, make_tiny_model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedSourceWarning)
        loaded = load_model(str(path))
    weights = open_weights(str(path))
    model, arch = loaded.model, loaded.arch
    assert weights.arch == arch and weights.n_blocks == model.config.num_hidden_layers == 2
    settled_at_load = {"dtype"}
    assert ({k: v for k, v in weights.config.to_dict().items() if k not in settled_at_load}
            == {k: v for k, v in model.config.to_dict().items() if k not in settled_at_load})

    for i, block in enumerate(get_module(model, arch.blocks)):
        expected = dict(block.named_parameters())
        got = weights.block(i)
        assert got.keys() == expected.keys()
        for name, tensor in got.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), (i, name)
    embeddings, head = get_module(model, arch.embeddings).weight, get_module(model, arch.head).weight
    assert torch.equal(weights.embeddings(), embeddings) and torch.equal(weights.head(), head)
    assert weights.tied == (head is embeddings)
    norm = dict(get_module(model, arch.norm).named_parameters())
    got = weights.norm()
    assert got.keys() == norm.keys() and all(torch.equal(got[k], norm[k]) for k in got)
    assert weights.nbytes() == 4 * sum(p.numel() for p in model.parameters())


def test_block_index_is_checked(tiny_model_dir: Path) -> None:
    weights = open_weights(str(tiny_model_dir))
    with pytest.raises(IndexError, match="block 2 of a model with 2 blocks"):
        weights.block(2)


def test_open_weights_reads_no_tensor_and_checks_the_architecture(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'gpt2'"):
        open_weights(str(tmp_path))

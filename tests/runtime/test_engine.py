"""The compiled engine (FastBackend) against the torch reference on tiny models.

Dense layers run with exact fp32 activations, so a model whose layers are all dense checks the
engine's structure (norms, RoPE, attention over the cache, MLP, head) tightly against torch.
Quantized layers quantize their input to int8 in blocks of 32 (each kernel is exact for that, see
test_kernels.py); across layers the rounding of a few activations flips with fp32 summation order,
so whole-model checks of quantized models use a tolerance and argmax agreement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tightfit.cli import main
from tightfit.errors import KernelUnavailable
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.runtime import kernels
from tightfit.runtime.engine import FastBackend, open_backend
from tightfit.runtime.model import QuantLinear, build_model
from tightfit.runtime.torch_backend import TorchBackend

ENGINE_TYPES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def packed_mixed(make_tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Per architecture: a tiny model packed in w3g32 with w8g32-sym embeddings (and head)."""
    out = {}
    for mt in ENGINE_TYPES:
        root = tmp_path_factory.mktemp(f"engine_{mt}")
        src = make_tiny_model(mt, root)
        rc = main(["compress", str(src), "--format", "w3g32", "--embed-format", "w8g32-sym", "--method", "rtn",
                   "--no-eval", "--out", str(root / "packed")])
        assert rc == 0
        out[mt] = root / "packed"
    return out


def _act_quantized_reference(packed) -> torch.nn.Module:
    model = build_model(packed)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.register_forward_pre_hook(lambda mod, args: (kernels.quantize_activations(args[0].reshape(-1, args[0].shape[-1])).view_as(args[0]),))
    return model


def _dense(packed: PackedModel) -> PackedModel:
    """The same model with every quantized layer stored as its dequantized fp32 weight."""
    kept = dict(packed.kept)
    for name, q in packed.layers.items():
        kept[f"{name}.weight"] = q.dequantize()
    return PackedModel(layers={}, kept=kept, hf_config=packed.hf_config, tied=packed.tied, info=packed.info)


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("model_type", ENGINE_TYPES)
def test_engine_structure_matches_torch_exactly(model_type, packed_mixed):
    """All-dense model: prefill in chunks, then token by token, equals the torch forward."""
    packed = _dense(load_packed(packed_mixed[model_type]))
    ids = _ids(40)
    with torch.no_grad():
        ref = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16)
    got = torch.cat([engine.forward_all(ids[:23]), torch.stack([engine.forward([t]).clone() for t in ids[23:]])])
    assert (got - ref).abs().max() / ref.abs().max() < 2e-3  # fp16 KV cache (as llama.cpp); a wrong structure gives O(1)


@pytest.mark.parametrize("model_type", ENGINE_TYPES)
@pytest.mark.parametrize("fixture", ["packed_mixed", "make_packed"])
def test_engine_quantized_matches_reference(model_type, fixture, request):
    path = request.getfixturevalue(fixture)
    path = path[model_type] if isinstance(path, dict) else path(model_type)
    packed = load_packed(path)
    ids = _ids(40)
    with torch.no_grad():
        ref = _act_quantized_reference(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
        exact = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16)
    got = torch.cat([engine.forward_all(ids[:23]), torch.stack([engine.forward([t]).clone() for t in ids[23:]])])
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 3e-2
    assert (got - exact).abs().max() / scale < 0.1
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_engine_truncate_and_reset(packed_mixed):
    engine = FastBackend(load_packed(packed_mixed["llama"]), max_positions=64, threads=2)
    ids = _ids(20, seed=3)
    full = engine.forward(ids).clone()
    engine.truncate(12)
    assert engine.position == 12
    again = engine.forward(ids[12:]).clone()
    engine.reset()
    fresh = engine.forward(ids).clone()
    assert torch.equal(full, again) and torch.equal(full, fresh)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        engine.forward(_ids(60))


def test_engine_greedy_matches_torch_backend(packed_mixed):
    """Token-for-token greedy agreement with the torch backend over a short generation (dense)."""
    packed = _dense(load_packed(packed_mixed["qwen2"]))
    fast = FastBackend(packed, max_positions=64, threads=2)
    ref = TorchBackend(build_model(packed), max_positions=64)
    a, b = fast.forward(_ids(8)), ref.forward(_ids(8))
    seq_a, seq_b = [], []
    for _ in range(24):
        ta, tb = int(a.argmax()), int(b.argmax())
        seq_a.append(ta), seq_b.append(tb)
        a, b = fast.forward([ta]), ref.forward([tb])
    assert seq_a == seq_b


@pytest.mark.parametrize("model_type", ENGINE_TYPES)
def test_exact_engine_greedy_matches_dequantized_reference(model_type, packed_mixed):
    """Quantized generation, token for token, equals the dequantized torch reference (exact mode)."""
    packed = load_packed(packed_mixed[model_type])
    fast = FastBackend(packed, max_positions=64, threads=2, exact=True)
    ref = TorchBackend(build_model(packed), max_positions=64)
    for seed in range(3):
        fast.reset(), ref.reset()
        a, b = fast.forward(_ids(6, seed)), ref.forward(_ids(6, seed))
        assert (a - b).abs().max() / b.abs().max() < 2e-3
        seq_a, seq_b = [], []
        for _ in range(16):
            ta, tb = int(a.argmax()), int(b.argmax())
            seq_a.append(ta), seq_b.append(tb)
            a, b = fast.forward([ta]), ref.forward([tb])
        assert seq_a == seq_b


def test_unsupported_architecture_falls_back(make_packed):
    with pytest.raises(KernelUnavailable, match="fast engine runs"):
        FastBackend(load_packed(make_packed("phi3")), max_positions=32)
    with pytest.warns(UserWarning, match="torch reference"):
        backend = open_backend(make_packed("phi3"), engine="auto", max_positions=32)
    assert isinstance(backend, TorchBackend)


def test_grid_formats_run_on_the_engine_kernels(make_tiny_model, tmp_path):
    """A model packed in a fixed non-uniform grid (nl4 linears, nf4 embeddings and head) runs on the
    quantized kernels, not the dense fallback, and matches the reference like uniform formats do."""
    src = make_tiny_model("llama", tmp_path)
    rc = main(["compress", str(src), "--format", "nl4g32", "--embed-format", "nf4g32", "--method", "rtn",
               "--no-eval", "--out", str(tmp_path / "packed")])
    assert rc == 0
    packed = load_packed(tmp_path / "packed")
    assert {q.fmt.name for q in packed.layers.values()} == {"nl4g32", "nf4g32"}
    ids = _ids(30)
    with torch.no_grad():
        ref = _act_quantized_reference(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16)
    assert engine.slow_layers == []
    got = torch.cat([engine.forward_all(ids[:17]), torch.stack([engine.forward([t]).clone() for t in ids[17:]])])
    assert (got - ref).abs().max() / ref.abs().max() < 3e-2
    exact = FastBackend(packed, max_positions=64, threads=2, exact=True)
    with torch.no_grad():
        dequantized = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]
    assert (exact.forward_all(ids) - dequantized).abs().max() / dequantized.abs().max() < 2e-3

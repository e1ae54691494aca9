"""The compiled engine (FastBackend) against the torch reference on tiny models of every
architecture, native (AVX-512 VNNI where the CPU has it) and portable (scalar) builds.

Dense layers run with exact fp32 activations, so a model whose layers are all dense checks the
engine's structure (norms, RoPE, attention over the cache, MLP, head) tightly against torch; its
norm weights are randomized first, so that a norm read from the wrong tensor shows. Quantized
layers quantize their input to int8 in blocks of 32 (each kernel is exact for that, see
test_kernels.py); across layers the rounding of a few activations flips with fp32 summation order,
so whole-model checks of quantized models use a tolerance and argmax agreement.

The tiny gemma3_text model has a sliding-window layer (window 16) beside a full one; runs longer
than window + max_batch wrap its KV ring. VARIANTS change config values the tiny models leave at
their defaults (attention scale, final soft-cap, Phi-3's partial rotary longrope and window).
"""

from __future__ import annotations

import gc
import re
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_EXTRA_CONFIG, TINY_MODEL_TYPES, TINY_SHAPES, TINY_VOCAB_SIZE
from tightfit.cli import main
from tightfit.errors import GenerationError, KernelUnavailable
from tightfit.formats.packed import PackedModel, load_packed
import tightfit.runtime.engine as engine_module
from tightfit.runtime import kernels
from tightfit.runtime.engine import FastBackend, open_backend
from tightfit.runtime.kernels import build
from tightfit.runtime.model import QuantLinear, build_model
from tightfit.runtime.torch_backend import TorchBackend

ENGINE_TYPES = TINY_MODEL_TYPES
BUILDS = [pytest.param(False, id="native"), pytest.param(True, id="portable")]
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]}
VARIANTS = {
    "gemma3_text": {"query_pre_attn_scalar": 20, "final_logit_softcapping": 3.0},
    "phi3": {"rope_parameters": LONGROPE, "original_max_position_embeddings": 128, "sliding_window": 16},
}


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


def _random_norms(packed: PackedModel) -> PackedModel:
    """The same model with every RMSNorm weight (1-D, named *norm.weight) perturbed at random."""
    g = torch.Generator().manual_seed(1)
    kept = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.endswith("norm.weight") else v for k, v in packed.kept.items()}
    return PackedModel(layers=packed.layers, kept=kept, hf_config=packed.hf_config, tied=packed.tied, info=packed.info)


def _variant(packed: PackedModel, changes: dict) -> PackedModel:
    """The same weights under a changed config."""
    return PackedModel(layers=packed.layers, kept=packed.kept, hf_config={**packed.hf_config, **changes},
                       tied=packed.tied, info=packed.info)


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _structure_error(packed: PackedModel, portable: bool) -> float:
    """Relative max error of the engine's logits against the torch forward over 40 tokens: prefill
    in chunks of 16 (sliding windows of 16 wrap their ring of 32), then token by token."""
    ids = _ids(40)
    with torch.no_grad():
        ref = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16, portable=portable)
    got = torch.cat([engine.forward_all(ids[:23]), torch.stack([engine.forward([t]).clone() for t in ids[23:]])])
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", ENGINE_TYPES)
def test_engine_structure_matches_torch_exactly(model_type, portable, packed_mixed):
    """All-dense model: prefill in chunks, then token by token, equals the torch forward."""
    packed = _random_norms(_dense(load_packed(packed_mixed[model_type])))
    assert _structure_error(packed, portable) < 2e-3  # fp16 KV cache (as llama.cpp); a wrong structure gives O(1)


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", sorted(VARIANTS))
def test_engine_structure_of_config_variants(model_type, portable, packed_mixed):
    """Gemma3 with its own attention scale and a final logit soft-cap; Phi-3 with partial rotary
    longrope (short factors within the original 128 positions) and a sliding window on every layer."""
    packed = _random_norms(_dense(load_packed(packed_mixed[model_type])))
    changed = _variant(packed, VARIANTS[model_type])
    assert _structure_error(changed, portable) < 2e-3
    assert _structure_error(packed, portable) < 2e-3  # (the variant's reference really differs:)
    with torch.no_grad():
        ids = torch.tensor([_ids(40)])
        assert (build_model(changed)(input_ids=ids).logits - build_model(packed)(input_ids=ids).logits).abs().max() > 0.1


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
def test_engine_structure_with_heads_of_64(model_type, portable):
    """Heads of 64 take attention's narrower AVX-512 value passes (4 chunks of 16 dims, two positions
    per step); with a window of 16 on every layer (mistral) or one (gemma3) it reads rings that wrap."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {**TINY_SHAPES, **TINY_EXTRA_CONFIG[model_type], "head_dim": 64, "sliding_window": 16}
    config = AutoConfig.for_model(model_type, vocab_size=TINY_VOCAB_SIZE, **shapes)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    packed = PackedModel(layers={}, kept={k: v for k, v in state.items() if k not in tied}, hf_config=config.to_dict(), tied=tied)
    assert _structure_error(_random_norms(packed), portable) < 2e-3


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", ENGINE_TYPES)
@pytest.mark.parametrize("fixture", ["packed_mixed", "make_packed"])
def test_engine_quantized_matches_reference(model_type, fixture, portable, request):
    path = request.getfixturevalue(fixture)
    path = path[model_type] if isinstance(path, dict) else path(model_type)
    packed = load_packed(path)
    ids = _ids(40)
    with torch.no_grad():
        ref = _act_quantized_reference(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
        exact = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16, portable=portable)
    got = torch.cat([engine.forward_all(ids[:23]), torch.stack([engine.forward([t]).clone() for t in ids[23:]])])
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 3e-2
    assert (got - exact).abs().max() / scale < 0.1
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


@pytest.mark.parametrize("threads", [2, 5])
@pytest.mark.parametrize("model_type", ENGINE_TYPES)
def test_own_barrier_gives_openmps_logits(model_type, threads, packed_mixed, monkeypatch):
    """The engine's threads and barrier (kernels/threads.h: a Team kept across calls) against
    OpenMP's region and barrier (the TF_BARRIER=0 build, the engine before), its own barrier in
    OpenMP's region (TF_BARRIER=1) and itself sleeping at once (every wait takes the futex path):
    bit-identical logits, prefill and decode, at 2 threads and at 5 (more than this machine's
    cores), and equal to one thread's (Pace may run a decode call on thread 0 alone). Portable
    builds: the barrier is the same code in every instruction set's build."""
    packed = load_packed(packed_mixed[model_type])
    ids = _ids(40)

    def logits(defines: tuple[str, ...], threads: int = threads) -> torch.Tensor:
        lib = build.load(portable=True, defines=defines)
        monkeypatch.setattr(engine_module, "load", lambda portable=False: lib)  # as bench/kernel_ab.py runs a build
        engine = FastBackend(packed, max_positions=64, threads=threads, max_batch=16)
        return torch.cat([engine.forward_all(ids[:23]), torch.stack([engine.forward([t]).clone() for t in ids[23:]])])

    ours = logits(())
    assert torch.equal(logits((), threads=1), ours)
    for defines in [("TF_BARRIER=0",), ("TF_BARRIER=1",), ("TF_BARRIER_SPIN_US=0", "TF_BARRIER_YIELD_US=0")]:
        assert torch.equal(logits(defines), ours), defines


def _process_threads() -> int:
    return int(re.search(r"Threads:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads in /proc")
def test_freed_engines_leave_no_threads(packed_mixed):
    """An engine keeps its worker threads (threads.h's Team) until it is freed: many engines
    created, run and dropped leave the process with the threads it had."""
    packed = load_packed(packed_mixed["llama"])
    FastBackend(packed, max_positions=64, threads=4).forward([5, 6, 7])  # torch's and OpenMP's pools started
    gc.collect()
    before = _process_threads()
    for _ in range(10):
        FastBackend(packed, max_positions=64, threads=4).forward([5, 6, 7])
    gc.collect()
    assert _process_threads() == before


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
    with pytest.raises(GenerationError, match="KV cache overflow"):  # the torch backend's error, word for word
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


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", ENGINE_TYPES)
def test_exact_engine_greedy_matches_dequantized_reference(model_type, portable, packed_mixed):
    """Quantized generation, token for token, equals the dequantized torch reference (exact mode)."""
    packed = load_packed(packed_mixed[model_type])
    fast = FastBackend(packed, max_positions=64, threads=2, exact=True, portable=portable)
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


def _greedy(backend, prompt: list[int], n: int) -> list[int]:
    logits, out = backend.forward(prompt), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = backend.forward([out[-1]])
    return out


@pytest.mark.parametrize("portable", BUILDS)
def test_sliding_window_ring_runs_past_the_window(portable, packed_mixed):
    """Gemma3's sliding layer keeps a ring of window + max_batch - 1 positions (rounded up to 16):
    a generation four times longer than that equals the reference token for token (exact mode), the
    cache holds the ring, not the context, and a truncation back past the ring's reach runs the
    kept tokens again and then continues as a fresh cache would."""
    packed = load_packed(packed_mixed["gemma3_text"])
    fast = FastBackend(packed, max_positions=512, threads=2, max_batch=4, exact=True, portable=portable)
    ref = TorchBackend(build_model(packed), max_positions=512)
    prompt = _ids(6, seed=5)
    seq = _greedy(fast, prompt, 90)
    assert seq == _greedy(ref, prompt, 90)
    cfg = packed.hf_config
    kv_heads, head_dim = cfg["num_key_value_heads"], cfg["head_dim"]
    ring = -(-(cfg["sliding_window"] + 4 - 1) // 16) * 16  # 32 positions
    assert fast.kv_bytes == (ring + 512) * kv_heads * head_dim * 2 * 2  # sliding + full layer, fp16 K and V
    kept, cont = (prompt + seq)[:10], _ids(6, seed=6)
    fast.truncate(10)  # 86 positions back: the ring of 32 has long overwritten what position 10 reads
    ref.truncate(10)
    assert _greedy(fast, cont, 20) == _greedy(ref, cont, 20)
    fast.truncate(10)
    fresh = FastBackend(packed, max_positions=512, threads=2, max_batch=4, exact=True, portable=portable)
    fresh.forward(kept)
    assert torch.equal(fast.forward(cont).clone(), fresh.forward(cont))


def test_auto_runs_every_architecture_on_the_engine(make_packed):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for model_type in ENGINE_TYPES:
            assert isinstance(open_backend(make_packed(model_type), engine="auto", max_positions=32), FastBackend)


def test_unsupported_architecture_falls_back(make_packed):
    """What the engine cannot run is refused saying what; engine="auto" then warns and runs torch."""
    longrope = _variant(load_packed(make_packed("phi3")), VARIANTS["phi3"])
    with pytest.raises(KernelUnavailable, match="longrope RoPE within the original 128 positions"):
        FastBackend(longrope, max_positions=256)
    with pytest.warns(UserWarning, match="longrope .* running the torch reference engine"):
        backend = open_backend(longrope, engine="auto", max_positions=256)
    assert isinstance(backend, TorchBackend)
    with pytest.raises(KernelUnavailable, match="fast engine runs llama, mistral, qwen2, gemma3_text, phi3 models, not 'gpt2'"):
        FastBackend(_variant(longrope, {"model_type": "gpt2"}), max_positions=32)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # phi3: fused qkv and gate_up, split by rows at load
@pytest.mark.parametrize("linear, embed", [("nl4g32", "nf4g32"), ("lut4g32-row", "lut4g32"), ("lut3g64", "lut3g32-row"),
                                          ("lut2g32-row", "lut2g32"), ("w3g16-dq", "w4g32-sym-dq"),
                                          ("nl4g32-dq", "lut4g32-row-dq"), ("lut3g32-dq", "lut2g32-row-dq")])
def test_grid_formats_run_on_the_engine_kernels(linear, embed, model_type, make_tiny_model, tmp_path):
    """A model packed in a fixed non-uniform grid (nl4 linears, nf4 embeddings and head), or in
    learned tables (per row, per tensor), or with double-quantized scales (-dq: expanded to the base
    format's fp16 scales at load), runs on the quantized kernels, not the dense fallback, and
    matches the reference like uniform formats do; a fused projection's parts keep their rows' tables."""
    src = make_tiny_model(model_type, tmp_path)
    rc = main(["compress", str(src), "--format", linear, "--embed-format", embed, "--method", "rtn",
               "--no-eval", "--out", str(tmp_path / "packed")])
    assert rc == 0
    packed = load_packed(tmp_path / "packed")
    assert {q.fmt.name for q in packed.layers.values()} == {linear, embed}
    ids = _ids(30)
    with torch.no_grad():
        ref = _act_quantized_reference(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16)
    assert engine.slow_layers == []
    got = torch.cat([engine.forward_all(ids[:17]), torch.stack([engine.forward([t]).clone() for t in ids[17:]])])
    assert (got - ref).abs().max() / ref.abs().max() < 3e-2


@pytest.fixture(scope="module")
def spqr_packed(make_tiny_model, tmp_path_factory):
    """`spqr_packed(model_type) -> PackedModel` in spqr-w3g16-s3-o1.0 (RTN), built once per module."""
    built = {}

    def get(model_type: str) -> PackedModel:
        if model_type not in built:
            root = tmp_path_factory.mktemp(f"spqr_{model_type}")
            src = make_tiny_model(model_type, root)
            rc = main(["compress", str(src), "--format", "spqr-w3g16-s3-o1.0", "--method", "rtn", "--no-eval", "--out", str(root / "packed")])
            assert rc == 0
            built[model_type] = load_packed(root / "packed")
        return built[model_type]

    return get


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # phi3: fused qkv and gate_up, split by rows at load
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_spqr_runs_on_the_engine_kernels(spqr_packed, model_type, portable):
    """A model packed in SpQR (quantized statistics, 1 % outliers) runs on the SpQR kernel, not the
    dense fallback, and matches the reference like uniform formats do."""
    packed = spqr_packed(model_type)
    assert {q.fmt.name for q in packed.layers.values()} == {"spqr-w3g16-s3-o1.0"}
    assert all(q.n_outliers > 0 for q in packed.layers.values())
    ids = _ids(30)
    with torch.no_grad():
        ref = _act_quantized_reference(packed)(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    engine = FastBackend(packed, max_positions=64, threads=2, max_batch=16, portable=portable)
    assert engine.slow_layers == []
    got = torch.cat([engine.forward_all(ids[:17]), torch.stack([engine.forward([t]).clone() for t in ids[17:]])])
    assert (got - ref).abs().max() / ref.abs().max() < 3e-2
    exact = FastBackend(packed, max_positions=64, threads=2, exact=True)
    with torch.no_grad():
        dequantized = build_model(packed)(input_ids=torch.tensor([ids])).logits[0]
    assert (exact.forward_all(ids) - dequantized).abs().max() / dequantized.abs().max() < 2e-3


@pytest.mark.parametrize("damage", [None, "no entries", "columns past K", "masks short of the entries"])
def test_engine_create_checks_spqr_outlier_slices(spqr_packed, damage):
    """tf_engine_create refuses a matrix whose outlier slices are inconsistent (TF_E_SHAPE), before any
    kernel reads them: a missing array, a column >= K, masks whose bits do not count the tile's entries."""
    import ctypes

    from tightfit.runtime.engine import TfConfig, TfLayer

    engine = FastBackend(spqr_packed("llama"), max_positions=64, threads=2)
    config = TfConfig.from_buffer_copy(engine._config)
    layers = (TfLayer * config.n_layers)()
    ctypes.memmove(layers, config.layers, ctypes.sizeof(TfLayer) * config.n_layers)
    config.layers = ctypes.cast(layers, ctypes.POINTER(TfLayer))
    q = layers[0].q
    nnz, slices = ctypes.cast(q.outlier_entries, ctypes.POINTER(ctypes.c_int32)), ctypes.cast(q.outlier_tiles, ctypes.POINTER(ctypes.c_int32))
    tiles = (q.N + 15) // 16
    junk = torch.full((max(nnz[tiles], slices[tiles]),), -1 if damage == "columns past K" else 0, dtype=torch.int16)
    if damage == "no entries":
        q.outlier_entries = None
    elif damage == "columns past K":
        q.outlier_cols = junk.data_ptr()  # u16 0xFFFF
    elif damage:
        q.outlier_masks = junk.data_ptr()  # no bits: no entries counted
    layers[0].q = q
    lib, handle = build.load(), ctypes.c_void_p()
    rc = lib.tf_engine_create(ctypes.addressof(config), ctypes.byref(handle))
    if damage is None:  # the copy as it is: accepted
        assert rc == 0 and handle.value
        lib.tf_engine_free(handle)
    else:
        assert rc == -3 and not handle.value

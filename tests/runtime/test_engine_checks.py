"""Nothing reaches the C++ engine that does not fit config.json: every size is checked in Python
(runtime/engine_checks.py) and again by tf_engine_create, which returns an error code (native and
portable builds); a wrong config.json is a one-line error from `tightfit generate`, on both engines."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import re
import resource
import shutil
from pathlib import Path

import pytest
import torch

from fuzz_inputs import reseal
from fuzz_runner import judge
from tightfit.cli import main
from tightfit.errors import KernelUnavailable, PackedModelError
from tightfit.formats.packed import load_packed, manifest_sha256
from tightfit.runtime.engine import FastBackend, TfConfig, TfLayer
from tightfit.runtime.engine_config import layout_for
from tightfit.runtime.engine_checks import CREATE_ERRORS, validate_packed_for_engine
from tightfit.runtime.kernels.build import load
from tightfit.runtime.model import transformers_config

BUILDS = [pytest.param(False, id="native"), pytest.param(True, id="portable")]
SHAPE = r"but config\.json \(.*\) implies"


def _edited(packed: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a packed folder with config.json changed and its checksums recomputed (as a careless tool would)."""
    folder = Path(shutil.copytree(packed, tmp_path / "edited"))
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    reseal(folder)
    return folder


@pytest.mark.parametrize("engine", ["fast", "torch"])
@pytest.mark.parametrize("change, fast, torch_", [
    ({"vocab_size": 1000}, rf"model\.embed_tokens is \[384, 128\], {SHAPE} \[1000, 128\]", r"is \[384, 128\], but config\.json gives the model \[1000, 128\]"),
    ({"intermediate_size": 512}, rf"mlp\.gate_proj is \[256, 128\], {SHAPE} \[512, 128\]", r"is \[\d+, \d+\], but config\.json gives the model \[\d+, \d+\]"),
    ({"head_dim": 1024}, rf"q_proj is \[128, 128\], {SHAPE} \[4096, 128\]", r"is \[\d+, 128\], but config\.json gives the model \[\d+, 128\]"),
    ({"num_key_value_heads": 0}, r"num_key_value_heads must be a positive whole number, got 0", r"does not build a model: ZeroDivisionError"),
    ({"num_hidden_layers": 1}, r"holds model\.layers\.1\.\S+, but config\.json says num_hidden_layers 1", r"num_hidden_layers 1, the tensors hold 2 blocks"),
    ({"num_hidden_layers": 2**31 - 1}, r"lacks model\.layers\.2\.input_layernorm\.weight", r"num_hidden_layers 2147483647, the tensors hold 2"),
])
def test_a_config_that_does_not_fit_the_tensors_is_one_line(change, fast, torch_, engine, packed_llama, tmp_path, capsys):
    """The issue's cases: with vocab_size or intermediate_size edited, generate printed garbage; with head_dim 1024
    it never returned. Now both engines refuse before running, naming the tensor and the config values."""
    folder = _edited(packed_llama, tmp_path, **change)

    rc = main(["generate", str(folder), "the cat", "--max-tokens", "2", "--engine", engine])

    captured = capsys.readouterr()
    result = judge(rc, captured.out, captured.err, None)
    assert result.outcome == "error", result
    assert re.search(fast if engine == "fast" else torch_, result.line), result.line


def test_head_dim_above_the_engines_limit_falls_back_to_torch(packed_llama):
    packed = load_packed(packed_llama)
    config, layout = transformers_config(packed), layout_for("llama")
    assert validate_packed_for_engine(packed, config, layout, max_head_dim=32).head_dim == 32
    with pytest.raises(KernelUnavailable, match=r"head_dim up to 16, this model has 32; use --engine torch"):
        validate_packed_for_engine(packed, config, layout, max_head_dim=16)


@pytest.mark.parametrize("name, tensor, pattern", [
    ("model.layers.0.self_attn.q_proj.bias", torch.zeros(127), r"q_proj\.bias is \[127\], but .* has 128 rows"),
    ("model.layers.1.post_attention_layernorm.weight", torch.ones(129), rf"post_attention_layernorm\.weight is \[129\], {SHAPE} \[128\]"),
    ("model.norm.weight", torch.ones(4, 32), rf"model\.norm\.weight is \[4, 32\], {SHAPE} \[128\]"),
])
def test_every_vector_the_engine_reads_is_checked(name, tensor, pattern, packed_llama):
    packed = load_packed(packed_llama)
    packed.kept[name] = tensor
    with pytest.raises(PackedModelError, match=pattern):
        FastBackend(packed, max_positions=32)


def test_a_tied_head_pointing_at_a_vector_is_refused(packed_llama):
    packed = dataclasses.replace(load_packed(packed_llama), tied={"lm_head.weight": "model.norm.weight"})
    packed.kept.pop("lm_head.weight", None)
    with pytest.raises(PackedModelError, match=rf"lm_head is \[128\], {SHAPE} \[384, 128\]"):
        FastBackend(packed, max_positions=32)


# ---- tf_engine_create: the C++ side of the same checks --------------------------------------------


@pytest.fixture(scope="module")
def engine(packed_llama) -> FastBackend:
    """A valid engine; its TfConfig (and the tensors it points into) is copied and damaged below."""
    return FastBackend(load_packed(packed_llama), max_positions=32, threads=2)


def _create(portable: bool, config: TfConfig) -> int:
    lib = load(portable)
    handle = ctypes.c_void_p()
    rc = lib.tf_engine_create(ctypes.addressof(config), ctypes.byref(handle))
    assert (rc == 0) == bool(handle.value)
    if handle.value:
        lib.tf_engine_free(handle)
    return rc


def _damaged_layers(config: TfConfig, edit) -> ctypes.Array:
    """A copy of config's layer array with edit(layers) applied; config points at it."""
    n = config.n_layers
    layers = (TfLayer * n)()
    ctypes.memmove(layers, config.layers, ctypes.sizeof(TfLayer) * n)
    edit(layers)
    config.layers = ctypes.cast(layers, ctypes.POINTER(TfLayer))
    return layers


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("field, value, code", [
    (None, None, 0),
    ("head_dim", 1024, -2), ("head_dim", 33, -2), ("head_dim", 0, -1),
    ("n_kv_heads", 0, -1), ("n_heads", 3, -1), ("threads", 0, -1), ("threads", 4096, -1), ("max_batch", 0, -1),
    ("max_pos", 2**31 - 1, -1), ("vocab", 1000, -3), ("inter", 512, -3), ("hidden", 64, -3),
    ("final_norm", None, -4), ("rope_dim", 0, -2), ("rope_dim", 15, -2), ("rope_dim", 34, -2),
    ("act", 2, -6), ("act", -1, -6), ("eps", 0.0, -6), ("attn_scale", float("nan"), -6),
    ("final_softcap", -1.0, -6), ("embed_scale", float("inf"), -6),
    ("kv_bits", 8, 0), ("kv_bits", 4, 0), ("kv_bits", 5, -7), ("kv_bits", 0, -7), ("kv_bits", 32, -7),
])
def test_engine_create_returns_an_error_code(field, value, code, portable, engine):
    config = TfConfig.from_buffer_copy(engine._config)
    if field is not None:
        setattr(config, field, value)
    assert _create(portable, config) == code
    assert code == 0 or code in CREATE_ERRORS


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("edit", [
    pytest.param(lambda ls: setattr(ls[1].down, "K", 255), id="down K"),
    pytest.param(lambda ls: setattr(ls[0].q, "bits", 7), id="bits 7"),
    pytest.param(lambda ls: setattr(ls[0].o, "G", 1), id="groups"),
    pytest.param(lambda ls: setattr(ls[0].up, "Kp", 96), id="padded K"),
    pytest.param(lambda ls: setattr(ls[0].k, "kind", 9), id="kind"),
    pytest.param(lambda ls: setattr(ls[1].v, "codes", None), id="no codes"),
    pytest.param(lambda ls: (setattr(ls[0].q, "levels", ls[0].q.codes), setattr(ls[0].q, "bits", 5)), id="levels of 5-bit codes"),
])
def test_engine_create_checks_every_matrix(edit, portable, engine):
    config = TfConfig.from_buffer_copy(engine._config)
    keep = _damaged_layers(config, edit)  # noqa: F841  (the array config points at)
    assert _create(portable, config) == -3


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("edit, code", [
    pytest.param(lambda ls: setattr(ls[1], "rope_cos", None), -4, id="no rope_cos"),
    pytest.param(lambda ls: setattr(ls[0], "rope_sin", None), -4, id="no rope_sin"),
    pytest.param(lambda ls: setattr(ls[1], "mlp_norm", None), -4, id="no mlp_norm"),
    pytest.param(lambda ls: setattr(ls[0], "window", -1), -6, id="negative window"),
    pytest.param(lambda ls: setattr(ls[1], "window", 2**31 - 1), -6, id="window past the limit"),
    pytest.param(lambda ls: setattr(ls[1], "window", 16), 0, id="a sliding window"),
])
def test_engine_create_checks_every_layers_architecture_fields(edit, code, portable, engine):
    config = TfConfig.from_buffer_copy(engine._config)
    keep = _damaged_layers(config, edit)  # noqa: F841  (the array config points at)
    assert _create(portable, config) == code
    assert code == 0 or code in CREATE_ERRORS


# ---- the architectures beyond Llama's layout: fused projections (Phi-3), extra norms (Gemma 3) -----


@pytest.mark.parametrize("model_type, name, tensor, pattern", [
    ("phi3", "model.layers.0.self_attn.qkv_proj.bias", torch.zeros(255), r"qkv_proj\.bias is \[255\], but .* has 256 rows"),
    ("phi3", "model.layers.1.mlp.gate_up_proj.bias", torch.zeros(512), None),
    ("gemma3_text", "model.layers.0.self_attn.q_norm.weight", torch.ones(33), rf"q_norm\.weight is \[33\], {SHAPE} \[32\]"),
    ("gemma3_text", "model.layers.1.self_attn.k_norm.weight", torch.ones(128), rf"k_norm\.weight is \[128\], {SHAPE} \[32\]"),
    ("gemma3_text", "model.layers.1.post_feedforward_layernorm.weight", torch.ones(32), rf"post_feedforward_layernorm\.weight is \[32\], {SHAPE} \[128\]"),
    ("gemma3_text", "model.layers.0.pre_feedforward_layernorm.weight", torch.ones(127), rf"pre_feedforward_layernorm\.weight is \[127\], {SHAPE} \[128\]"),
])
def test_the_norms_and_fused_projections_of_other_architectures_are_checked(model_type, name, tensor, pattern, make_packed):
    packed = load_packed(make_packed(model_type))
    packed.kept[name] = tensor
    if pattern is None:  # a bias of the fused projection's rows fits
        FastBackend(packed, max_positions=32, threads=1)
        return
    with pytest.raises(PackedModelError, match=pattern):
        FastBackend(packed, max_positions=32, threads=1)


@pytest.mark.parametrize("change, pattern", [
    ({"intermediate_size": 512}, rf"mlp\.gate_up_proj is \[512, 128\], {SHAPE} \[1024, 128\]"),
    ({"num_key_value_heads": 4}, rf"self_attn\.qkv_proj is \[256, 128\], {SHAPE} \[384, 128\]"),
    ({"rope_parameters": {"partial_rotary_factor": 1.5, "rope_theta": 10000.0, "rope_type": "default"}}, r"rotary embedding has \d+ dimensions per head, it must be an even number from 2 to head_dim 32"),
])
def test_a_phi3_config_that_does_not_fit_its_fused_tensors(change, pattern, make_packed, tmp_path):
    folder = _edited(make_packed("phi3"), tmp_path, **change)
    with pytest.raises(PackedModelError, match=pattern):
        FastBackend(load_packed(folder), max_positions=32, threads=1)


@pytest.mark.parametrize("change, pattern", [
    ({"head_dim": 16}, rf"q_norm\.weight is \[32\], {SHAPE} \[16\]|q_proj is \[128, 128\], {SHAPE} \[64, 128\]"),
    ({"query_pre_attn_scalar": 0}, r"query_pre_attn_scalar must be a positive number, got 0"),
    ({"final_logit_softcapping": -30.0}, r"final_logit_softcapping must be a non-negative number"),
    ({"layer_types": ["sliding_attention"]}, r"layer_types must list one type per layer \(2\)|must be equal to the number of `layer_types` \(1\)"),
])
def test_a_gemma3_config_that_does_not_fit(change, pattern, make_packed, tmp_path):
    folder = _edited(make_packed("gemma3_text"), tmp_path, **change)
    with pytest.raises(PackedModelError, match=pattern):
        FastBackend(load_packed(folder), max_positions=32, threads=1)


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("matrix, field, value", [("embed", "N", 383), ("head", "K", 127), ("head", "kind", 7), ("embed", "dense", None)])
def test_engine_create_checks_the_embeddings_and_head(matrix, field, value, portable, engine):
    config = TfConfig.from_buffer_copy(engine._config)
    setattr(getattr(config, matrix), field, value)
    assert _create(portable, config) == -3


@pytest.mark.parametrize("portable", BUILDS)
def test_engine_create_reports_a_failed_allocation(portable, engine):
    """A KV cache of 2^30 positions (64 GiB per layer here) cannot be allocated under an address-space limit:
    tf_engine_create returns -5 instead of letting std::bad_alloc cross the C ABI."""
    config = TfConfig.from_buffer_copy(engine._config)
    config.max_pos = 2**30
    load(portable)  # built and loaded before the limit
    vm_kib = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, ((vm_kib << 10) + (4 << 30), hard))
    try:
        rc = _create(portable, config)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert rc == -5


@pytest.mark.parametrize("field", ["tensors_file", "files"])
def test_a_manifest_naming_a_file_no_file_system_can_hold_is_one_line(field, packed_llama, tmp_path, capsys):
    """Fuzz seed 9685 (bench/fuzz.py): a manifest naming a 300-character file made os.stat raise
    ENAMETOOLONG inside load_packed, a traceback; now it is the corrupt manifest it is."""
    folder = Path(shutil.copytree(packed_llama, tmp_path / "edited"))
    manifest = json.loads((folder / "manifest.json").read_text())
    long_name = "x" * 300
    if field == "tensors_file":
        manifest["tensors_file"] = long_name
    else:
        manifest["files"][long_name] = {"bytes": 1, "sha256": "0" * 64}
    manifest["manifest_sha256"] = manifest_sha256(manifest)  # sealed: the name itself must be what is refused
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(PackedModelError):
        load_packed(folder)
    rc = main(["eval", str(folder), "--windows", "1"])
    captured = capsys.readouterr()
    assert judge(rc, captured.out, captured.err, None).outcome == "error", captured.err

"""What the C++ engine is given, checked before it gets it (Python side of the native boundary).

The engine indexes its buffers with the sizes of config.json: hidden size, heads, head_dim,
intermediate size, vocabulary, layers. config.json is a separate file from the tensors, so a
config edited (or taken from another model) would make the engine read past the end of a
matrix. `validate_packed_for_engine` checks every size against every tensor the engine reads,
where the architecture's EngineLayout (runtime/engine_config.py) says it keeps them: fused
projections (Phi-3's qkv_proj, gate_up_proj) whole, as the rows they are split into at load;
extra norms (Gemma 3's output norms of [hidden], q/k norms of [head_dim]). tf_engine_create
(runtime/kernels/checks.h) checks the structs again, the architecture fields included (rope_dim,
act, windows), and returns an error code, which `create_engine` turns into a PackedModelError.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from dataclasses import dataclass

from tightfit.errors import KernelUnavailable, PackedModelError
from tightfit.formats.packed import PackedModel
from tightfit.runtime.engine_config import EngineLayout

# tf_engine_create's codes (TF_E_* in checks.h) in words
CREATE_ERRORS = {
    -1: "a size or count is not positive or past the engine's limits, or num_attention_heads is not a multiple of "
        "num_key_value_heads",
    -2: "head_dim is odd or larger than the engine's limit, or the rotary dimensions (rope_dim) are odd or more than head_dim",
    -3: "a matrix's shape or layout disagrees with the config",
    -4: "a weight, norm or table is missing",
    -5: "out of memory for the KV cache and buffers",
    -6: "an architecture value is out of range (MLP activation, sliding window, rms_norm_eps, attention scale, "
        "logit soft-cap or embedding scale)",
    -7: "the KV cache width is not 16, 8 or 4 bits, or a quantized KV cache has head_dim not a multiple of 16",
}

# The projections of a decoder block, by module name relative to `model.layers.{i}` (Llama layout)
MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
_HIDDEN_NORMS = ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")  # EngineLayout's norms of [hidden]
_HEAD_NORMS = ("q_norm", "k_norm")  # of [head_dim]


@dataclass(frozen=True)
class EngineDims:
    """The sizes the engine takes from config.json, each a positive int32."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """[N, K] of each projection of a decoder block (q, k, v, o, gate, up, down)."""
        h, q, kv, i = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.inter
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}

    def block_tensors(self, layout: EngineLayout) -> dict[str, tuple[int, ...]]:
        """[N, K] of each matrix and [length] of each norm weight of a decoder block, by name relative
        to `model.layers.{i}` (matrices by module name, norms by tensor name); a fused projection
        whole: its rows are the parts it is split into at load, in order."""
        shapes = self.matrix_shapes()
        out: dict[str, tuple[int, ...]] = {}
        for field in _HIDDEN_NORMS:
            if (name := getattr(layout, field)) is not None:
                out[f"{name}.weight"] = (self.hidden,)
        for field in _HEAD_NORMS:
            if (name := getattr(layout, field)) is not None:
                out[f"{name}.weight"] = (self.head_dim,)
        fused = {layout.qkv: ("q", "k", "v"), layout.gate_up: ("gate", "up")}
        done: set[str] = set()
        for module, parts in fused.items():
            if module is not None:
                out[module] = (sum(shapes[p][0] for p in parts), self.hidden)
                done.update(parts)
        out |= {MODULES[p]: shape for p, shape in shapes.items() if p not in done}
        return out

    def describe(self) -> str:
        return (f"vocab_size {self.vocab}, hidden_size {self.hidden}, num_attention_heads {self.n_heads}, "
                f"num_key_value_heads {self.n_kv_heads}, head_dim {self.head_dim}, intermediate_size {self.inter}")


def _whole(config, key: str, default: int | None = None) -> int:
    """config.<key> as a positive int32 (a missing or null value takes `default`)."""
    value = getattr(config, key, None)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
        raise PackedModelError(f"config.json: {key} must be a positive whole number, got {value!r}")
    return value


def _number(config, key: str, *, positive: bool) -> None:
    """config.<key>, where set, a finite number (> 0 where `positive`, else >= 0)."""
    value = getattr(config, key, None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise PackedModelError(f"config.json: {key} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def engine_dims(config, layout: EngineLayout | None = None) -> EngineDims:
    """The engine's sizes from a transformers config, each checked on its own and against the others
    (and the values the architecture's `layout` reads besides: its attention scale)."""
    hidden, n_heads = _whole(config, "hidden_size"), _whole(config, "num_attention_heads")
    n_kv = _whole(config, "num_key_value_heads", n_heads)
    dims = EngineDims(n_layers=_whole(config, "num_hidden_layers"), hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
                      head_dim=_whole(config, "head_dim", hidden // n_heads), inter=_whole(config, "intermediate_size"),
                      vocab=_whole(config, "vocab_size"))
    if n_heads % n_kv:
        raise PackedModelError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if dims.head_dim % 2:
        raise PackedModelError(f"config.json: head_dim {dims.head_dim} is odd; rotary embeddings turn pairs of dimensions")
    _whole(config, "max_position_embeddings", 1)
    _whole(config, "sliding_window", 1)
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise PackedModelError(f"config.json: rms_norm_eps must be a positive number, got {eps!r}")
    types = getattr(config, "layer_types", None)
    if types is not None and (not isinstance(types, (list, tuple)) or len(types) != dims.n_layers):
        raise PackedModelError(f"config.json: layer_types must list one type per layer ({dims.n_layers}), got {types!r}")
    _number(config, "final_logit_softcapping", positive=False)
    if layout is not None and layout.query_scale_key is not None:
        if getattr(config, layout.query_scale_key, None) is None:
            raise PackedModelError(f"config.json: {layout.query_scale_key} is missing")
        _number(config, layout.query_scale_key, positive=True)
    return dims


def _packed_shape(packed: PackedModel, name: str) -> tuple[int, ...] | None:
    """Shape of a matrix (module name) or a vector (tensor name) as the engine reads it; None if absent."""
    if name in packed.layers:
        return tuple(packed.layers[name].shape)
    t = packed.kept.get(name)
    if t is None and not name.endswith(".weight"):
        t = packed.kept.get(packed.tied.get(f"{name}.weight", f"{name}.weight"))
    return None if t is None else tuple(t.shape)


def _engine_tensors(dims: EngineDims, layout: EngineLayout, *, tied_head: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the engine reads, in reading order: matrices by module name
    [N, K], vectors by tensor name. A generator, so that a huge num_hidden_layers costs nothing
    before the first block the packed model lacks."""
    h = dims.hidden
    yield "model.embed_tokens", (dims.vocab, h)
    if not tied_head:
        yield "lm_head", (dims.vocab, h)
    yield "model.norm.weight", (h,)
    block = dims.block_tensors(layout)
    for n in range(dims.n_layers):
        for name, shape in block.items():
            yield f"model.layers.{n}.{name}", shape


def validate_packed_for_engine(packed: PackedModel, config, layout: EngineLayout, max_head_dim: int) -> EngineDims:
    """The engine's sizes from `config`, after checking every tensor the engine reads against them.

    layout: where the architecture's decoder block keeps its tensors (engine_config.LAYOUTS).
    Every matrix's [N, K] (a fused one's rows: the sum of its parts'), every norm's and bias's
    length, vocabulary and head sizes must agree with
    config.json, and the packed model must hold no block past num_hidden_layers (PackedModelError
    naming the tensor otherwise). A head_dim above the engine's `max_head_dim` is KernelUnavailable.
    """
    dims = engine_dims(config, layout)
    for name, shape in _engine_tensors(dims, layout, tied_head=packed.tied.get("lm_head.weight") == "model.embed_tokens.weight"):
        got = _packed_shape(packed, name)
        if got is None:
            raise PackedModelError(f"packed model lacks {name}, which config.json ({dims.describe()}) implies")
        if got != shape:
            raise PackedModelError(f"packed tensor {name} is {list(got)}, but config.json ({dims.describe()}) implies "
                                   f"{list(shape)}: the config does not belong to these tensors (re-run compress)")
        bias = packed.kept.get(f"{name}.bias")
        if len(shape) == 2 and bias is not None and tuple(bias.shape) != shape[:1]:
            raise PackedModelError(f"packed tensor {name}.bias is {list(bias.shape)}, but {name} has {shape[0]} rows")
    beyond = [n for n in (*packed.layers, *packed.kept) if n.startswith(f"model.layers.{dims.n_layers}.")]
    if beyond:
        raise PackedModelError(f"packed model holds {beyond[0]}, but config.json says num_hidden_layers {dims.n_layers}")
    if dims.head_dim > max_head_dim:
        raise KernelUnavailable(f"the fast engine handles head_dim up to {max_head_dim}, this model has {dims.head_dim}; "
                                "use --engine torch")
    return dims


def create_engine(lib: ctypes.CDLL, config: ctypes.Structure) -> int:
    """tf_engine_create on a TfConfig: the engine's handle, or its error code as a PackedModelError."""
    handle = ctypes.c_void_p()
    rc = lib.tf_engine_create(ctypes.addressof(config), ctypes.byref(handle))
    if rc != 0 or not handle.value:
        raise PackedModelError(f"the fast engine refused the model: {CREATE_ERRORS.get(rc, f'error code {rc}')}")
    return handle.value


__all__ = ["CREATE_ERRORS", "MODULES", "EngineDims", "create_engine", "engine_dims", "validate_packed_for_engine"]

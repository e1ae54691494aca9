"""What the compiled engine must know of an architecture, as data (tf_config / tf_layer in common.h).

LAYOUTS is the table: per transformers model_type, where a decoder block keeps the tensors the
engine reads (relative to `model.layers.{i}`) and how the block differs from Llama's. `engine_spec`
derives the per-model values from a transformers config: shapes, the attention scale, the MLP
activation, every layer's sliding window and RoPE tables, the embedding scale and the final logit
soft-cap. What the engine cannot run raises KernelUnavailable saying what.

(model/architectures.py says where the quantizable linears are, for compression; this table says
what the forward step does, for the runtime, which never imports tightfit.model.)
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tightfit.errors import GenerationError, KernelUnavailable, PackedModelError

if TYPE_CHECKING:  # engine_checks builds on this module
    from tightfit.runtime.engine_checks import EngineDims

KV_BITS = (16, 8, 4)  # KV cache widths (tf_config.kv_bits): fp16, or codes with fp16 scales (kv_cache.h)
DEFAULT_KV_BITS = 16
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}  # config name -> TF_ACT_* in common.h
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclass(frozen=True)
class EngineLayout:
    """One architecture's decoder block as the engine runs it; tensor names are relative to
    `model.layers.{i}`, None where the architecture has no such tensor.

    attn_norm, mlp_norm: RMSNorms before the attention and before the MLP
    attn_out_norm, mlp_out_norm: RMSNorms of the attention / MLP output before the residual add
    q_norm, k_norm: RMSNorms of every query / key head before RoPE
    qkv: one fused projection with rows q | k | v (split at load), else self_attn.{q,k,v}_proj
    gate_up: one fused projection with rows gate | up (split at load), else mlp.{gate,up}_proj
    norm_offset: RMSNorm multiplies by (norm_offset + w) (Gemma: 1 + w); folded into the weights
    activation_key: the config key naming the MLP activation
    query_scale_key: the config key whose value^-1/2 scales attention scores, else head_dim^-1/2
    scaled_embedding: embedding rows are multiplied by sqrt(hidden) (Gemma)
    """

    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    qkv: str | None = None
    gate_up: str | None = None
    norm_offset: float = 0.0
    activation_key: str = "hidden_act"
    query_scale_key: str | None = None
    scaled_embedding: bool = False


LLAMA = EngineLayout()
LAYOUTS: dict[str, EngineLayout] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    # Gemma 3 text: norms on both sides of attention and MLP, q/k norms, GeGLU, 1 + w norms, scaled
    # embedding. Its config also carries attn_logit_softcapping, which transformers' Gemma3 attention
    # never applies (Gemma 2's did); the engine runs the model transformers defines.
    "gemma3_text": EngineLayout(
        mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
        mlp_out_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
        norm_offset=1.0, activation_key="hidden_activation", query_scale_key="query_pre_attn_scalar",
        scaled_embedding=True,
    ),
    # Phi-3: Llama's block with fused q/k/v and gate/up projections
    "phi3": EngineLayout(qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
}


@dataclass(frozen=True)
class EngineSpec:
    """One model's values for tf_config and tf_layer (common.h documents each).

    dims: the sizes from config.json, checked against the packed tensors (engine_checks.engine_dims)
    max_positions: the KV cache capacity, within the model's own limits
    rope_cos, rope_sin: per layer [max_positions, rope_dim/2] fp32; layers of one type share them
    windows: per layer, its sliding window in positions, 0 for full attention
    """

    layout: EngineLayout
    dims: EngineDims
    max_positions: int
    eps: float
    attn_scale: float
    act: int
    rope_dim: int
    embed_scale: float
    final_softcap: float
    windows: tuple[int, ...]
    rope_cos: tuple[torch.Tensor, ...]
    rope_sin: tuple[torch.Tensor, ...]


def layout_for(model_type: str | None) -> EngineLayout:
    if model_type not in LAYOUTS:
        raise KernelUnavailable(f"the fast engine runs {', '.join(LAYOUTS)} models, not '{model_type}'; use --engine torch")
    return LAYOUTS[model_type]


def _layer_types(config) -> tuple[str, ...]:
    """Per layer FULL or SLIDING: the config's layer_types, else every layer alike (Mistral, Phi-3:
    all sliding where the config sets a window)."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is None:
        return (SLIDING if getattr(config, "sliding_window", None) else FULL,) * n
    other = sorted(set(types) - {FULL, SLIDING})
    if other:
        raise KernelUnavailable(f"the fast engine has no '{other[0]}' layers (only {FULL}, {SLIDING}); use --engine torch")
    return tuple(types)


def _rope_limit(config) -> int | None:
    """Positions past which transformers picks this model's RoPE frequencies per call ('longrope':
    the long factors for every position of a call that reaches beyond the original context), else None."""
    params = getattr(config, "rope_parameters", None) or {}
    groups = [params] if "rope_type" in params else [p for p in params.values() if isinstance(p, dict)]
    for p in groups:
        if p.get("rope_type") == "longrope":
            return int(p.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    return None


def _rope_tables(config, max_positions: int, layer_type: str | None, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, rope_dim/2] fp32 from transformers' own rotary module of this model
    (every RoPE variant it implements; `layer_type` where the bases differ per layer type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    module = importlib.import_module(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__)
    rotary_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    try:  # rope_theta, rope_scaling / rope_parameters, partial_rotary_factor come from config.json
        rotary = rotary_cls(config=config)
        pos = torch.arange(max_positions).unsqueeze(0)  # [1, P]
        typed = "layer_type" in inspect.signature(rotary.forward).parameters
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(x, pos, layer_type) if typed else rotary(x, pos)  # [1, P, R] each, halves duplicated
    except Exception as e:  # transformers' own checks raise ValueError, KeyError, TypeError, ...
        raise PackedModelError(f"config.json: transformers cannot build the rotary embedding ({type(e).__name__}: {e})") from None
    rope_dim = cos.shape[-1]
    if cos.dim() != 3 or tuple(cos.shape[:2]) != (1, max_positions) or rope_dim < 2 or rope_dim % 2 or rope_dim > head_dim:
        raise PackedModelError(f"config.json: the rotary embedding has {rope_dim} dimensions per head, "
                               f"it must be an even number from 2 to head_dim {head_dim}")
    half = rope_dim // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def check_kv_bits(kv_bits: int, head_dim: int) -> int:
    """kv_bits if the engine can keep a KV cache that wide for heads of head_dim (codes go in groups
    along head_dim, in 16-dim vectors: a multiple of 16), else GenerationError / KernelUnavailable."""
    if kv_bits not in KV_BITS:
        raise GenerationError(f"the KV cache is {', '.join(map(str, KV_BITS))} bits wide, not {kv_bits}")
    if kv_bits != 16 and head_dim % 16:
        raise KernelUnavailable(f"a {kv_bits}-bit KV cache needs head_dim a multiple of 16, this model has {head_dim}; "
                                "use --kv 16")
    return kv_bits


def engine_spec(config, dims: EngineDims, max_positions: int) -> EngineSpec:
    """The engine's values for a transformers config whose sizes `engine_checks.engine_dims` read and
    checked (`dims`), with a KV cache of `max_positions` tokens (capped at the model's
    max_position_embeddings). Raises KernelUnavailable for what it cannot run."""
    layout = layout_for(config.model_type)
    act = getattr(config, layout.activation_key, None)
    if act not in ACTIVATIONS:
        raise KernelUnavailable(f"the fast engine has no '{act}' MLP activation ({', '.join(ACTIVATIONS)}); use --engine torch")
    if getattr(config, "use_bidirectional_attention", False):
        raise KernelUnavailable("the fast engine runs causal attention only, not bidirectional; use --engine torch")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None:
        max_positions = min(max_positions, int(limit))
    rope_limit = _rope_limit(config)
    if rope_limit is not None and max_positions > rope_limit:
        raise KernelUnavailable(
            f"the fast engine runs longrope RoPE within the original {rope_limit} positions (beyond them transformers "
            f"switches every position of a call to the long factors); use a KV cache of at most {rope_limit} tokens "
            "or --engine torch"
        )
    types = _layer_types(config)
    per_type = getattr(config, "layer_types", None) is not None
    tables = {t: _rope_tables(config, max_positions, t if per_type else None, dims.head_dim) for t in sorted(set(types))}
    window = int(getattr(config, "sliding_window", None) or 0)
    query_scale = getattr(config, layout.query_scale_key) if layout.query_scale_key else dims.head_dim
    softcap = getattr(config, "final_logit_softcapping", None)
    return EngineSpec(
        layout=layout, dims=dims, max_positions=max_positions,
        eps=float(config.rms_norm_eps), attn_scale=float(query_scale) ** -0.5, act=ACTIVATIONS[act],
        rope_dim=2 * tables[types[0]][0].shape[1],
        embed_scale=math.sqrt(dims.hidden) if layout.scaled_embedding else 1.0,
        final_softcap=float(softcap or 0.0),
        windows=tuple(window if t == SLIDING else 0 for t in types),
        rope_cos=tuple(tables[t][0] for t in types), rope_sin=tuple(tables[t][1] for t in types),
    )

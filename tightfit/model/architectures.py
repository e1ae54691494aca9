"""The architecture table: where the decoder blocks, their linears, the embeddings and the head live.

Architecture differences are data. Every stage walks a model through one `Architecture` entry,
never through per-architecture code. Each entry was checked against the module names of a tiny
model built from the transformers (5.x) config of that `model_type` (see tests/model/test_load.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tightfit.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Architecture:
    """Where the quantizable parts of one family of decoder-only models live.

    Fields:
        name: short name of the entry, e.g. "llama".
        model_types: the `config.model_type` values this entry covers.
        blocks: dotted path (from the `*ForCausalLM` root) of the `nn.ModuleList` of decoder blocks.
        linear_groups: the `nn.Linear`s of one block, named relative to the block, in execution
            order. The linears of one inner tuple read the same input (e.g. q, k and v read the
            normed residual), so calibration statistics of that input are shared by the group.
        embeddings: dotted path of the token embedding (`nn.Embedding` or a subclass).
        head: dotted path of the output projection (`nn.Linear`; may share its weight with
            `embeddings` when the config ties them).
        norm: dotted path of the norm between the last block and the head.
        query_key: the separate query and key projections of one block (relative to the block)
            whose outputs go through RoPE ("rotate_half" layout) into the attention scores; None
            when q and k share one fused projection. SmoothAttention folds key scales into them.
        qk_norm: the block normalizes queries and keys per head after their projections (Gemma 3's
            q_norm/k_norm), which undoes any per-channel scale folded into the projections.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]
    embeddings: str
    head: str
    norm: str
    query_key: tuple[str, str] | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError(f"architecture {self.name!r} covers no model_type")
        if not self.linear_groups or not all(self.linear_groups):
            raise ValueError(f"architecture {self.name!r} has an empty linear group")
        names = self.linear_names
        if len(set(names)) != len(names):
            raise ValueError(f"architecture {self.name!r} lists a linear twice: {names}")

    @property
    def linear_names(self) -> tuple[str, ...]:
        """All linears of one block, relative to the block, in execution order."""
        return tuple(name for group in self.linear_groups for name in group)


# Separate q/k/v and gate/up projections: llama and every family that kept its layer names.
_SPLIT_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# Phi-3 fuses q/k/v into one projection and gate/up into another.
_FUSED_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)


# The projections whose outputs are rotated (RoPE) into the attention scores, where they are separate.
_QUERY_KEY = ("self_attn.q_proj", "self_attn.k_proj")


def _decoder(name: str, linear_groups: tuple[tuple[str, ...], ...], *, qk_norm: bool = False) -> Architecture:
    """An entry with the `model.layers` / `model.embed_tokens` / `model.norm` / `lm_head` layout all of them share."""
    return Architecture(
        name=name,
        model_types=(name,),
        blocks="model.layers",
        linear_groups=linear_groups,
        embeddings="model.embed_tokens",
        head="lm_head",
        norm="model.norm",
        query_key=_QUERY_KEY if set(_QUERY_KEY) <= {n for g in linear_groups for n in g} else None,
        qk_norm=qk_norm,
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    _decoder("llama", _SPLIT_PROJECTIONS),
    _decoder("mistral", _SPLIT_PROJECTIONS),
    _decoder("qwen2", _SPLIT_PROJECTIONS),
    # Gemma 3 text-only (`Gemma3ForCausalLM`); its q_norm/k_norm are RMSNorms, not linears, and its
    # embedding is `Gemma3TextScaledWordEmbedding` (an `nn.Embedding` that multiplies by sqrt(hidden)).
    _decoder("gemma3_text", _SPLIT_PROJECTIONS, qk_norm=True),
    _decoder("phi3", _FUSED_PROJECTIONS),
)


def supported_model_types() -> tuple[str, ...]:
    """Every `config.model_type` in the table, sorted."""
    return tuple(sorted(t for arch in ARCHITECTURES for t in arch.model_types))


def architecture_for(config: Any) -> Architecture:
    """The table entry for a transformers config (anything with a `model_type` attribute).

    Raises:
        UnsupportedArchitecture: no entry covers `config.model_type`.
    """
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule of `root` at a dotted path such as "model.layers.3.self_attn.q_proj".

    Raises:
        UnsupportedArchitecture: the path does not exist, i.e. the model does not have the layout
            the architecture table says it has.
    """
    module = root
    walked: list[str] = []
    for part in dotted.split("."):
        child = module._modules.get(part) if part else None
        if child is None:
            where = ".".join(walked) or "the root"
            raise UnsupportedArchitecture(
                f"{type(root).__name__} has no module '{dotted}' (no '{part}' under {where})"
            )
        module = child
        walked.append(part)
    return module


def check_layout(model: nn.Module, arch: Architecture) -> None:
    """Check that `model` has the modules `arch` names, of the right types, in every block.

    Raises:
        UnsupportedArchitecture: a module is missing or is not the type the table promises
            (e.g. a transformers release renamed a projection).
    """
    blocks = get_module(model, arch.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedArchitecture(
            f"'{arch.blocks}' of {type(model).__name__} is not a non-empty nn.ModuleList "
            f"(architecture table entry '{arch.name}')"
        )
    expected: list[tuple[str, type[nn.Module]]] = [(arch.embeddings, nn.Embedding), (arch.head, nn.Linear),
                                                   (arch.norm, nn.Module)]
    expected += [(f"{arch.blocks}.{i}.{name}", nn.Linear) for i in range(len(blocks)) for name in arch.linear_names]
    for dotted, kind in expected:
        module = get_module(model, dotted)
        if not isinstance(module, kind):
            raise UnsupportedArchitecture(
                f"'{dotted}' of {type(model).__name__} is {type(module).__name__}, not {kind.__name__} "
                f"(architecture table entry '{arch.name}')"
            )

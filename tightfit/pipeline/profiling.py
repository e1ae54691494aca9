"""Profile the model's linear layers (and its head) on this machine: the latency table the planner's latency limit reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from tightfit.artifacts import Choice, QuantizeConfig
from tightfit.formats.packed import PackedModel
from tightfit.formats.registry import parse_format
from tightfit.model import LoadedModel
from tightfit.stages import pack as pack_stage
from tightfit.stages import profile as profile_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages.profile import LatencyTable, ProfileConfig

LATENCY_CACHE_FILE = "latency.json"


def linear_layer_shapes(loaded: LoadedModel) -> dict[str, tuple[int, int]]:
    """Every quantized linear layer of the decoder blocks: name -> (out_features, in_features)."""
    from tightfit.model import get_module
    from tightfit.model.blocks import linear_layer_names

    return {n: tuple(get_module(loaded.model, n).weight.shape) for n in linear_layer_names(loaded.model, loaded.arch)}


def uniform_rtn_packed(loaded: LoadedModel, fmt, embed_format=None, plan=None) -> PackedModel:
    """The model packed in fmt (or per layer as `plan` says), embeddings and head in embed_format
    (None: fp16), round to nearest without clipping search, in memory: a stand-in with the right
    shapes and formats for timing (speed does not depend on values)."""
    config = QuantizeConfig(fmt=fmt, method="rtn", clip_search=False, embed_format=embed_format, plan=plan)
    qmodel = quantize_stage.quantize_model(loaded, None, config, progress=False)
    return pack_stage.pack(qmodel, loaded, None)


def profile_model(loaded: LoadedModel, formats, config: ProfileConfig, work: Path,
                  on_stage: Callable[[str], None] = lambda _: None, *, head_formats: Sequence[Choice] | None = None) -> LatencyTable:
    """The latency table of loaded's linear layers in formats on this machine (and of its output
    head in head_formats, when given: then the fixed part leaves the head out), with the fixed
    part of its decode time; timings are cached entry by entry in work/latency.json."""
    from tightfit.model import get_module

    cache = profile_stage.LatencyCache(Path(work) / LATENCY_CACHE_FILE)
    head = None if head_formats is None else tuple(get_module(loaded.model, loaded.arch.head).weight.shape)
    return profile_stage.profile(
        linear_layer_shapes(loaded), list(formats), config, cache, head=head, head_formats=head_formats or (),
        architecture=profile_stage.architecture_key(loaded.model.config.to_dict()),
        uniform_model=lambda fmt: uniform_rtn_packed(
            loaded, fmt, None if config.embed_format is None else parse_format(config.embed_format)),
        on_stage=on_stage,
    )


def default_profile_config() -> ProfileConfig:
    from tightfit.runtime.engine import default_threads

    return ProfileConfig(threads=default_threads())

"""Stage 1: resolve a model spec and load it; the architecture table that locates its layers."""

from tightfit.model.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_for,
    check_layout,
    get_module,
    supported_model_types,
)
from tightfit.model.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel
from tightfit.model.load import LoadedModel, check_memory, load_model, resident_block, streams_by_default
from tightfit.model.sources import ModelSource, resolve_source
from tightfit.model.weights import CheckpointWeights, keep_first_blocks, open_weights

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "Architecture",
    "BuiltinModel",
    "CheckpointWeights",
    "LoadedModel",
    "ModelSource",
    "architecture_for",
    "check_layout",
    "check_memory",
    "get_module",
    "keep_first_blocks",
    "load_model",
    "open_weights",
    "resident_block",
    "resolve_source",
    "streams_by_default",
    "supported_model_types",
]

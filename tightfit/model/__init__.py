"""Stage 1: resolve a model spec and load it; the architecture table that locates its layers."""

from tightfit.model.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_for,
    check_layout,
    get_module,
    supported_model_types,
)
from tightfit.model.load import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    LoadedModel,
    ModelSource,
    load_model,
    resolve_source,
)

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "Architecture",
    "BuiltinModel",
    "LoadedModel",
    "ModelSource",
    "architecture_for",
    "check_layout",
    "get_module",
    "load_model",
    "resolve_source",
    "supported_model_types",
]

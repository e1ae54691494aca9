"""Typed artifacts that flow between pipeline stages, and the configs that produce them.

Configs are frozen dataclasses with one home for their defaults and a `version`; they round-trip
through JSON so that a saved artifact says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from tightfit.formats.registry import AnyQuantizedTensor, Format, parse_format

METHODS = ("gptq", "rtn")
KEEP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def config_to_json(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Format.__args__):
            value = value.name
        elif isinstance(value, dict):
            value = {k: v.name if isinstance(v, Format.__args__) else v for k, v in value.items()}
        out[f.name] = value
    return out


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text calibrates, and how much of it: n_samples windows of seq_len tokens."""

    text: str = "wiki"
    n_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    version: int = 1

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationConfig":
        return cls(**d)


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token windows, tokens [n_samples, seq_len] int64, from the calibration part."""

    config: CalibrationConfig
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        assert self.tokens.dtype == torch.int64 and self.tokens.dim() == 2, (self.tokens.dtype, self.tokens.shape)


@dataclass(frozen=True)
class HessianSet:
    """H = 2/T X^T X [K, K] float32 of every linear layer's inputs, keyed by full module name,
    collected from the original model (layers sharing an input share one tensor)."""

    config: CalibrationConfig
    source_sha256: str
    hessians: dict[str, torch.Tensor]


@dataclass(frozen=True)
class QuantizeConfig:
    """How linear layers are quantized.

    method: "gptq" (error compensation with calibration Hessians) or "rtn" (round to nearest).
    fmt: the format of every linear layer inside the decoder blocks, unless `plan` names another.
    plan: full layer name -> format, for mixed-precision plans (from the allocate stage).
    embed_format: quantize the token embeddings (and an untied output head) to this format with
        round-to-nearest; None keeps them in keep_dtype.
    keep_dtype: storage dtype of the tensors that stay unquantized (embeddings, head, norms).
    damp: GPTQ dampening, a fraction of the mean Hessian diagonal added to the diagonal.
    """

    fmt: Format
    method: str = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = True
    keep_dtype: str = "fp16"
    plan: dict[str, Format] | None = None
    embed_format: Format | None = None
    version: int = 1

    def format_of(self, layer: str) -> Format:
        return self.fmt if self.plan is None else self.plan.get(layer, self.fmt)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise ValueError(f"unknown keep dtype {self.keep_dtype!r}; expected one of {tuple(KEEP_DTYPES)}")

    @classmethod
    def from_json(cls, d: dict) -> "QuantizeConfig":
        plan = None if d.get("plan") is None else {k: parse_format(v) for k, v in d["plan"].items()}
        embed = None if d.get("embed_format") is None else parse_format(d["embed_format"])
        return cls(**{**d, "fmt": parse_format(d["fmt"]), "plan": plan, "embed_format": embed})


@dataclass(frozen=True)
class LayerReport:
    """What quantizing one layer cost and left behind."""

    loss: float  # GPTQ objective, or the plain squared weight error for RTN
    seconds: float


@dataclass
class QuantizedModel:
    """Output of the quantize stage.

    layers: full module name -> quantized weight of that linear layer.
    kept: every other tensor of the state dict (tied copies excluded), already in keep_dtype
        (1-D tensors such as norms stay float32).
    """

    config: QuantizeConfig
    layers: dict[str, AnyQuantizedTensor]
    kept: dict[str, torch.Tensor]
    reports: dict[str, LayerReport] = field(default_factory=dict)
    module: Any = None  # the fp32 model with dequantized weights installed (in memory only, never saved)

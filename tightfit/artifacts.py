"""Typed artifacts that flow between pipeline stages, and the configs that produce them.

Configs are frozen dataclasses with one home for their defaults and a `version`; they round-trip
through JSON so that a saved artifact says exactly how it was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from tightfit.formats.grid import GridFormat
from tightfit.formats.lut import LutFormat
from tightfit.formats.registry import AnyQuantizedTensor, Format, StoredTensor, parse_format
from tightfit.formats.spqr import SpQRFormat
from tightfit.formats.table import LayerBytes, QuantFormat

METHODS = ("gptq", "rtn")
KEEP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Unquantized:
    """The choice to leave a layer unquantized: a plan's `fp16`, stored as the kept tensors are
    (2 bytes per weight), with no rounding error worth counting."""

    @property
    def name(self) -> str:
        return "fp16"

    def nbytes(self, out_features: int, in_features: int) -> LayerBytes:
        """The fp16 values, counted as codes (no scales, zeros or outliers)."""
        return LayerBytes(codes=2 * out_features * in_features, scales=0, zeros=0)

    def __str__(self) -> str:
        return self.name


FP16 = Unquantized()
Choice = Union[QuantFormat, GridFormat, LutFormat, SpQRFormat, Unquantized]  # one candidate of a plan's layer: a format, or fp16


def parse_choice(text: str) -> Choice:
    """A format name (`parse_format`), or `fp16` for a layer left unquantized."""
    return FP16 if isinstance(text, str) and text.strip().lower() == FP16.name else parse_format(text)


def format_or_none(choice: Choice) -> Format | None:
    """The format of a choice, None for fp16 (as QuantizeConfig.embed_format says it)."""
    return None if isinstance(choice, Unquantized) else choice


def config_to_json(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Choice.__args__):
            value = value.name
        elif isinstance(value, dict):
            value = {k: v.name if isinstance(v, Choice.__args__) else v for k, v in value.items()}
        out[f.name] = value
    return out


FORWARD_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text calibrates, and how much of it: n_samples windows of seq_len tokens.

    text: one source (`wiki`, `code`, a .txt or .jsonl file) or a mix of sources with shares, e.g.
        `wiki,code`, `wiki:0.75,code:0.25` or `wiki,self:2048` (`self`: tokens sampled from the
        model itself); data/mix.py parses it and apportions the windows. The CLI stores it in
        canonical form, so equal mixes key the same cached Hessians.

    forward_dtype: the precision of the block forwards that produce the calibration activations
    (the inputs whose Hessians GPTQ uses): "fp32", or "bf16" (torch autocast: about 3x faster
    matrix products on CPUs with AVX-512 BF16; the Hessians still accumulate in fp64).
    """

    text: str = "wiki"
    n_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    version: int = 1
    forward_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, got {self.forward_dtype!r}")

    def forward_precision(self):
        """The context the calibration forwards run in."""
        if self.forward_dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationConfig":
        return cls(**d)


@dataclass(frozen=True)
class CalibrationSource:
    """What one source of the calibration text gave: its windows (and held-back windows), where its
    text came from, and the sha256 of that text (of the sampled token ids for `self`)."""

    name: str
    windows: int
    held_back: int
    origin: str
    sha256: str


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token windows, tokens [n_samples, seq_len] int64, from the calibration part;
    sources: each source's share of them, in the order of the config's text."""

    config: CalibrationConfig
    tokens: torch.Tensor
    sources: tuple[CalibrationSource, ...] = ()

    def __post_init__(self) -> None:
        assert self.tokens.dtype == torch.int64 and self.tokens.dim() == 2, (self.tokens.dtype, self.tokens.shape)

    def describe(self) -> str:
        """'64 windows x 512 tokens: wiki 60, self 4' (one line for reports)."""
        mix = ", ".join(f"{s.name} {s.windows}" for s in self.sources)
        return f"{self.tokens.shape[0]} windows x {self.tokens.shape[1]} tokens" + (f": {mix}" if mix else "")


@dataclass(frozen=True)
class HessianSet:
    """H = 2/T X^T X [K, K] float32 of every linear layer's inputs, keyed by full module name,
    collected from the original model (layers sharing an input share one tensor). A mapping, not
    always a dict: a big model's are read from files on access (`calibrate.HessianFiles`)."""

    config: CalibrationConfig
    source_sha256: str
    hessians: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FisherSet:
    """The diagonal Fisher information of the original model's outputs on calibration windows.

    One forward and backward per window scores log p(y_t) for next tokens y_t SAMPLED from the
    model's own prediction (seeded), so E[g g^T] of its gradients g is the Fisher, not the
    empirical Fisher of the text. T = windows * (seq_len - 1) scored positions; per position:
      outputs[layer]  F [N] float32 = mean_t g_tj^2, g = d log p(y_t) / d (layer output), for every
                      linear layer of the decoder blocks
      embed_ids       [U] int64, the distinct input tokens of the windows
      embed_fisher    [U, H] float32 = 1/T sum over positions t holding that token of g_tj^2,
                      g = d log p(y_t) / d E[x_t], the embedding row of the input token x_t
                      (a scaled embedding's factor included)
      head_fisher     [V] float32 = mean_t p_tv (1 - p_tv): the exact diagonal Fisher of the logits
      head_inputs     [H, H] float32 = mean_t h_t h_t^T of the head's input (the final norm's output)
    """

    config: CalibrationConfig
    source_sha256: str
    windows: int
    seed: int
    tokens: int
    outputs: dict[str, torch.Tensor]
    embed_ids: torch.Tensor
    embed_fisher: torch.Tensor
    head_fisher: torch.Tensor
    head_inputs: torch.Tensor
    version: int = 1

    def __post_init__(self) -> None:
        u, h = self.embed_ids.shape[0], self.head_inputs.shape[0]
        assert self.embed_ids.dtype == torch.int64 and self.embed_fisher.shape == (u, h), (self.embed_ids.shape, self.embed_fisher.shape)
        assert self.head_inputs.shape == (h, h) and self.head_fisher.dim() == 1, (self.head_inputs.shape, self.head_fisher.shape)


@dataclass(frozen=True)
class QuantizeConfig:
    """How linear layers are quantized.

    method: "gptq" (error compensation with calibration Hessians) or "rtn" (round to nearest).
    fmt: the format of every linear layer inside the decoder blocks, unless `plan` names another.
    plan: full layer name -> format, for mixed-precision plans (from the allocate stage); it may
        also name the token embeddings and an untied output head (those the plan quantizes).
    embed_format: the format of the token embeddings and an untied output head that the plan
        does not name, rounded to nearest; None keeps them in keep_dtype.
    keep_dtype: storage dtype of the tensors that stay unquantized (embeddings, head, norms).
    damp: GPTQ dampening, a fraction of the mean Hessian diagonal added to the diagonal.
    smooth_attention: SmoothAttention's alpha (QServe): per-channel key scales max|K|^alpha from the
        calibration windows are folded into q_proj/k_proj before they are quantized, so that a
        4-bit KV cache sees flatter keys; None: off.
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
    smooth_attention: float | None = None

    def format_of(self, layer: str) -> Format:
        """The format of a linear layer of the decoder blocks."""
        return self.fmt if self.plan is None else self.plan.get(layer, self.fmt)

    def embedding_format(self, layer: str) -> Format | None:
        """The format of the token embeddings or an untied head; None: kept in keep_dtype."""
        return self.embed_format if self.plan is None else self.plan.get(layer, self.embed_format)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise ValueError(f"unknown keep dtype {self.keep_dtype!r}; expected one of {tuple(KEEP_DTYPES)}")
        if self.smooth_attention is not None and not 0 <= self.smooth_attention <= 1:
            raise ValueError(f"SmoothAttention alpha must lie in [0, 1], got {self.smooth_attention}")

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


@dataclass(frozen=True)
class ReadyLayers:
    """GPTQ results made before the quantize stage from the original model's Hessians (the fisher
    sensitivity sweep's, in the formats a plan chose): layer -> (its quantized weight, the GPTQ
    objective). The sweep visits the columns of all its candidates in one nested order
    (algorithms.gptq.nested_group_order), so a result differs from a GPTQ run of its format alone
    only in the order inside its groups; the sensitivity that chose the format scored exactly it.
    `settings` are the GPTQ settings it was made with (QuantizeConfig's names)."""

    layers: Mapping[str, tuple[StoredTensor, float]]
    settings: Mapping[str, Any]

    def usable_with(self, config: "QuantizeConfig") -> bool:
        """Whether the quantize stage with `config` and the same Hessians would make these layers the
        same way (GPTQ, same settings, no SmoothAttention changing q/k before GPTQ)."""
        return (config.method == "gptq" and config.smooth_attention is None
                and all(getattr(config, k) == v for k, v in self.settings.items()))


@dataclass
class QuantizedModel:
    """Output of the quantize stage.

    layers: full module name -> quantized weight of that linear layer (a model read one block at a
        time: as StoredTensor, packed, to hold half the bytes at 4 bits).
    kept: every other tensor of the state dict (tied copies excluded), already in keep_dtype
        (1-D tensors such as norms stay float32).
    """

    config: QuantizeConfig
    layers: dict[str, AnyQuantizedTensor | StoredTensor]
    kept: dict[str, torch.Tensor]
    reports: dict[str, LayerReport] = field(default_factory=dict)
    module: Any = None  # the fp32 model with dequantized weights installed (in memory only, never saved)

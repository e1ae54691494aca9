"""Build a runnable torch model from a PackedModel.

Reference path: each quantized linear keeps its packed tensors and computes with the weight
dequantized once to fp32, so its outputs equal those of the model the quantize stage produced.
Fast low-bit kernels replace `QuantLinear.forward` per format later, tested against this path.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tightfit.errors import PackedModelError
from tightfit.formats.registry import AnyQuantizedTensor
from tightfit.formats.packed import PackedModel, load_packed


class QuantLinear(nn.Module):
    """y = x W_hat^T + b with W_hat = dequantize(codes, scales, zeros); x [..., K] -> [..., N]."""

    def __init__(self, quantized: AnyQuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.quantized = quantized
        self.out_features, self.in_features = quantized.shape
        self.register_buffer("weight", quantized.dequantize(), persistent=False)  # [N, K] fp32
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.quantized.fmt.name}"


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


RUNTIME_OUTPUTS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False, "torchscript": False}


def transformers_config(packed: PackedModel):
    """The transformers config (a PretrainedConfig) of a packed model, from its config.json."""
    from transformers import AutoConfig

    config_dict = dict(packed.hf_config)
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise PackedModelError(f"packed config.json has no model_type (got {model_type!r})")
    try:  # the output switches tightfit's callers rely on win over config.json's (a return_dict false gives tuples)
        return AutoConfig.for_model(model_type, **{**config_dict, **RUNTIME_OUTPUTS})
    except Exception as e:  # transformers' and huggingface_hub's validators raise ValueError, TypeError, their own types
        raise PackedModelError(f"packed config.json is not a valid {model_type!r} config: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def check_tensors_fit(config, packed: PackedModel) -> None:
    """Every packed tensor has the shape of the parameter it fills in the model `config` describes,
    checked on a weightless (meta) copy of the model before any memory is allocated for it."""
    from transformers import AutoModelForCausalLM

    blocks = {int(m.group(1)) for n in (*packed.layers, *packed.kept) if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if blocks and getattr(config, "num_hidden_layers", None) != len(blocks):
        raise PackedModelError(f"packed config.json says num_hidden_layers {getattr(config, 'num_hidden_layers', None)!r}, "
                               f"the tensors hold {len(blocks)} blocks (re-run compress)")
    try:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a config transformers accepted but cannot build (sizes, layer types)
        raise PackedModelError(f"packed config.json does not build a model: {_first_line(e)}") from None
    params = dict(shell.named_parameters())
    shapes = {f"{n}.weight": q.shape for n, q in packed.layers.items()} | {n: tuple(t.shape) for n, t in packed.kept.items()}
    for name, shape in shapes.items():
        if name in params and tuple(params[name].shape) != tuple(shape):
            raise PackedModelError(f"packed tensor {name} is {list(shape)}, but config.json gives the model "
                                   f"{list(params[name].shape)}: the config does not belong to these tensors (re-run compress)")


@torch.no_grad()
def build_model(packed: PackedModel) -> nn.Module:
    """PackedModel -> transformers model in fp32 with QuantLinear layers, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = transformers_config(packed)
    check_tensors_fit(config, packed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, q in packed.layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise PackedModelError(f"packed layer {name} is not a module of the {config.model_type} model") from None
        if not isinstance(linear, (nn.Linear, nn.Embedding)) or tuple(linear.weight.shape) != q.shape:
            raise PackedModelError(f"packed layer {name} {q.shape} does not fit the model's {linear}")
        if isinstance(linear, nn.Embedding):  # rows are looked up, not multiplied: decode once
            linear.weight.data.copy_(q.dequantize())  # a head tied to it follows
            continue
        bias_name = f"{name}.bias"
        bias = packed.kept.get(bias_name)
        _set_module(model, name, QuantLinear(q, None if bias is None else bias.float()))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in packed.kept.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    biases = {f"{n}.bias" for n in packed.layers}
    unexpected = [k for k in unexpected if k not in biases]
    embedded = {f"{n}.weight" for n in packed.layers}
    missing = [k for k in missing if k not in packed.tied and k not in embedded]
    if missing or unexpected:
        raise PackedModelError(f"packed tensors do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


def load_runtime(path: Path) -> tuple[nn.Module, PackedModel]:
    packed = load_packed(path)
    return build_model(packed), packed

"""Build a runnable torch model from a PackedModel.

Reference path: each quantized linear keeps its packed tensors and computes with the weight
dequantized once to fp32, so its outputs equal those of the model the quantize stage produced.
Fast low-bit kernels replace `QuantLinear.forward` per format later, tested against this path.
"""

from __future__ import annotations

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


def transformers_config(packed: PackedModel):
    """The transformers config (a PretrainedConfig) of a packed model, from its config.json."""
    from transformers import AutoConfig

    config_dict = dict(packed.hf_config)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise PackedModelError("packed config.json has no model_type")
    return AutoConfig.for_model(model_type, **config_dict)


@torch.no_grad()
def build_model(packed: PackedModel) -> nn.Module:
    """PackedModel -> transformers model in fp32 with QuantLinear layers, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = transformers_config(packed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, q in packed.layers.items():
        linear = model.get_submodule(name)
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

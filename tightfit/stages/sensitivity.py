"""Sensitivity stage: how much each layer suffers in each candidate format.

Two measurements per (layer, format), after GPTQ-quantizing that layer alone with the Hessian of
its inputs in the original model:
  proxy     the GPTQ objective tr((W - W_hat) H (W - W_hat)^T) / 2: the layer's own output error
            on the calibration inputs. Free once the layer is quantized.
  measured  OHQ's mask idea: the model with only this layer quantized (all others original) is run
            on a small held-back slice of calibration text; the increase of KL(original || model)
            per token is the damage. The blocks before the layer are not recomputed: their cached
            outputs are replayed.
The report says how well the proxy ranks layers (Spearman, per format) against the measurement.

`PlanLoss` measures whole plans the same way (every layer quantized in its plan's format), the
real objective that the allocate stage's EvoPress refinement optimizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tightfit.algorithms import gptq_quantize
from tightfit.artifacts import HessianSet
from tightfit.formats.registry import Format, parse_format
from tightfit.metrics import kl_per_token, next_token_log_probs
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import block_list, capture_block_inputs, replay_blocks, run_block

SENSITIVITY_VERSION = 1


@dataclass
class SensitivityTable:
    """proxy[layer][format name] and measured[layer][format name] (KL increase, nats/token);
    shapes[layer] = (out_features, in_features); nbytes[layer][format name] = exact bytes."""

    formats: tuple[Format, ...]
    shapes: dict[str, tuple[int, int]]
    nbytes: dict[str, dict[str, int]]
    proxy: dict[str, dict[str, float]]
    measured: dict[str, dict[str, float]] | None
    slice_tokens: int = 0

    def damage(self, layer: str, fmt: Format) -> float:
        """What allocation minimizes: the measured KL increase when available, else the proxy."""
        table = self.measured if self.measured is not None else self.proxy
        return table[layer][fmt.name]

    def rank_agreement(self) -> dict[str, float]:
        """Spearman correlation across layers between proxy and measured, per format."""
        from scipy.stats import spearmanr

        if self.measured is None:
            return {}
        out = {}
        layers = list(self.shapes)
        for fmt in self.formats:
            p = [self.proxy[l][fmt.name] for l in layers]
            m = [self.measured[l][fmt.name] for l in layers]
            out[fmt.name] = float(spearmanr(p, m).statistic)
        return out

    def to_json(self) -> dict:
        return {
            "version": SENSITIVITY_VERSION, "formats": [f.name for f in self.formats],
            "shapes": {k: list(v) for k, v in self.shapes.items()}, "nbytes": self.nbytes,
            "proxy": self.proxy, "measured": self.measured, "slice_tokens": self.slice_tokens,
        }

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityTable":
        if d.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"sensitivity table version {d.get('version')!r} is not {SENSITIVITY_VERSION}")
        return cls(
            formats=tuple(parse_format(f) for f in d["formats"]),
            shapes={k: tuple(v) for k, v in d["shapes"].items()}, nbytes=d["nbytes"],
            proxy=d["proxy"], measured=d["measured"], slice_tokens=d["slice_tokens"],
        )


def _block_index(arch, name: str) -> int:
    """The decoder block a linear layer belongs to: `model.layers.7.mlp.up_proj` -> 7."""
    return int(name[len(arch.blocks) + 1 :].split(".", 1)[0])


@torch.no_grad()
def measure_sensitivity(
    loaded: LoadedModel,
    hessians: HessianSet,
    formats: list[Format],
    slice_tokens: torch.Tensor | None,
    *,
    damp: float = 0.01,
    progress: bool = True,
) -> SensitivityTable:
    """Proxy for every (layer, format); with slice_tokens [S, T], also the measured KL increase."""
    model, arch = loaded.model, loaded.arch
    blocks = block_list(model, arch)
    names = [f"{arch.blocks}.{i}.{n}" for i in range(len(blocks)) for n in arch.linear_names]
    shapes = {n: tuple(get_module(model, n).weight.shape) for n in names}
    nbytes = {n: {f.name: f.nbytes(*shapes[n]).total for f in formats} for n in names}
    proxy: dict[str, dict[str, float]] = {n: {} for n in names}
    measured: dict[str, dict[str, float]] | None = None

    block_inputs = logp = None
    if slice_tokens is not None:
        measured = {n: {} for n in names}
        logp = next_token_log_probs(model, slice_tokens)  # [S, T-1, V]
        captured = capture_block_inputs(model, arch, slice_tokens, batch_size=slice_tokens.shape[0])
        block_inputs = [captured.hidden[0]]  # hidden states entering each block, whole slice as one batch
        for i, block in enumerate(blocks[:-1]):
            block_inputs.append(run_block(block, block_inputs[-1], captured.extra[i][0]))
        base_kl = kl_per_token(logp, next_token_log_probs(model, slice_tokens))

    for name in tqdm(names, desc="sensitivity", unit="layer", disable=not progress):
        linear = get_module(model, name)
        weight = linear.weight.data.clone()
        h = hessians.hessians[name]
        block_index = _block_index(arch, name)
        for fmt in formats:
            result = gptq_quantize(weight, h, fmt, damp=damp)
            proxy[name][fmt.name] = result.loss
            if measured is not None:
                linear.weight.data.copy_(result.quantized.dequantize())
                try:
                    with replay_blocks(model, arch, block_index, block_inputs[block_index]):
                        logq = next_token_log_probs(model, slice_tokens)
                finally:
                    linear.weight.data.copy_(weight)
                measured[name][fmt.name] = max(kl_per_token(logp, logq) - base_kl, 0.0)
    return SensitivityTable(
        formats=tuple(formats), shapes=shapes, nbytes=nbytes, proxy=proxy, measured=measured,
        slice_tokens=0 if slice_tokens is None else int(slice_tokens.shape[0] * (slice_tokens.shape[1] - 1)),
    )


class PlanLoss:
    """KL(original || model) per token on held-back windows [S, T] with every layer quantized
    (GPTQ, original-model Hessians, as the quantize stage does with them) in the format a plan
    gives it: `loss(formats, level)`, level 0 on the first `screen_windows` windows, level 1 on all.

    Quantized layers are computed on first use and kept as codes. The block inputs of the best
    plan scored at level 1 so far (the anchor: in EvoPress, the parent) are kept too, with the
    last block's output, so a plan that differs from it only from block b on runs blocks b.. alone
    (and the anchor itself only the head). Use as a context manager:
    the model's original weights are put back on exit.
    """

    def __init__(self, loaded: LoadedModel, hessians: HessianSet, windows: torch.Tensor, *, screen_windows: int = 1,
                 damp: float = 0.01) -> None:
        assert windows.dim() == 2 and windows.dtype == torch.int64, (windows.shape, windows.dtype)
        if not 1 <= screen_windows <= windows.shape[0]:
            raise ValueError(f"screen_windows must lie in 1 .. {windows.shape[0]}, got {screen_windows}")
        self.loaded, self.hessians, self.windows, self.damp = loaded, hessians, windows, damp
        self.screen_windows = screen_windows
        model, arch = loaded.model, loaded.arch
        self.blocks = block_list(model, arch)
        names = [f"{arch.blocks}.{i}.{n}" for i in range(len(self.blocks)) for n in arch.linear_names]
        self.block_of = {n: _block_index(arch, n) for n in names}
        self.original = {n: get_module(model, n).weight.data.clone() for n in names}
        self.current: dict[str, Format] = {}  # layers now holding quantized weights in the model
        self.cache: dict[tuple[str, Format], object] = {}
        with torch.no_grad():
            self.logp = next_token_log_probs(model, windows)  # [S, T-1, V]
        self.anchor: tuple[dict[str, Format], list[torch.Tensor], float] | None = None

    def __enter__(self) -> "PlanLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Every layer back to its original weight."""
        self.restore_missing({})

    def _load(self, formats: Mapping[str, Format]) -> None:
        for name, fmt in formats.items():
            if self.current.get(name) != fmt:
                key = (name, fmt)
                if key not in self.cache:
                    self.cache[key] = gptq_quantize(self.original[name], self.hessians.hessians[name], fmt, damp=self.damp).quantized
                get_module(self.loaded.model, name).weight.data.copy_(self.cache[key].dequantize())
                self.current[name] = fmt

    def _first_changed_block(self, formats: Mapping[str, Format]) -> int:
        if self.anchor is None:
            return 0
        changed = [self.block_of[n] for n, f in formats.items() if self.anchor[0].get(n) != f]
        changed += [self.block_of[n] for n in self.anchor[0] if n not in formats]
        return min(changed, default=len(self.blocks))

    @torch.no_grad()
    def loss(self, formats: Mapping[str, Format], level: int = 1) -> float:
        unknown = [n for n in formats if n not in self.original]
        if unknown:
            raise ValueError(f"not linear layers of this model: {unknown[:3]}")
        self.restore_missing(formats)
        self._load(formats)
        n = self.windows.shape[0] if level >= 1 else self.screen_windows
        start = self._first_changed_block(formats)
        model, arch = self.loaded.model, self.loaded.arch
        n_blocks = len(self.blocks)
        if level >= 1 and start == n_blocks:
            return self.anchor[2]  # the anchor itself
        inputs: list[torch.Tensor | None] = [None] * (n_blocks + 1)  # inputs of every block, then the last one's output
        hooks = []
        if level >= 1:
            def record(i):
                def hook(module, args, kwargs):
                    inputs[i] = args[0] if args else kwargs["hidden_states"]
                return hook

            def record_output(module, args, output):
                inputs[n_blocks] = output[0] if isinstance(output, tuple) else output
            hooks = [self.blocks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(start, n_blocks)]
            hooks.append(self.blocks[n_blocks - 1].register_forward_hook(record_output))
        try:
            if start == 0:
                logq = next_token_log_probs(model, self.windows[:n])
            else:
                with replay_blocks(model, arch, start, self.anchor[1][start][:n]):
                    logq = next_token_log_probs(model, self.windows[:n])
        finally:
            for h in hooks:
                h.remove()
        kl = kl_per_token(self.logp[:n], logq)
        if level >= 1 and (self.anchor is None or kl < self.anchor[2]):
            hidden = [self.anchor[1][i] if i < start else inputs[i] for i in range(n_blocks + 1)]
            self.anchor = (dict(formats), hidden, kl)
        return kl

    def reset_anchor(self) -> None:
        """Forget the anchor (e.g. before refining another plan): the next level-1 plan becomes it."""
        self.anchor = None

    def restore_missing(self, formats: Mapping[str, Format]) -> None:
        """Layers quantized for an earlier plan that this plan leaves original."""
        for name in [n for n in self.current if n not in formats]:
            get_module(self.loaded.model, name).weight.data.copy_(self.original[name])
            del self.current[name]

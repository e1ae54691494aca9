"""Whole plans measured: KL(original || model) on held-back windows with every layer quantized in
its plan's format, a check of the sensitivity table's additive model (linear layers only: bench/planner.py,
whose plans hold the embeddings too, scores the packed plans on held-back windows instead)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tightfit.algorithms import gptq_quantize
from tightfit.artifacts import HessianSet
from tightfit.formats.registry import Format
from tightfit.metrics import kl_per_token, next_token_log_probs
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import block_index, block_list, linear_layer_names, replay_blocks


class PlanLoss:
    """KL(original || model) per token on held-back windows [S, T] with every layer quantized
    (GPTQ, original-model Hessians, as the quantize stage does with them) in the format a plan
    gives it: `loss(formats, level)`, level 0 on the first `screen_windows` windows, level 1 on all.

    Quantized layers are computed on first use and kept as codes. The block inputs of the best
    plan scored at level 1 so far (the anchor) are kept too, with the last block's output, so a
    plan that differs from it only from block b on runs blocks b.. alone (and the anchor itself
    only the head). Use as a context manager: the model's original weights are put back on exit.
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
        names = linear_layer_names(model, arch)
        self.block_of = {n: block_index(arch, n) for n in names}
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
        """Forget the anchor (e.g. before scoring another budget's plans): the next level-1 plan becomes it."""
        self.anchor = None

    def restore_missing(self, formats: Mapping[str, Format]) -> None:
        """Layers quantized for an earlier plan that this plan leaves original."""
        for name in [n for n in self.current if n not in formats]:
            get_module(self.loaded.model, name).weight.data.copy_(self.original[name])
            del self.current[name]

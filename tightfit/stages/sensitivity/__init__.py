"""Sensitivity stage: how much each layer of a plan suffers in each of its candidates.

The layers: every linear layer of the decoder blocks (candidates: formats, each GPTQ-quantized with
the Hessian of its inputs in the original model), the token embeddings and an untied output head
(candidates: fp16 or a format, rounded to nearest as the quantize stage does them; a head tied to
the embeddings is the same layer, one decision). The damage of (layer, candidate), by `method`:

  fisher    (default) the KL increase predicted by a second-order expansion of the KL around the
            original model, with the diagonal Fisher information of the layer's outputs
            (calibrate stage, `FisherSet`); dW = W_hat - W:
              linear layer  0.5 * sum_j F_j (dW Hbar dW^T)_jj,  Hbar = E[x x^T] = H / 2
              embeddings    0.5 / T * sum_t sum_j g_tj^2 dE[x_t, j]^2  (g: gradient at token x_t)
              head          0.5 * sum_v Fh_v (dE Hh dE^T)_vv,  Fh_v = mean_t p_tv (1 - p_tv),
                            Hh = E[h h^T] of its inputs; a tied pair counts both terms
            Off-diagonal terms of the output Fisher are dropped. One GPTQ sweep per layer for all formats,
            no forward pass: minutes on a 135M model. With held-back windows (slice_tokens, a model
            in memory) two things the expansion gets wrong are measured instead, for a few forwards:
            the embeddings and head, whose damage it over-predicts below 4 bits (smollm2-135m's tied
            embedding in w3g64: 0.75 predicted, 0.50 measured), are measured as by `measured`; and
            the linear layers' estimates, which rank layers of one kind well but sum to about half
            the real KL, and to a share that depends on the kind (on smollm2-135m k_proj's errors
            weigh 1.3-3x more against the measurement than the average, q_proj's 0.6-0.8x), are
            put on the measured scale by one factor per (kind, format): the KL of the whole model
            with the layers of that kind (`layer_kind`: q_proj, down_proj, ...) in that format, a
            third of them at a time (`probe_parts`: the plan decides layer by layer, and a whole
            kind at once is not the sum of its layers), summed over the thirds, over the sum of
            their estimates (`ScaleProbe`; kinds x formats x PROBE_PARTS forwards on the held-back
            windows, in the calibration's forward precision: bf16 forwards, their own rounding's KL
            subtracted, give the same plans as fp32 on smollm2-135m at 0.68x the time).
  measured  OHQ's mask idea: the model with only this layer quantized (all others original) is run
            on a held-back slice of calibration text; the increase of KL(original || model) per
            token is the damage. The blocks before the layer are not recomputed: their cached
            outputs are replayed. One forward per (layer, candidate): slow (24 min for 6 formats on
            a 135M model on 2 cores).
  proxy     the GPTQ objective tr((W - W_hat) H (W - W_hat)^T) / 2, the layer's own output error on
            the calibration inputs, in no unit shared with the KL: the embeddings and head have
            none, so they stay outside the plan (pinned).

The GPTQ objective is kept for every linear layer; when measured, the table says how well it ranks
layers against the measurement (Spearman, per format). `PlanLoss` (plan_loss.py) measures whole plans
the same way (every linear layer quantized in its plan's format; embeddings not covered).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.errors import InsufficientMemory
from tightfit.artifacts import Choice, FisherSet, HessianSet, Unquantized, parse_choice
from tightfit.formats.registry import Format, StoredTensor, parse_format
from tightfit.metrics import kl_per_token, next_token_log_probs
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import (block_index, block_list, capture_block_inputs, embedding_layers, linear_layer_names,
                                   replay_blocks, run_block)
from tightfit.stages.sensitivity.fisher import (  # noqa: F401  (the estimate's functions: re-exported)
    embedding_damage, fisher_error_of, fisher_weighted_error, rtn_embedding_damage, sampled_rows,
)
from tightfit.stages.sensitivity.plan_loss import PlanLoss  # noqa: F401  (re-exported: callers import it from here)
from tightfit.stages.sensitivity.probes import (  # noqa: F401  (re-exported)
    PROBE_PARTS, ScaleProbe, layer_kind, probe_parts, probe_scales, probes_text, scale_probes, whole_model_kl)
from tightfit.stages.sensitivity.sweep import SWEEP_GPTQ, BlockSweep, SweepResults, sweep_block  # noqa: F401  (re-exported)
from tightfit.stages.workers import fork_map, worker_count

SENSITIVITY_VERSION = 5  # 4: fisher with held-back windows: embeddings measured, linear layers on the measured scale;
# 5: each scale probe in PROBE_PARTS interleaved parts of a kind's layers
METHODS = ("fisher", "measured", "proxy")
METHOD_TEXT = {
    "fisher": "Fisher-weighted GPTQ error (predicted KL)",
    "measured": "KL increase on held-back text, one layer quantized at a time (measured)",
    "proxy": "GPTQ objective of each layer alone (Hessian proxy, not a KL)",
}


def uses_held_back(method: str, streamed: bool) -> bool:
    """Whether `method` runs on held-back windows: measured always; fisher for its scale probes and
    the embeddings when the model is in memory (a streamed one is read a block at a time)."""
    return method == "measured" or (method == "fisher" and not streamed)


@dataclass
class SensitivityTable:
    """What the allocate stage chooses from, for every layer of the plan.

    method:  what `damages` holds, one of METHODS
    formats: the candidates of the linear layers (the embedding layers' are their nbytes keys)
    shapes:  layer -> (out_features, in_features); embeddings and head: (vocab, hidden)
    nbytes:  layer -> candidate name -> exact bytes in that candidate
    damages: layer -> candidate name -> damage by `method` (KL nats/token for fisher and measured)
    proxy:   linear layer -> format name -> GPTQ objective
    tokens:  tokens the damages were estimated or measured on (0 for the proxy)
    probes:  the fisher method's scale probes, one per (layer kind, format), when it had held-back
             text (the linear layers' damages are scaled by probe_scales; the embeddings and head
             were measured); empty otherwise
    """

    method: str
    formats: tuple[Format, ...]
    shapes: dict[str, tuple[int, int]]
    nbytes: dict[str, dict[str, int]]
    damages: dict[str, dict[str, float]]
    proxy: dict[str, dict[str, float]]
    tokens: int = 0
    probes: tuple[ScaleProbe, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sensitivity method {self.method!r}; expected one of {METHODS}")

    def candidates(self, layer: str) -> list[Choice]:
        return [parse_choice(name) for name in self.nbytes[layer]]

    def damage(self, layer: str, choice: Choice | str) -> float:
        """What allocation minimizes for this layer in this candidate."""
        return self.damages[layer][choice if isinstance(choice, str) else choice.name]

    def rank_agreement(self, other: SensitivityTable | None = None) -> dict[str, float]:
        """Spearman correlation across the linear layers, per format: of this table's damages
        against other's, or (other None) of the GPTQ proxy against the measurement when this table
        is measured ({} otherwise)."""
        from scipy.stats import spearmanr

        if other is None:
            if self.method != "measured":
                return {}
            a, b = self.proxy, self.damages
        else:
            a, b = self.damages, other.damages
        layers = list(self.proxy)
        return {f.name: float(spearmanr([a[l][f.name] for l in layers], [b[l][f.name] for l in layers]).statistic)
                for f in self.formats}

    def restricted(self, formats: Sequence[Format], embed_choices: Sequence[Choice]) -> SensitivityTable:
        """This table with only the given candidates (each a candidate here: ValueError otherwise),
        in their order. Exact for every method: a (layer, candidate) is scored alone, and a scale
        probe covers one format."""
        names = [f.name for f in formats]
        outer = [c.name for c in embed_choices]
        linear = set(self.proxy)
        missing = sorted({*names} - {f.name for f in self.formats}) + sorted(
            {c for c in outer for layer in self.shapes if layer not in linear and c not in self.nbytes[layer]})
        if missing:
            raise ValueError(f"not candidates of this table: {', '.join(missing)}")
        keep = {layer: names if layer in linear else outer for layer in self.shapes}
        return SensitivityTable(
            method=self.method, formats=tuple(formats), shapes=dict(self.shapes),
            nbytes={layer: {c: self.nbytes[layer][c] for c in cs} for layer, cs in keep.items()},
            damages={layer: {c: self.damages[layer][c] for c in cs} for layer, cs in keep.items()},
            proxy={layer: {f: self.proxy[layer][f] for f in names} for layer in self.proxy},
            tokens=self.tokens, probes=tuple(p for p in self.probes if p.format in names))

    def to_json(self) -> dict:
        return {
            "version": SENSITIVITY_VERSION, "method": self.method, "formats": [f.name for f in self.formats],
            "shapes": {k: list(v) for k, v in self.shapes.items()}, "nbytes": self.nbytes, "damages": self.damages,
            "proxy": self.proxy, "tokens": self.tokens,
            "probes": [dataclasses.asdict(p) for p in self.probes],
        }

    @classmethod
    def from_json(cls, d: dict) -> SensitivityTable:
        if d.get("version") != SENSITIVITY_VERSION and not (d.get("version") in (3, 4) and d.get("method") != "fisher"):
            # (versions 4 and 5 changed the fisher method only: measured and proxy tables of versions 3 and 4 stand)
            raise ValueError(f"sensitivity table version {d.get('version')!r} is not {SENSITIVITY_VERSION}")
        return cls(
            method=d["method"], formats=tuple(parse_format(f) for f in d["formats"]),
            shapes={k: tuple(v) for k, v in d["shapes"].items()}, nbytes=d["nbytes"], damages=d["damages"],
            proxy=d["proxy"], tokens=d["tokens"], probes=tuple(ScaleProbe(**p) for p in d.get("probes", [])),
        )


# ---- the stage ----------------------------------------------------------------------------------


class _SliceKL:
    """The KL increase on slice_tokens [S, T] with the model as it is now (one layer or a probe's
    layers changed) against the original's fp32 log-probs, the blocks before `start` replayed from
    the original model's cache. precision: the context the changed model's forwards run in (the
    fisher method's probes and embeddings follow the calibration's forward dtype; the measured method
    stays fp32); the original model's KL under it (0 in fp32, bf16's own rounding otherwise) is
    subtracted, so a probe reads what the quantization adds."""

    def __init__(self, loaded: LoadedModel, slice_tokens: torch.Tensor,
                 precision: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> None:
        self.loaded, self.tokens, self.precision = loaded, slice_tokens, precision
        model, arch = loaded.model, loaded.arch
        self.logp = next_token_log_probs(model, slice_tokens)  # [S, T-1, V]
        captured = capture_block_inputs(model, arch, slice_tokens, batch_size=slice_tokens.shape[0])
        self.block_inputs = [captured.hidden[0]]  # hidden states entering each block, whole slice as one batch
        for i, block in enumerate(block_list(model, arch)[:-1]):
            self.block_inputs.append(run_block(block, self.block_inputs[-1], captured.extra[i][0]))
        self.base = self._kl(0)

    def _kl(self, start: int) -> float:
        """KL(original fp32 || the model as it is now, under `precision`) per token, before the base."""
        model, arch = self.loaded.model, self.loaded.arch
        with self.precision():
            if start == 0:
                logq = next_token_log_probs(model, self.tokens)
            else:
                with replay_blocks(model, arch, start, self.block_inputs[start]):
                    logq = next_token_log_probs(model, self.tokens)
        return kl_per_token(self.logp, logq.float())

    def __call__(self, start: int = 0) -> float:
        return max(self._kl(start) - self.base, 0.0)


def layer_bytes(loaded: LoadedModel, formats: Sequence[Format], embed_choices: Sequence[Choice] = ()
                ) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, int]]]:
    """The layers of a plan and their exact bytes in each candidate: (shapes, nbytes), as in the
    SensitivityTable. The linear layers take `formats`; the embeddings (and an untied head) are
    layers only when they have embed_choices."""
    model, arch = loaded.model, loaded.arch
    names = linear_layer_names(model, arch)
    outer = embedding_layers(model, arch) if embed_choices else []
    shapes = {n: tuple(get_module(model, n).weight.shape) for n in [*names, *outer]}
    nbytes = {n: {f.name: f.nbytes(*shapes[n]).total for f in (formats if n in names else embed_choices)} for n in shapes}
    return shapes, nbytes


@torch.no_grad()
def measure_sensitivity(
    loaded: LoadedModel,
    hessians: HessianSet,
    formats: Sequence[Format],
    *,
    method: str = "fisher",
    fisher: FisherSet | None = None,
    slice_tokens: torch.Tensor | None = None,
    embed_choices: Sequence[Choice] = (),
    damp: float = 0.01,
    progress: bool = True,
    linear_from: SensitivityTable | None = None,
    keep_results: SweepResults | None = None,
) -> SensitivityTable:
    """The damage of every (layer, candidate) by `method`: "fisher" needs `fisher` (and uses
    slice_tokens when given: module doc), "measured" needs slice_tokens [S, T] (held-back windows). The embeddings and head are layers of the table
    when they have embed_choices (not with the proxy). linear_from: a table made the same way with the
    same `formats` whose linear layers' scores are taken as they are (only the embeddings and head
    are scored: their candidates changed; the linear layers' sweep is most of the time).
    keep_results: filled, when the fisher method's scale probes run (the model in memory), with their
    GPTQ results (layers GPTQ saw whole), for a quantize stage that takes them as they are
    (artifacts.ReadyLayers)."""
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; expected one of {METHODS}")
    if method == "fisher" and fisher is None:
        raise ValueError("the fisher method needs the Fisher statistics (calibrate.collect_fisher)")
    if method == "measured" and slice_tokens is None:
        raise ValueError("the measured method needs held-back windows (slice_tokens)")
    if method == "measured" and loaded.streamed:
        raise InsufficientMemory("--sensitivity measured runs the whole model once per layer and candidate: it needs the "
                                 "model in memory, and this one is read one block at a time; use --sensitivity fisher")
    if method == "proxy" and embed_choices:
        raise ValueError("the proxy has no measure for the embeddings and head: pin them outside the plan")
    model, arch = loaded.model, loaded.arch
    names = linear_layer_names(model, arch)
    shapes, nbytes = layer_bytes(loaded, formats, embed_choices)
    damages: dict[str, dict[str, float]] = {n: {} for n in shapes}
    proxy: dict[str, dict[str, float]] = {n: {} for n in names}
    # fisher with held-back text measures the embeddings and the linear layers' scale (module doc)
    precision = hessians.config.forward_precision if method == "fisher" else contextlib.nullcontext
    slice_kl = (_SliceKL(loaded, slice_tokens, precision) if slice_tokens is not None and uses_held_back(method, loaded.streamed)
                else None)
    held_back_tokens = 0 if slice_tokens is None else int(slice_tokens.shape[0] * (slice_tokens.shape[1] - 1))
    probing = method == "fisher" and slice_kl is not None and linear_from is None
    # format -> layer -> its GPTQ result, kept packed (a probe needs a part of a kind's layers at once); a
    # row-sampled layer (GPTQ saw some rows) is rounded to nearest when its probe runs (`_rounded_probe`)
    probe_weights: dict[str, dict[str, StoredTensor]] = {f.name: {} for f in formats}
    sampled: dict[str, int] = {}  # row-sampled layer -> its block (the seed of its rows)

    if linear_from is not None:
        assert [f.name for f in linear_from.formats] == [f.name for f in formats] and linear_from.method == method, (
            "a table of other candidates")
        for name in names:
            damages[name], proxy[name] = dict(linear_from.damages[name]), dict(linear_from.proxy[name])
    blocks = sorted({block_index(arch, n) for n in names}) if linear_from is None else []
    in_block = {i: [n for n in names if block_index(arch, n) == i] for i in blocks}

    def sweep(i: int, measure=None) -> BlockSweep:
        return sweep_block(loaded, i, in_block[i], hessians, formats, fisher=fisher if method == "fisher" else None,
                           damp=damp, keep_packed=probing, measure=measure)

    if method == "measured":  # a forward per (layer, candidate): in this process, both threads in torch
        swept = ((i, sweep(i, measure=lambda name, i=i: slice_kl(i)))
                 for i in tqdm(blocks, desc="sensitivity", unit="block", disable=not progress or not blocks))
    else:
        swept = fork_map(sweep, blocks, workers=worker_count(), desc="sensitivity", progress=progress)
    for i, result in swept:
        damages.update(result.damages)
        proxy.update(result.proxy)
        for f, packed in result.packed.items():
            probe_weights[f].update(packed)
        sampled.update(dict.fromkeys(result.sampled, i))
    damages = {n: damages[n] for n in shapes}  # in layer order, whichever block finished first
    proxy = {n: proxy[n] for n in names}

    probes = linear_from.probes if linear_from is not None else ()
    if probing:
        probes = scale_probes(loaded, names, formats, damages, probe_weights, sampled, hessians, fisher, slice_kl,
                              held_back_tokens, progress=progress)
        if keep_results is not None:
            keep_results.weights.update(probe_weights)
            keep_results.settings.update(damp=damp, **SWEEP_GPTQ)
        scales = probe_scales(probes)
        for name in names:
            damages[name] = {f: d * scales[(layer_kind(name), f)] for f, d in damages[name].items()}

    outer = [n for n in shapes if n not in proxy]  # the embeddings and an untied head, when planned
    tied = len(outer) == 1
    for name in outer:
        module = get_module(model, name)
        weight = module.weight.data.clone()  # [V, H]
        for choice in embed_choices:
            if isinstance(choice, Unquantized):
                damages[name][choice.name] = 0.0
                continue
            if slice_kl is None:
                damages[name][choice.name] = rtn_embedding_damage(weight, choice, fisher, embeddings=name == arch.embeddings,
                                                                  head=tied or name == arch.head)
            else:
                module.weight.data.copy_(quantize_rtn_any(weight, choice).dequantize())  # as the quantize stage rounds it
                try:
                    damages[name][choice.name] = slice_kl()
                finally:
                    module.weight.data.copy_(weight)
    tokens = {"fisher": fisher.tokens if fisher is not None else 0, "proxy": 0, "measured": held_back_tokens}[method]
    return SensitivityTable(method=method, formats=tuple(formats), shapes=shapes, nbytes=nbytes, damages=damages,
                            proxy=proxy, tokens=tokens, probes=probes)

"""The fisher method's scale probes: the Fisher estimates of a linear layer kind, put on the
measured scale by the KL of the whole model with that kind's layers quantized.

The estimates rank the layers of one kind well but sum to about half the real KL, to a share that
depends on the kind (sensitivity module doc). One factor per (kind, format) corrects them: the KL
on the held-back windows with the kind's layers in the format, a part at a time (`probe_parts`:
every PROBE_PARTS-th layer at once; a whole kind at once is sub-additive, on smollm2-135m all
k_proj in w2g64 together give 0.34 nats/token where their single-layer KLs sum to 0.57), summed
over the parts, over the sum of their estimates. With a third at a time the factors come within
~10 % of those of the single-layer measurement (k_proj w2g64 x5.1 against x5.0; x2.95 from the
whole kind), and the 2.5-bit plan's KL falls from 3.63 to 3.37 (measured-table plan 3.26), for 3x
the probe forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.artifacts import FisherSet, HessianSet
from tightfit.formats.registry import AnyQuantizedTensor, Format, StoredTensor
from tightfit.model import LoadedModel, get_module
from tightfit.stages.sensitivity.fisher import fisher_weighted_error, sampled_rows

PROBE_PARTS = 3


@dataclass(frozen=True)
class ScaleProbe:
    """A fisher-method probe of one kind of linear layer in one format: its layers (GPTQ; a
    row-sampled layer rounded to nearest) quantized `parts` at a time (every parts-th layer at
    once, `probe_parts`), `measured` the sum of those parts' KL increases on `tokens` held-back
    tokens, `predicted` the sum of the layers' Fisher estimates; those layers' damages in that
    format are scaled by measured / predicted (`scale`)."""

    kind: str
    format: str
    predicted: float
    measured: float
    tokens: int
    parts: int = 1

    @property
    def scale(self) -> float | None:
        """measured / predicted; None when either is not positive (a KL below the held-back text's noise)."""
        return self.measured / self.predicted if self.predicted > 0 and self.measured > 0 else None


def layer_kind(name: str) -> str:
    """What a linear layer is across blocks: the last part of its name (q_proj, down_proj, qkv_proj...)."""
    return name.rsplit(".", 1)[-1]


def probe_parts(layers: Sequence[str]) -> list[list[str]]:
    """The layers of one kind (in block order) as a scale probe quantizes them: PROBE_PARTS
    interleaved parts (layers r, r + PROBE_PARTS, ...), fewer when the kind has fewer layers."""
    return [list(layers[r::PROBE_PARTS]) for r in range(min(PROBE_PARTS, len(layers)))]


def probe_scales(probes: Sequence[ScaleProbe]) -> dict[tuple[str, str], float]:
    """(kind, format) -> the factor its damages take: the probe's scale, or where it has none the
    median scale of that format's other kinds (1.0 when no kind has one)."""
    out = {}
    for p in probes:
        same = sorted(q.scale for q in probes if q.format == p.format and q.scale is not None)
        out[(p.kind, p.format)] = p.scale if p.scale is not None else (same[(len(same) - 1) // 2] if same else 1.0)
    return out


def probes_text(probes: Sequence[ScaleProbe]) -> str:
    """One line on a table's probes (empty without them)."""
    if not probes:
        return ""
    scales = probe_scales(probes)
    kinds = dict.fromkeys(p.kind for p in probes)
    ranges = ", ".join(f"{k} x{min(v for (kk, _), v in scales.items() if kk == k):.2g}-"
                       f"{max(v for (kk, _), v in scales.items() if kk == k):.2g}" for k in kinds)
    return (f"the linear layers' estimates put on the measured scale per layer kind and format ({len(probes)} probes, "
            f"{sum(p.parts for p in probes)} forwards: each the KL of a kind's layers in a format, summed over "
            f"{probes[0].parts} interleaved parts quantized in turn, on {probes[0].tokens} held-back tokens, over their "
            f"estimates' sum; factors by kind over the formats: {ranges}); the embeddings and head measured")


def whole_model_kl(loaded: LoadedModel, quantized: Mapping[str, AnyQuantizedTensor | StoredTensor],
                   slice_kl: Callable[[], float]) -> float:
    """slice_kl() (the KL increase on the held-back windows with the model as it is now) with every
    layer in `quantized` (name -> its quantized weight) swapped in at once; the originals put back after."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, q in quantized.items():
            weight = get_module(loaded.model, name).weight
            originals[name] = weight.data.clone()
            weight.data.copy_(q.dequantize())
        return slice_kl()
    finally:
        for name, w in originals.items():
            get_module(loaded.model, name).weight.data.copy_(w)


def _rounded_probe(loaded: LoadedModel, name: str, fmt: Format, h: torch.Tensor, fisher_outputs: torch.Tensor, seed: int
                   ) -> tuple[StoredTensor, float]:
    """A row-sampled layer's probe weight: the whole layer rounded to nearest in fmt (GPTQ saw only
    its sampled rows), and its Fisher estimate on the same rows as the sweep's (same seed)."""
    weight = get_module(loaded.model, name).weight.data.float()
    rows, row_weight = sampled_rows(weight, h, fisher_outputs, seed=seed)
    rounded = quantize_rtn_any(weight, fmt)
    dw = (rounded.dequantize().float() - weight)[rows]
    return StoredTensor.of(rounded), fisher_weighted_error(dw, h / 2, fisher_outputs[rows] * row_weight)


def scale_probes(loaded: LoadedModel, names: Sequence[str], formats: Sequence[Format], damages: Mapping[str, Mapping[str, float]],
                 packed: dict[str, dict[str, StoredTensor]], sampled: Mapping[str, int], hessians: HessianSet,
                 fisher: FisherSet, slice_kl: Callable[[], float], tokens: int, progress: bool = True
                 ) -> tuple[ScaleProbe, ...]:
    """One probe per (kind, format) over the linear layers `names`: damages[layer][format] their
    Fisher estimates, packed[format][layer] their GPTQ weights, sampled the row-sampled
    layers (-> the seed of their rows: rounded to nearest instead, `_rounded_probe`), slice_kl the
    held-back windows' KL of `tokens` tokens."""
    kinds = list(dict.fromkeys(layer_kind(n) for n in names))
    probes = []
    for fmt in tqdm(formats, desc="scale probes", unit="format", disable=not progress):
        for kind in kinds:
            parts = probe_parts([n for n in names if layer_kind(n) == kind])
            predicted = measured = 0.0
            for layers in parts:
                weights = {n: packed[fmt.name][n] for n in layers if n not in sampled}
                predicted += sum(damages[n][fmt.name] for n in weights)
                for n in [n for n in layers if n in sampled]:
                    weights[n], damage = _rounded_probe(loaded, n, fmt, hessians.hessians[n], fisher.outputs[n], sampled[n])
                    predicted += damage
                measured += whole_model_kl(loaded, weights, slice_kl)
            probes.append(ScaleProbe(kind=kind, format=fmt.name, tokens=tokens, predicted=predicted, measured=measured,
                                     parts=len(parts)))
    return tuple(probes)

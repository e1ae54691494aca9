"""The sensitivity stage's sweep: every linear layer of a block GPTQ-quantized in every candidate
format (one Cholesky factor for all of them), scored by the fisher or proxy method. The stage runs
blocks in forked workers (`tightfit.stages.workers`): they return scores and packed weights,
never a changed model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tightfit.algorithms import gptq_quantize_many
from tightfit.artifacts import FisherSet, HessianSet
from tightfit.formats.registry import Format, StoredTensor
from tightfit.model import LoadedModel, get_module, resident_block
from tightfit.stages.sensitivity.fisher import fisher_error_of, sampled_rows

# GPTQ settings of the sweep besides the dampening (QuantizeConfig's names): a quantize stage with the
# same ones can take the sweep's results as they are (artifacts.ReadyLayers)
SWEEP_GPTQ = {"block_size": 128, "act_order": True, "clip_search": True}


@dataclass
class SweepResults:
    """The sweep's GPTQ results kept for the quantize stage: weights[format][layer], made with the
    GPTQ `settings` (QuantizeConfig's names: damp and SWEEP_GPTQ)."""

    weights: dict[str, dict[str, StoredTensor]] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)


@dataclass
class BlockSweep:
    """One block's scores. damages / proxy: layer -> format -> score (the fisher estimate or the
    GPTQ objective; proxy always the objective); packed: format -> layer -> its GPTQ result, for
    the scale probes (when kept); sampled: the layers GPTQ saw some rows of (those have no packed
    result: a probe rounds them whole)."""

    damages: dict[str, dict[str, float]] = field(default_factory=dict)
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)
    packed: dict[str, dict[str, StoredTensor]] = field(default_factory=dict)
    sampled: list[str] = field(default_factory=list)


def sweep_block(loaded: LoadedModel, i: int, names: Sequence[str], hessians: HessianSet, formats: Sequence[Format], *,
                fisher: FisherSet | None, damp: float, keep_packed: bool,
                measure: Callable[[str], float] | None = None) -> BlockSweep:
    """The layers `names` of block i in every format: fisher scores when `fisher` is given, else
    the GPTQ objective, or with `measure` (the measured method) measure(name) with the layer's
    weight set to each result in turn (put back after)."""
    arch, out = loaded.arch, BlockSweep()
    with resident_block(loaded, i) as block:
        for name in names:
            linear = get_module(block, name[len(f"{arch.blocks}.{i}.") :])
            weight = linear.weight.data.clone()
            h = hessians.hessians[name]
            rows, row_weight = (sampled_rows(weight, h, fisher.outputs[name], seed=i) if fisher is not None
                                else (slice(None), None))
            out.damages[name], out.proxy[name] = {}, {}
            if row_weight is not None:
                out.sampled.append(name)
            swept = weight[rows]  # (a copy when rows are sampled: taken once for every format)
            scale = 1.0 if row_weight is None else float(row_weight.mean())  # N / n: the proxy, roughly
            f = None if fisher is None else fisher.outputs[name][rows] * (1.0 if row_weight is None else row_weight)
            # one sweep, one Cholesky factor for every candidate (their groups nest)
            for fmt, result in zip(formats, gptq_quantize_many(swept, h, list(formats), damp=damp, **SWEEP_GPTQ)):
                out.proxy[name][fmt.name] = out.damages[name][fmt.name] = result.loss * scale
                if fisher is not None:
                    out.damages[name][fmt.name] = fisher_error_of(result, swept, h, f)
                    if keep_packed and row_weight is None:
                        out.packed.setdefault(fmt.name, {})[name] = StoredTensor.of(result.quantized)
                elif measure is not None:
                    linear.weight.data.copy_(result.quantized.dequantize())
                    try:
                        out.damages[name][fmt.name] = measure(name)
                    finally:
                        linear.weight.data.copy_(weight)
    return out

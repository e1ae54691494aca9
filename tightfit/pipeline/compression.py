"""Compress a model in one format (or per layer as a plan says): calibrate -> quantize -> pack -> evaluate.

Each stage's artifact is saved as soon as it exists: quantized blocks go to a work folder beside
the output (`.NAME.work/`), so a killed run resumes after its last finished block; the packed
model is published atomically; evaluation results are written next to it as eval.json.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tightfit.artifacts import CalibrationConfig, HessianSet, QuantizeConfig, ReadyLayers, config_to_json
from tightfit.evaluate import EvalConfig, EvalResult
from tightfit.formats.packed import PackedModel, read_manifest
from tightfit.model import LoadedModel, load_model
from tightfit.model.memory import release_freed_memory
from tightfit.pipeline.evaluation import evaluate_packed
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import pack as pack_stage
from tightfit.stages import quantize as quantize_stage


@dataclass(frozen=True)
class CompressRequest:
    model: str
    out: Path
    quantize: QuantizeConfig
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig | None = EvalConfig()
    eval_engine: str = "torch"
    progress: bool = True


@dataclass
class ModelSummary:
    """Sizes of a packed model: bits/weight of the quantized layers and of the whole model."""

    quantized_weights: int
    quantized_bytes: int
    total_weights: int
    file_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

    @property
    def model_bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.total_weights, 1)

    @classmethod
    def of(cls, packed: PackedModel, file_bytes: int) -> "ModelSummary":
        return cls(packed.quantized_weights(), packed.quantized_bytes(), packed.total_weights(), file_bytes)


@dataclass
class CompressReport:
    out: Path
    summary: ModelSummary
    evaluation: EvalResult | None
    seconds: dict[str, float] = field(default_factory=dict)


def work_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def packed_file_bytes(path: Path) -> int:
    manifest = read_manifest(path)
    return int(manifest["tensors_bytes"])


def compress(
    request: CompressRequest, loaded: LoadedModel | None = None, on_stage: Callable[[str], None] = lambda _: None,
    *, hessians: HessianSet | None = None, ready: ReadyLayers | None = None,
) -> CompressReport:
    """Run the whole pipeline for one uniform format; resumes from the work folder if present.

    on_stage(message) is called as each stage starts (the CLI prints it). hessians: GPTQ takes
    these (the original model's, collected once) instead of collecting them sequentially through
    the layers already quantized: much faster when many models are made from one source. ready:
    layers GPTQ already made from these Hessians (a plan's sweep, `PlanReport.ready`), taken as they
    are where `request.quantize` has their settings.
    """
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    seconds["load"] = time.perf_counter() - t

    calibration = None
    work = work_dir_for(Path(request.out))
    # given Hessians need no calibration windows, unless SmoothAttention takes key scales from them
    if (request.quantize.method == "gptq" and hessians is None) or request.quantize.smooth_attention is not None:
        t = time.perf_counter()
        on_stage(f"calibration text: {request.calibration.n_samples} x {request.calibration.seq_len} tokens of {request.calibration.text} "
                 f"(forwards in {request.calibration.forward_dtype})")
        calibration = calibrate_stage.calibrate(loaded.tokenizer, request.calibration, loaded=loaded, work=work,
                                                progress=request.progress)
        seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    if hessians is None or ready is None or not ready.usable_with(request.quantize):
        ready = None
    else:
        on_stage(f"GPTQ results of {len(ready.layers)} layers taken from the sensitivity sweep (same Hessians and settings)")
    if (work / "quantize" / "job.json").exists():
        on_stage(f"resuming from finished blocks in {work}")
    qmodel = quantize_stage.quantize_model(
        loaded, calibration, request.quantize, hessians=hessians,
        ready=ready, checkpoint_dir=work / "quantize", progress=request.progress,
    )
    seconds["quantize"] = time.perf_counter() - t
    release_freed_memory()

    t = time.perf_counter()
    packed = pack_stage.pack(qmodel, loaded, request.calibration if calibration is not None or hessians is not None else None)
    on_stage(f"packing to {request.out}")
    if calibration is not None:
        packed.info["calibration_sources"] = [dataclasses.asdict(s) for s in calibration.sources]
    if request.evaluation is not None:
        packed.info["evaluation"] = config_to_json(request.evaluation)
    out = pack_stage.write(packed, loaded.tokenizer, Path(request.out))
    seconds["pack"] = time.perf_counter() - t
    summary = ModelSummary.of(packed, packed_file_bytes(out))
    del qmodel, packed  # the evaluation reads the packed model from disk
    release_freed_memory()

    result = None
    if request.evaluation is not None:
        t = time.perf_counter()
        on_stage(f"evaluating on {request.evaluation.n_windows} windows of {request.evaluation.ctx} tokens against the "
                 f"original ({request.eval_engine} engine)")
        result = evaluate_packed(out, loaded, request.evaluation, progress=request.progress,
                                 engine=request.eval_engine)
        seconds["evaluate"] = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    return CompressReport(out=out, summary=summary, evaluation=result, seconds=seconds)

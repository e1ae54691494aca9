"""The pipeline: load -> calibrate -> quantize -> pack -> evaluate, in that order.

Each stage's artifact is saved as soon as it exists: quantized blocks go to a work folder beside
the output (`.NAME.work/`), so a killed run resumes after its last finished block; the packed
model is published atomically; evaluation results are written next to it as eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tightfit.artifacts import CalibrationConfig, CalibrationSet, QuantizeConfig, config_to_json
from tightfit.errors import PackedModelError, TightfitError
from tightfit.evaluate import EvalConfig, EvalResult, eval_windows, evaluate
from tightfit.formats.files import atomic_write_json
from tightfit.formats.packed import PackedModel, load_packed, read_manifest
from tightfit.model import LoadedModel, load_model
from tightfit.runtime import build_model
from tightfit.formats.registry import parse_format
from tightfit.stages import allocate as allocate_stage
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import sensitivity as sensitivity_stage
from tightfit.stages.allocate import Budget, Plan
from tightfit.stages.sensitivity import SensitivityTable
from tightfit.stages import pack as pack_stage
from tightfit.stages import quantize as quantize_stage

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class CompressRequest:
    model: str
    out: Path
    quantize: QuantizeConfig
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig | None = EvalConfig()
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


DEFAULT_CANDIDATES = ("w2g64", "w2g32", "w3g128", "w3g64", "w3g32", "w4g128", "w4g64", "w6g128")


@dataclass(frozen=True)
class PlanRequest:
    """Choose one format per layer under a budget: calibrate -> Hessians -> sensitivity -> allocate.

    slice_windows: held-back calibration windows on which each (layer, format) is measured
    (0: the Hessian proxy alone). Hessians and sensitivities are cached in `work`.
    """

    model: str
    budget: Budget
    work: Path
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    calibration: CalibrationConfig = CalibrationConfig()
    slice_windows: int = 1
    progress: bool = True


@dataclass
class PlanReport:
    plan: Plan
    sensitivity: SensitivityTable
    seconds: dict[str, float]


def make_plan(request: PlanRequest, loaded: LoadedModel | None = None,
              on_stage: Callable[[str], None] = lambda _: None) -> PlanReport:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    formats = [parse_format(f) for f in request.formats]
    cal = request.calibration
    on_stage(f"calibration text: {cal.n_samples} + {request.slice_windows} held-back windows of {cal.seq_len} tokens")
    extended = calibrate_stage.calibrate(loaded.tokenizer, dataclasses.replace(cal, n_samples=cal.n_samples + request.slice_windows))
    calibration = CalibrationSet(config=cal, tokens=extended.tokens[: cal.n_samples])
    slice_tokens = extended.tokens[cal.n_samples :] if request.slice_windows else None
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    work = Path(request.work)
    hessian_file = work / "hessians.safetensors"
    hessians = calibrate_stage.load_hessians(hessian_file, loaded, cal)
    if hessians is None:
        on_stage("collecting Hessians of every linear layer (original model)")
        hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=request.progress)
        calibrate_stage.save_hessians(hessians, hessian_file)
    seconds["hessians"] = time.perf_counter() - t

    t = time.perf_counter()
    key = {"source": loaded.source.sha256(), "calibration": config_to_json(cal), "formats": [f.name for f in formats],
           "slice_windows": request.slice_windows}
    sens_file = work / "sensitivity.json"
    table = None
    if sens_file.is_file():
        cached = json.loads(sens_file.read_text())
        if cached.get("key") == key:
            table = sensitivity_stage.SensitivityTable.from_json(cached["table"])
    if table is None:
        on_stage(f"measuring the sensitivity of every layer in {len(formats)} formats")
        table = sensitivity_stage.measure_sensitivity(loaded, hessians, formats, slice_tokens, progress=request.progress)
        atomic_write_json(sens_file, {"key": key, "table": table.to_json()})
    seconds["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    choices = {
        layer: [allocate_stage.LayerChoice(fmt=f, nbytes=table.nbytes[layer][f.name], sensitivity=table.damage(layer, f))
                for f in formats]
        for layer in table.shapes
    }
    plan = allocate_stage.allocate(table.shapes, choices, request.budget)
    seconds["allocate"] = time.perf_counter() - t
    return PlanReport(plan=plan, sensitivity=table, seconds=seconds)


def work_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def packed_file_bytes(path: Path) -> int:
    manifest = read_manifest(path)
    return int(manifest["tensors_bytes"])


def compress(
    request: CompressRequest, loaded: LoadedModel | None = None, on_stage: Callable[[str], None] = lambda _: None
) -> CompressReport:
    """Run the whole pipeline for one uniform format; resumes from the work folder if present.

    on_stage(message) is called as each stage starts (the CLI prints it).
    """
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    seconds["load"] = time.perf_counter() - t

    calibration = None
    if request.quantize.method == "gptq":
        t = time.perf_counter()
        on_stage(f"calibration text: {request.calibration.n_samples} x {request.calibration.seq_len} tokens of {request.calibration.text}")
        calibration = calibrate_stage.calibrate(loaded.tokenizer, request.calibration)
        seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    work = work_dir_for(Path(request.out))
    if (work / "quantize" / "job.json").exists():
        on_stage(f"resuming from finished blocks in {work}")
    qmodel = quantize_stage.quantize_model(
        loaded, calibration, request.quantize, checkpoint_dir=work / "quantize", progress=request.progress
    )
    seconds["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    packed = pack_stage.pack(qmodel, loaded, request.calibration if calibration is not None else None)
    on_stage(f"packing to {request.out}")
    if request.evaluation is not None:
        packed.info["evaluation"] = config_to_json(request.evaluation)
    out = pack_stage.write(packed, loaded.tokenizer, Path(request.out))
    seconds["pack"] = time.perf_counter() - t
    del qmodel

    result = None
    if request.evaluation is not None:
        t = time.perf_counter()
        on_stage(f"evaluating on {request.evaluation.n_windows} windows of {request.evaluation.ctx} tokens against the original")
        result = evaluate_packed(out, loaded, request.evaluation, progress=request.progress)
        seconds["evaluate"] = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    return CompressReport(out=out, summary=ModelSummary.of(packed, packed_file_bytes(out)), evaluation=result, seconds=seconds)


def evaluate_packed(path: Path, reference: LoadedModel | None, config: EvalConfig, *, progress: bool = True,
                    packed: PackedModel | None = None) -> EvalResult:
    """Evaluate a packed model from disk against a reference model; results also go to eval.json.

    packed: the model at `path` if the caller already loaded it (not read again).
    """
    packed = packed if packed is not None else load_packed(path)
    model = build_model(packed)
    tokenizer = reference.tokenizer if reference is not None else _packed_tokenizer(path)
    windows = eval_windows(tokenizer, config)
    result = evaluate(model, windows, reference=None if reference is None else reference.model,
                      batch_size=config.batch_size, progress=progress)
    atomic_write_json(Path(path) / EVAL_FILE, {
        "evaluation": config_to_json(config),
        "against": None if reference is None else {"name": reference.source.name, "sha256": reference.source.sha256()},
        "result": dataclasses.asdict(result),
    })
    return result


def _packed_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise PackedModelError(f"{path}: tokenizer files are missing or corrupted ({e})") from e


def is_packed(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").is_file()


def default_reference(path: Path) -> str | None:
    """The source model named in a packed model's manifest, if it can still be found."""
    source = read_manifest(path).get("source", {})
    from tightfit.model import resolve_source

    try:
        resolve_source(source.get("name", ""))
    except TightfitError:
        return None
    return source.get("name")

"""Plan one format per layer under a budget: [profile ->] calibrate -> Hessians -> sensitivity -> allocate [-> refine].

Hessians, sensitivities, kernel timings and the refined plan are cached in the work folder, so
further budgets on the same model are instant.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tightfit.algorithms.evopress import EvolutionConfig
from tightfit.artifacts import CalibrationConfig, CalibrationSet, HessianSet, config_to_json
from tightfit.errors import InfeasibleBudget
from tightfit.formats.files import atomic_write_json
from tightfit.formats.registry import parse_format
from tightfit.model import LoadedModel, get_module, load_model
from tightfit.pipeline.profiling import default_profile_config, profile_model
from tightfit.stages import allocate as allocate_stage
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages import sensitivity as sensitivity_stage
from tightfit.stages.allocate import Budget, Plan, Refinement
from tightfit.stages.profile import LatencyTable, ProfileConfig
from tightfit.stages.sensitivity import SensitivityTable

DEFAULT_CANDIDATES = ("w2g64", "w2g32", "w3g128", "w3g64", "w3g32", "w4g128", "w4g64", "w6g128")


@dataclass(frozen=True)
class PlanRequest:
    """Choose one format per layer under a budget: calibrate -> Hessians -> sensitivity -> allocate.

    slice_windows: held-back calibration windows on which each (layer, format) is measured
    (0: the Hessian proxy alone). Hessians and sensitivities are cached in `work`.
    profile: how to time the layers on this machine (profile stage; timings cached in `work`).
    None: profile only when the budget has a latency limit, then with ProfileConfig's defaults
    at the engine's default thread count.
    refine: EvoPress search from the MILP plan on the real KL of whole plans over refine_windows
    held-back windows (the first one screens children); None: the MILP plan as it is. The refined
    plan is cached in `work` too.
    """

    model: str
    budget: Budget
    work: Path
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    calibration: CalibrationConfig = CalibrationConfig()
    slice_windows: int = 1
    profile: ProfileConfig | None = None
    refine: EvolutionConfig | None = None
    refine_windows: int = 4
    progress: bool = True


@dataclass
class PlanReport:
    """plan: the refined plan when refinement ran, else the MILP plan (milp_plan)."""

    plan: Plan
    sensitivity: SensitivityTable
    seconds: dict[str, float]
    latency: LatencyTable | None = None
    milp_plan: Plan | None = None
    refinement: Refinement | None = None


HEADER_ALLOWANCE = 200_000  # bytes of safetensors header reserved when budgeting a whole file


def file_budget(loaded: LoadedModel, max_size: int, max_latency_ms: float | None = None,
                embed_format: str | None = None) -> Budget:
    """The budget of the quantized layers when the whole packed tensor file must fit in max_size
    bytes: the unquantized tensors (kept in fp16, or the embeddings and head in embed_format) and
    the file header are taken off first."""
    weights = {f"{loaded.arch.blocks}.{i}.{n}.weight" for i in range(loaded.model.config.num_hidden_layers) for n in loaded.arch.linear_names}
    fixed = HEADER_ALLOWANCE
    if embed_format is not None:
        fmt = parse_format(embed_format)
        for name in quantize_stage.embedding_layers(loaded.model, loaded.arch):
            weights.add(f"{name}.weight")
            fixed += fmt.nbytes(*get_module(loaded.model, name).weight.shape).total
    fixed += sum(t.numel() * t.element_size() for t in quantize_stage.kept_tensors(loaded.model, weights, "fp16").values())
    if max_size <= fixed:
        raise InfeasibleBudget(
            f"--max-size {max_size / 1e6:.1f} MB cannot be met: the unquantized tensors (embeddings, norms) alone "
            f"take {fixed / 1e6:.1f} MB"
        )
    return Budget(max_bytes=max_size - fixed, max_latency_ms=max_latency_ms)


def original_hessians(loaded: LoadedModel, config: CalibrationConfig, work: Path, progress: bool,
                      on_stage: Callable[[str], None], calibration: CalibrationSet | None = None) -> HessianSet:
    """The original model's Hessians of every linear layer, from work/hessians.safetensors when
    they were made from this model and calibration, else collected (one pass) and saved there."""
    path = Path(work) / "hessians.safetensors"
    hessians = calibrate_stage.load_hessians(path, loaded, config)
    if hessians is None:
        on_stage("collecting Hessians of every linear layer (original model)")
        calibration = calibration or calibrate_stage.calibrate(loaded.tokenizer, config)
        hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=progress)
        calibrate_stage.save_hessians(hessians, path)
    return hessians


def make_plan(request: PlanRequest, loaded: LoadedModel | None = None,
              on_stage: Callable[[str], None] = lambda _: None) -> PlanReport:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    formats = [parse_format(f) for f in request.formats]
    work = Path(request.work)
    seconds["load"] = time.perf_counter() - t
    latency = None
    budget = request.budget
    if request.profile is not None or budget.max_latency_ms is not None:
        t = time.perf_counter()
        config = request.profile or default_profile_config()
        latency = profile_model(loaded, formats, config, work, on_stage)
        budget = dataclasses.replace(budget, fixed_latency_ms=latency.fixed_ms)
        seconds["profile"] = time.perf_counter() - t

    t = time.perf_counter()
    cal = request.calibration
    held_back = max(request.slice_windows, request.refine_windows if request.refine is not None else 0)
    on_stage(f"calibration text: {cal.n_samples} + {held_back} held-back windows of {cal.seq_len} tokens")
    calibration, held_back_tokens = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, cal, held_back)
    slice_tokens = held_back_tokens[: request.slice_windows] if request.slice_windows else None
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    hessians = original_hessians(loaded, cal, work, request.progress, on_stage, calibration)
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
        layer: [allocate_stage.LayerChoice(fmt=f, nbytes=table.nbytes[layer][f.name], sensitivity=table.damage(layer, f),
                                           latency_ms=None if latency is None else latency.decode_ms(table.shapes[layer], f))
                for f in formats]
        for layer in table.shapes
    }
    plan = allocate_stage.allocate(table.shapes, choices, budget)
    seconds["allocate"] = time.perf_counter() - t
    refinement = None
    if request.refine is not None:
        t = time.perf_counter()
        windows = held_back_tokens[: request.refine_windows]
        refinement = _refine(plan, table, choices, request, loaded, hessians, windows, key, on_stage)
        seconds["refine"] = time.perf_counter() - t
    return PlanReport(plan=plan if refinement is None else refinement.plan, sensitivity=table, seconds=seconds,
                      latency=latency, milp_plan=plan, refinement=refinement)


def _refine(plan: Plan, table: SensitivityTable, choices, request: PlanRequest, loaded: LoadedModel, hessians, windows,
            sensitivity_key: dict, on_stage: Callable[[str], None]) -> Refinement:
    """EvoPress from the MILP plan, cached in work/refined.json by everything it depends on."""
    key = {"sensitivity": sensitivity_key, "start": plan.to_json(), "config": config_to_json(request.refine),
           "refine_windows": request.refine_windows}
    path = Path(request.work) / "refined.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    for entry in cached.get("entries", []):
        if entry.get("key") == key:
            return Refinement.from_json(entry["refinement"])
    cfg = request.refine
    on_stage(f"refining the plan (EvoPress): {cfg.generations} generations x {cfg.offspring} children, KL on "
             f"{windows.shape[0]} held-back windows")
    with sensitivity_stage.PlanLoss(loaded, hessians, windows, screen_windows=1) as plan_loss:
        refinement = allocate_stage.refine(plan, table.shapes, choices, plan_loss.loss, cfg, progress=request.progress)
    entries = [e for e in cached.get("entries", []) if e.get("key") != key][-15:]
    atomic_write_json(path, {"entries": entries + [{"key": key, "refinement": refinement.to_json()}]})
    return refinement

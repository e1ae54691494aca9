"""The pipeline: load -> calibrate -> profile -> sensitivity -> allocate -> quantize -> pack -> evaluate.

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

from tightfit.artifacts import CalibrationConfig, CalibrationSet, HessianSet, QuantizeConfig, config_to_json
from tightfit.errors import PackedModelError, TightfitError
from tightfit.evaluate import FAST_WINDOWS, EvalConfig, EvalResult, eval_windows, evaluate
from tightfit.formats.files import atomic_write_json
from tightfit.formats.packed import PackedModel, load_packed, read_manifest
from tightfit.model import LoadedModel, load_model
from tightfit.runtime import build_model
from tightfit.formats.registry import parse_format
from tightfit.stages import allocate as allocate_stage
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import profile as profile_stage
from tightfit.stages import sensitivity as sensitivity_stage
from tightfit.algorithms.evopress import EvolutionConfig
from tightfit.stages.allocate import Budget, Plan, Refinement
from tightfit.stages.profile import LatencyTable, ProfileConfig
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


LATENCY_CACHE_FILE = "latency.json"


def linear_layer_shapes(loaded: LoadedModel) -> dict[str, tuple[int, int]]:
    """Every quantized linear layer of the decoder blocks: name -> (out_features, in_features)."""
    from tightfit.model import get_module
    from tightfit.model.blocks import block_list

    arch = loaded.arch
    names = [f"{arch.blocks}.{i}.{n}" for i in range(len(block_list(loaded.model, arch))) for n in arch.linear_names]
    return {n: tuple(get_module(loaded.model, n).weight.shape) for n in names}


def uniform_rtn_packed(loaded: LoadedModel, fmt, embed_format=None, plan=None) -> PackedModel:
    """The model packed in fmt (or per layer as `plan` says), embeddings and head in embed_format
    (None: fp16), round to nearest without clipping search, in memory: a stand-in with the right
    shapes and formats for timing (speed does not depend on values)."""
    config = QuantizeConfig(fmt=fmt, method="rtn", clip_search=False, embed_format=embed_format, plan=plan)
    qmodel = quantize_stage.quantize_model(loaded, None, config, progress=False)
    return pack_stage.pack(qmodel, loaded, None)


def profile_model(loaded: LoadedModel, formats, config: ProfileConfig, work: Path,
                  on_stage: Callable[[str], None] = lambda _: None) -> LatencyTable:
    """The latency table of loaded's linear layers in formats on this machine, with the fixed
    part of its decode time; timings are cached entry by entry in work/latency.json."""
    cache = profile_stage.LatencyCache(Path(work) / LATENCY_CACHE_FILE)
    return profile_stage.profile(
        linear_layer_shapes(loaded), list(formats), config, cache,
        architecture=profile_stage.architecture_key(loaded.model.config.to_dict()),
        uniform_model=lambda fmt: uniform_rtn_packed(
            loaded, fmt, None if config.embed_format is None else parse_format(config.embed_format)),
        on_stage=on_stage,
    )


def default_profile_config() -> ProfileConfig:
    from tightfit.runtime.engine import default_threads

    return ProfileConfig(threads=default_threads())


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


def work_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def packed_file_bytes(path: Path) -> int:
    manifest = read_manifest(path)
    return int(manifest["tensors_bytes"])


def compress(
    request: CompressRequest, loaded: LoadedModel | None = None, on_stage: Callable[[str], None] = lambda _: None,
    *, hessians: HessianSet | None = None,
) -> CompressReport:
    """Run the whole pipeline for one uniform format; resumes from the work folder if present.

    on_stage(message) is called as each stage starts (the CLI prints it). hessians: GPTQ takes
    these (the original model's, collected once) instead of collecting them sequentially through
    the layers already quantized: much faster when many models are made from one source.
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
        loaded, calibration, request.quantize, hessians=hessians, checkpoint_dir=work / "quantize", progress=request.progress
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


# ---- the Pareto sweep ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParetoRequest:
    """Compress `model` at several points, measure each on this machine, save after each point.

    budgets:   bits/weight budgets of planned (mixed) points; formats: the candidates, each also a
               uniform point; method: quantizer of every point ("gptq" or "rtn")
    out:       folder of pareto.json (resumed: points already in it are skipped) and models/
    sequential: GPTQ collects each point's Hessians through its already-quantized layers (the
               `compress` default, slower); False: every point uses the original model's
               Hessians, collected once and cached in `work` (as the planner does)
    embed_format: format of every point's token embeddings and output head (None: fp16)
    threads, prompt_tokens, new_tokens, repeats: the decode speed measurement (fast engine)
    bandwidth_mb: buffer of the read-bandwidth measurement
    """

    model: str
    out: Path
    work: Path
    threads: int
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    method: str = "gptq"
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig = EvalConfig(n_windows=FAST_WINDOWS)
    slice_windows: int = 1
    sequential: bool = False
    embed_format: str | None = None
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3
    bandwidth_mb: int = 1024
    progress: bool = True


def _pareto_settings(request: ParetoRequest, loaded: LoadedModel) -> dict:
    return {
        "model": request.model, "source_sha256": loaded.source.sha256(), "method": request.method,
        "calibration": config_to_json(request.calibration), "slice_windows": request.slice_windows,
        "candidates": list(request.formats), "sequential": request.sequential, "embed_format": request.embed_format,
        "eval_text": request.evaluation.text, "eval_windows": request.evaluation.n_windows,
        "eval_ctx": request.evaluation.ctx, "threads": request.threads, "prompt_tokens": request.prompt_tokens,
        "new_tokens": request.new_tokens, "repeats": request.repeats,
    }


def original_packed(loaded: LoadedModel) -> PackedModel:
    """The unquantized model as a packed model: no quantized layers, every tensor in fp16."""
    kept = quantize_stage.kept_tensors(loaded.model, set(), "fp16")
    return PackedModel(layers={}, kept=kept, hf_config=loaded.model.config.to_dict(),
                       tied=pack_stage.tied_names(loaded, list(kept)), info={"architecture": loaded.arch.name})


def pareto(request: ParetoRequest, loaded: LoadedModel | None = None,
           on_stage: Callable[[str], None] = lambda _: None) -> "ParetoReport":
    """The original, each candidate uniformly, and a plan per budget: one packed model each
    (in out/models/), its size, decode speed and KL to the original. pareto.json is rewritten
    after every point; points it already holds (same settings) are not measured again."""
    from tightfit import report as report_mod
    from tightfit.errors import InfeasibleBudget

    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    out = Path(request.out)
    settings = _pareto_settings(request, loaded)
    json_file = out / report_mod.JSON_FILE
    if json_file.is_file():
        try:
            report = report_mod.ParetoReport.from_json(json.loads(json_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TightfitError(f"{json_file} cannot be resumed ({e}); use another --out or delete it") from None
        if report.settings != settings:
            differ = sorted(k for k in settings.keys() | report.settings.keys() if settings.get(k) != report.settings.get(k))
            raise TightfitError(f"{json_file} was measured with other settings ({', '.join(differ)}); "
                                "use another --out, or delete it to start over")
        on_stage(f"resuming {json_file}: {len(report.points)} points done")
    else:
        on_stage(f"measuring read bandwidth ({request.threads} threads)")
        from tightfit.runtime.speed import measure_bandwidth

        report = report_mod.ParetoReport(settings=settings, bandwidth_gb_s=measure_bandwidth(request.threads, megabytes=request.bandwidth_mb))
        report_mod.save_json(report, out)

    def add(point) -> None:
        nonlocal report
        report = report.with_point(point)
        report_mod.save_json(report, out)

    name = "original (fp16)"
    if name not in report.names():
        add(report_mod.ParetoPoint(name=name, kind="original", size_mb=original_packed(loaded).kept_bytes() / 1e6,
                                   kl=0.0, top1=1.0))

    embed = None if request.embed_format is None else parse_format(request.embed_format)
    hessians = None
    if request.method == "gptq" and not request.sequential:
        hessians = original_hessians(loaded, request.calibration, Path(request.work), request.progress, on_stage)

    def measure(name: str, kind: str, qconfig: QuantizeConfig, folder: str) -> None:
        path = out / "models" / folder
        on_stage(f"{name}: quantizing ({request.method}), packing to {path}")
        result = compress(CompressRequest(model=request.model, out=path, quantize=qconfig, calibration=request.calibration,
                                          evaluation=request.evaluation, progress=request.progress), loaded, on_stage=on_stage,
                          hessians=hessians)
        ev = result.evaluation
        add(report_mod.ParetoPoint(name=name, kind=kind, size_mb=result.summary.file_bytes / 1e6,
                                   bits_per_weight=result.summary.bits_per_weight, kl=ev.kl, top1=ev.top1, ppl=ev.ppl))

    for text in request.formats:
        fmt = parse_format(text)
        name = f"uniform {fmt.name}"
        if name not in report.names():
            measure(name, "uniform", QuantizeConfig(fmt=fmt, method=request.method, embed_format=embed), f"uniform-{fmt.name}")

    for bpw in request.budgets:
        name = f"planned {bpw:.2f} bpw"
        if name in report.names():
            continue
        plan_request = PlanRequest(model=request.model, budget=Budget(max_bpw=bpw), work=request.work, formats=request.formats,
                                   calibration=request.calibration, slice_windows=request.slice_windows, progress=request.progress)
        try:
            plan = make_plan(plan_request, loaded, on_stage=on_stage).plan
        except InfeasibleBudget as e:
            on_stage(f"{name}: skipped, {e}")
            add(report_mod.ParetoPoint(name=name, kind="planned", skipped=str(e)))
            continue
        from collections import Counter

        fmt = Counter(plan.formats.values()).most_common(1)[0][0]
        measure(name, "planned", QuantizeConfig(fmt=fmt, method=request.method, plan=dict(plan.formats), embed_format=embed),
                f"planned-{bpw:.2f}")

    on_stage(f"timing decode of every point side by side: {request.repeats} round-robin rounds")
    report = _retime(report, out, request, loaded)
    report_mod.save_json(report, out)

    original = next(p for p in report.points if p.kind == "original")
    if original.ppl is None:
        # The original's perplexity comes with every evaluated point (EvalResult.reference_ppl).
        ref = _reference_ppl(out, report)
        if ref is not None:
            report = report_mod.ParetoReport(settings=report.settings, bandwidth_gb_s=report.bandwidth_gb_s, points=tuple(
                dataclasses.replace(p, ppl=ref) if p is original else p for p in report.points))
            report_mod.save_json(report, out)
    return report


def _point_folder(point) -> str:
    """The models/ subfolder of a uniform or planned point, as `pareto` names it."""
    return f"{point.kind}-{point.name.split()[1]}"  # "uniform w3g64" -> uniform-w3g64, "planned 3.00 bpw" -> planned-3.00


def _retime(report, out: Path, request: ParetoRequest, loaded: LoadedModel):
    """The report with every point's speed (and bytes read per token) measured, all points
    round-robin in one pass, resumed ones included: points timed one after another (or in
    another run) see different machine states; timed side by side, their speeds compare.
    Medians of request.repeats rounds after a warm-up."""
    import statistics

    from tightfit import report as report_mod
    from tightfit.runtime.engine import FastBackend
    from tightfit.runtime.speed import random_prompt, time_once

    points = [p for p in report.points if p.skipped is None]
    backends = {}
    for p in points:
        packed = original_packed(loaded) if p.kind == "original" else load_packed(out / "models" / _point_folder(p))
        backends[p.name] = FastBackend(packed, max_positions=request.prompt_tokens + request.new_tokens, threads=request.threads)
        del packed
    prompt = random_prompt(loaded.model.config.vocab_size, request.prompt_tokens, 0)
    for backend in backends.values():
        time_once(backend, prompt, request.new_tokens)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    for _ in range(request.repeats):
        for name, backend in backends.items():
            runs[name].append(time_once(backend, prompt, request.new_tokens))  # (prefill tok/s, decode tok/s)
    timed = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()}
    return report_mod.ParetoReport(settings=report.settings, bandwidth_gb_s=report.bandwidth_gb_s, points=tuple(
        dataclasses.replace(p, prefill_tok_s=timed[p.name][0], decode_tok_s=timed[p.name][1],
                            read_mb=backends[p.name].weight_bytes / 1e6) if p.name in timed else p
        for p in report.points))


def _reference_ppl(out: Path, report) -> float | None:
    for folder in sorted((out / "models").glob("*/")):
        eval_file = folder / EVAL_FILE
        if eval_file.is_file():
            return json.loads(eval_file.read_text())["result"].get("reference_ppl")
    return None

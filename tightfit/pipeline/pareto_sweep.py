"""The Pareto sweep: the original, each candidate uniformly and a plan per budget, each compressed,
evaluated and timed on this machine; pareto.json is rewritten after every point, so a run resumes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json, format_or_none, parse_choice
from tightfit.errors import TightfitError
from tightfit.evaluate import FAST_WINDOWS, EvalConfig
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.formats.registry import parse_format
from tightfit.model import LoadedModel, load_model
from tightfit.pipeline.compression import CompressRequest, compress
from tightfit.pipeline.evaluation import EVAL_FILE
from tightfit.pipeline.planning import DEFAULT_CANDIDATES, PlanRequest, make_plan, original_hessians
from tightfit.stages import pack as pack_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages.allocate import Budget


@dataclass(frozen=True)
class ParetoRequest:
    """Compress `model` at several points, measure each on this machine, save after each point.

    budgets:   bits/weight budgets of planned (mixed) points; formats: the candidates, each also a
               uniform point; method: quantizer of every point ("gptq" or "rtn")
    out:       folder of pareto.json (resumed: points already in it are skipped) and models/
    sequential: GPTQ collects each point's Hessians through its already-quantized layers (the
               `compress` default, slower); False: every point uses the original model's
               Hessians, collected once and cached in `work` (as the planner does)
    embed_format: format of every point's token embeddings and output head (None: fp16), planned
               points included, so that every point has the same embeddings
    sensitivity: the planner's sensitivity method (stages.sensitivity METHODS)
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
    sensitivity: str = "fisher"
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
        "calibration": config_to_json(request.calibration), "sensitivity": request.sensitivity,
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
    else:  # the read bandwidth is probed with the speeds, at the end (_retime)
        report = report_mod.ParetoReport(settings=settings, bandwidth_gb_s=0.0)
        report_mod.save_json(report, out)

    def add(point) -> None:
        nonlocal report
        report = report.with_point(point)
        report_mod.save_json(report, out)

    name = "original (fp16)"
    if name not in report.names():
        add(report_mod.ParetoPoint(name=name, kind="original", size_mb=original_packed(loaded).kept_bytes() / 1e6,
                                   kl=0.0, top1=1.0))

    embed = format_or_none(parse_choice(request.embed_format or "fp16"))
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
                                   embed_formats=(request.embed_format or "fp16",), sensitivity=request.sensitivity,
                                   calibration=request.calibration, progress=request.progress)
        try:
            plan = make_plan(plan_request, loaded, on_stage=on_stage).plan
        except InfeasibleBudget as e:
            on_stage(f"{name}: skipped, {e}")
            add(report_mod.ParetoPoint(name=name, kind="planned", skipped=str(e)))
            continue
        from collections import Counter

        fmt = Counter(plan.quantized.values()).most_common(1)[0][0]
        measure(name, "planned", QuantizeConfig(fmt=fmt, method=request.method, plan=plan.quantized, embed_format=embed),
                f"planned-{bpw:.2f}")

    on_stage(f"probing read bandwidth, then timing decode of every point side by side: {request.repeats} round-robin rounds")
    report = _retime(report, out, request, loaded)
    report_mod.save_json(report, out)

    original = next(p for p in report.points if p.kind == "original")
    if original.ppl is None:
        # The original's perplexity comes with every evaluated point (EvalResult.reference_ppl).
        ref = _reference_ppl(out, report)
        if ref is not None:
            report = dataclasses.replace(report, points=tuple(dataclasses.replace(p, ppl=ref) if p is original else p
                                                              for p in report.points))
            report_mod.save_json(report, out)
    return report


def _point_folder(point) -> str:
    """The models/ subfolder of a uniform or planned point, as `pareto` names it."""
    return f"{point.kind}-{point.name.split()[1]}"  # "uniform w3g64" -> uniform-w3g64, "planned 3.00 bpw" -> planned-3.00


def _retime(report, out: Path, request: ParetoRequest, loaded: LoadedModel):
    """The report with every point's speed (and bytes read per token) measured, all points
    round-robin in one pass, resumed ones included: points timed one after another (or in
    another run) see different machine states; timed side by side, their speeds compare.
    Medians of request.repeats rounds after a warm-up; the read bandwidth probed just before."""
    import os
    import statistics

    from tightfit.runtime.engine import FastBackend
    from tightfit.runtime.speed import measure_bandwidth, random_prompt, time_round_robin
    from tightfit.stages.profile.timing import cpu_name

    points = [p for p in report.points if p.skipped is None]
    backends = {}
    for p in points:
        packed = original_packed(loaded) if p.kind == "original" else load_packed(out / "models" / _point_folder(p))
        backends[p.name] = FastBackend(packed, max_positions=request.prompt_tokens + request.new_tokens, threads=request.threads)
        del packed
    prompt = random_prompt(loaded.model.config.vocab_size, request.prompt_tokens, 0)
    # the roofline's bandwidth, probed right before the speeds it divides (not at the start of a sweep
    # that may have run for an hour, or in another run: the machine's bandwidth drifts)
    bandwidth = measure_bandwidth(request.threads, megabytes=request.bandwidth_mb)
    runs = time_round_robin(backends, prompt, request.new_tokens, request.repeats)
    timed = {name: (statistics.median(r.prefill_tok_s), statistics.median(r.decode_tok_s)) for name, r in runs.items()}
    return dataclasses.replace(report, bandwidth_gb_s=bandwidth, machine=f"{cpu_name()}, {request.threads} threads of {os.cpu_count()} CPUs", points=tuple(
        dataclasses.replace(p, prefill_tok_s=timed[p.name][0], decode_tok_s=timed[p.name][1],
                            read_mb=backends[p.name].weight_bytes / 1e6) if p.name in timed else p
        for p in report.points))


def _reference_ppl(out: Path, report) -> float | None:
    for folder in sorted((out / "models").glob("*/")):
        eval_file = folder / EVAL_FILE
        if eval_file.is_file():
            return json.loads(eval_file.read_text())["result"].get("reference_ppl")
    return None

"""Plan one candidate per layer under a budget: [profile ->] calibrate -> Hessians [+ Fisher] -> sensitivity -> allocate.

The plan's layers are the linear layers of the decoder blocks, the token embeddings and an untied
output head (a tied one is the embeddings' decision). Hessians, Fisher statistics, sensitivities
and kernel timings are cached in the work folder, so further budgets on the same model are instant;
a cache that is unreadable or fails its checksum is computed again, with a one-line warning.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tightfit.artifacts import (CalibrationConfig, CalibrationSet, Choice, FisherSet, HessianSet, ReadyLayers, config_to_json,
                                parse_choice)
from tightfit.errors import CorruptCacheError, InfeasibleBudget, TightfitError
from tightfit.formats.files import atomic_write_json, load_checked_json, warn_recomputed
from tightfit.formats.registry import parse_format
from tightfit.model import LoadedModel, get_module, load_model
from tightfit.model.blocks import embedding_layers, linear_layer_names
from tightfit.pipeline.profiling import default_profile_config, profile_model
from tightfit.stages import allocate as allocate_stage
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages import sensitivity as sensitivity_stage
from tightfit.stages.allocate import Budget, Plan
from tightfit.stages.profile import LatencyTable, ProfileConfig
from tightfit.stages.sensitivity import METHODS, SensitivityTable

# Issue 13's formats: SpQR (2- and 3-bit groups of 32 with 3-bit statistics and 0.5 % exact outliers),
# the fixed non-linear 4-bit grid with double-quantized scales, a learned 16-entry table per layer, and
# w6g128 for the few layers that need more. Against the earlier uniform set (w2g64, w3g128, w3g64,
# w4g128, nl4g32, w6g128), same Hessians and protocol: smollm2-135m at 3.5 bits/weight KL 0.217 vs
# 0.272 (64 windows); the README's main job (70 MB, 32 windows) 0.205 vs 0.256 at 13.2 vs 11.5 min
# on an AVX2-only EPYC (the sweep 4.4 vs 2.3 min: SpQR's GPTQ is the slow part); qwen2.5-coder-1.5b
# at 3.0 bits/weight 0.266 vs 0.548, at 3.5 0.129 vs 0.138, at 4.0 a tie, 0.068 both (16 windows).
# SpQR decodes slower than a uniform grid of equal bytes; a latency budget sees that through the
# profile. `--candidates` takes any list (e.g. the earlier set for a faster sweep).
DEFAULT_CANDIDATES = ("spqr-w2g32-s3-o0.5", "spqr-w3g32-s3-o0.5", "nl4g32-dq", "lut4g32", "w6g128")
# The embeddings and head: unquantized, or a format the engine has a kernel for (8 to 2 bits; the
# engine gathers embedding rows of any of them). Below 4 bits they are for tight budgets: on
# smollm2-135m's tied embedding 3 bits costs ~0.34 nats/token, and a plan takes them only where the
# Fisher estimate says so. On a 1.5B model with a 151936-token vocabulary the embeddings and head
# are a quarter of the weights: with them at 4 bits no plan goes below ~2.9 bits/weight.
DEFAULT_EMBED_CANDIDATES = ("fp16", "w8g32-sym", "w6g32", "w5g32", "w4g32-sym", "w3g32", "w3g64", "w3g128", "w2g64")
SENSITIVITY_FILE = "sensitivity.json"


@dataclass(frozen=True)
class PlanRequest:
    """Choose one candidate per layer under a budget: calibrate -> Hessians -> sensitivity -> allocate.

    formats:        candidates of the linear layers of the decoder blocks
    embed_formats:  candidates of the token embeddings and an untied head (`fp16`: unquantized).
                    One name pins them: they are then outside the plan (`Plan.pinned`), as they
                    are with the proxy, which has no measure for them (pinned to fp16 unless one
                    name is given).
    sensitivity:    how each (layer, candidate) is scored (stages.sensitivity METHODS): "fisher"
                    from fisher_windows calibration windows (its scale and the embeddings on
                    slice_windows held-back windows, unless the model is streamed), "measured" on
                    slice_windows held-back windows, or "proxy" (the GPTQ objective). Cached in
                    `work` with the Hessians.
    profile:        how to time the layers on this machine (profile stage; timings cached in
                    `work`). None: profile only when the budget has a latency limit, then with
                    ProfileConfig's defaults at the engine's default thread count.
    """

    model: str
    budget: Budget
    work: Path
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    embed_formats: tuple[str, ...] = DEFAULT_EMBED_CANDIDATES
    sensitivity: str = "fisher"
    calibration: CalibrationConfig = CalibrationConfig()
    fisher_windows: int = 8
    slice_windows: int = 1
    profile: ProfileConfig | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.sensitivity not in METHODS:
            raise ValueError(f"unknown sensitivity method {self.sensitivity!r}; expected one of {', '.join(METHODS)}")
        if not self.formats or not self.embed_formats:
            raise ValueError("the planner needs at least one candidate for the linear layers and one for the embeddings")
        for name in ("fisher_windows", "slice_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")

    def embed_choices(self) -> list[Choice]:
        """The embeddings' candidates in the plan; none when they are pinned."""
        return [] if self.pinned_embeddings() is not None else [parse_choice(f) for f in dict.fromkeys(self.embed_formats)]

    def pinned_embeddings(self) -> Choice | None:
        return pinned_embeddings(self.embed_formats, self.sensitivity)


def pinned_embeddings(embed_formats: tuple[str, ...], sensitivity: str) -> Choice | None:
    """The one candidate the embeddings and head are pinned to (outside the plan), or None when the plan chooses."""
    if len(embed_formats) == 1:
        return parse_choice(embed_formats[0])
    return parse_choice("fp16") if sensitivity == "proxy" else None


@dataclass
class PlanReport:
    """plan: the allocation; choices: every layer's candidates as the allocate stage saw them;
    sensitivity_origin: how the table came about ("cached": read from the work folder; "lent": the
    linear layers' scores from a cached table made for other embedding candidates, the embeddings
    scored now; "scored": every layer scored now); ready: the sensitivity sweep's GPTQ results of the
    plan's choices, when it ran now and kept them (the quantize stage can take them as they are)."""

    plan: Plan
    sensitivity: SensitivityTable
    choices: dict[str, list[allocate_stage.LayerChoice]]
    seconds: dict[str, float]
    latency: LatencyTable | None = None
    calibration: CalibrationSet | None = None  # what the Hessians, Fisher and sensitivities were measured on
    sensitivity_origin: str = "scored"
    ready: ReadyLayers | None = None


HEADER_ALLOWANCE = 200_000  # bytes of safetensors header reserved when budgeting a whole file


def file_budget(loaded: LoadedModel, max_size: int, max_latency_ms: float | None = None,
                pinned: Choice | None = None) -> Budget:
    """The budget of a plan when the whole packed tensor file must fit in max_size bytes: the
    tensors outside the plan (norms, biases, kept in fp16; the embeddings and head when pinned,
    in that candidate) and the file header are fixed_bytes."""
    model, arch = loaded.model, loaded.arch
    outer = embedding_layers(model, arch)
    planned = {f"{name}.weight" for name in [*linear_layer_names(model, arch), *outer]}
    fixed = HEADER_ALLOWANCE + quantize_stage.kept_nbytes(model, planned, "fp16")
    if pinned is not None:
        fixed += sum(pinned.nbytes(*get_module(model, name).weight.shape).total for name in outer)
    if max_size <= fixed:
        what = "the norms, the pinned embeddings" if pinned is not None else "the tensors outside the plan (norms)"
        raise InfeasibleBudget(f"--max-size {max_size / 1e6:.1f} MB cannot be met: {what} and the file header alone "
                               f"take {fixed / 1e6:.1f} MB")
    return Budget(max_bytes=max_size, fixed_bytes=fixed, max_latency_ms=max_latency_ms)


def original_hessians(loaded: LoadedModel, config: CalibrationConfig, work: Path, progress: bool,
                      on_stage: Callable[[str], None], calibration: CalibrationSet | None = None) -> HessianSet:
    """The original model's Hessians of every linear layer, from work/hessians.safetensors when
    they were made from this model and calibration, else collected (one pass) and saved there. A
    streamed model's stay on disk, one file per block in work/hessians/, read when used."""
    path = Path(work) / ("hessians" if loaded.streamed else "hessians.safetensors")
    load = calibrate_stage.load_hessian_files if loaded.streamed else calibrate_stage.load_hessians
    hessians = load(path, loaded, config)
    if hessians is None:
        on_stage("collecting Hessians of every linear layer (original model)")
        calibration = calibration or calibrate_stage.calibrate(loaded.tokenizer, config, loaded=loaded, work=work,
                                                               progress=progress)
        if loaded.streamed:
            path.mkdir(parents=True, exist_ok=True)
            return calibrate_stage.collect_hessians(loaded, calibration, store=path, progress=progress)
        hessians = calibrate_stage.collect_hessians(loaded, calibration, progress=progress)
        calibrate_stage.save_hessians(hessians, path)
    return hessians


def original_fisher(loaded: LoadedModel, calibration: CalibrationSet, windows: int, work: Path, progress: bool,
                    on_stage: Callable[[str], None]) -> FisherSet:
    """The original model's Fisher statistics on the first `windows` calibration windows, from
    work/fisher.safetensors when made from this model, calibration and windows, else collected and saved."""
    path = Path(work) / "fisher.safetensors"
    fisher = calibrate_stage.load_fisher(path, loaded, calibration.config, windows=windows, seed=0)
    if fisher is None:
        on_stage(f"collecting the Fisher information of every layer's outputs ({windows} windows, forward and backward)")
        fisher = calibrate_stage.collect_fisher(loaded, calibration, windows=windows, seed=0, progress=progress)
        calibrate_stage.save_fisher(fisher, path)
    return fisher


def _sensitivity(request: PlanRequest, loaded: LoadedModel, formats, embed: list[Choice], calibration: CalibrationSet,
                 held_back, hessians: HessianSet, on_stage: Callable[[str], None],
                 keep_results: sensitivity_stage.SweepResults) -> tuple[SensitivityTable, str]:
    """The sensitivity table, from work/sensitivity.json when it holds one made the same way, and
    its origin (PlanReport.sensitivity_origin); a table scored now leaves its sweep's GPTQ results
    in keep_results (measure_sensitivity)."""
    method = request.sensitivity
    key = {"source": loaded.source.sha256(), "calibration": config_to_json(request.calibration), "method": method,
           "formats": [f.name for f in formats], "embed_formats": [c.name for c in embed],
           "windows": {"fisher": [request.fisher_windows, 0 if held_back is None else request.slice_windows],
                       "measured": request.slice_windows, "proxy": 0}[method]}
    path = Path(request.work) / SENSITIVITY_FILE
    cached = {}
    if path.is_file():
        try:
            cached = load_checked_json(path)
        except CorruptCacheError as e:
            warn_recomputed(e)
    for entry in cached.get("entries", []):
        if entry.get("key") == key:
            try:
                return SensitivityTable.from_json(entry["table"]), "cached"
            except (TightfitError, KeyError, TypeError, ValueError) as e:  # e.g. a table of an older version
                warn_recomputed(CorruptCacheError(f"the cached table in {path} is unusable ({e})"))

    def made_the_same_way(other: object, *but: str) -> bool:  # a cached table's key equals ours except in `but`
        return isinstance(other, dict) and {**other, **{k: key[k] for k in but}} == key

    # a table made the same way for more candidates: these are scored in it exactly as they would be alone
    for entry in cached.get("entries", []):
        other = entry.get("key")
        if (made_the_same_way(other, "formats", "embed_formats")
                and {*key["formats"]} <= {*other.get("formats", [])} and {*key["embed_formats"]} <= {*other.get("embed_formats", [])}
                and bool(key["embed_formats"]) == bool(other.get("embed_formats"))):  # embeddings in both plans or in neither
            try:
                return SensitivityTable.from_json(entry["table"]).restricted(formats, embed), "cached"
            except (TightfitError, KeyError, TypeError, ValueError):
                continue
    # a table made the same way but for other embedding candidates: its linear layers' scores stand
    linear_from = None
    for entry in cached.get("entries", []):
        other = entry.get("key")
        if made_the_same_way(other, "embed_formats"):
            try:
                linear_from = SensitivityTable.from_json(entry["table"])
            except (TightfitError, KeyError, TypeError, ValueError):
                continue
    fisher = None
    if method == "fisher":
        fisher = original_fisher(loaded, calibration, request.fisher_windows, request.work, request.progress, on_stage)
    if linear_from is not None:
        on_stage(f"scoring the embeddings in their candidates (the linear layers' scores from {path})")
    else:
        on_stage(f"scoring every layer in each of its candidates ({sensitivity_stage.METHOD_TEXT[method]})")
    table = sensitivity_stage.measure_sensitivity(loaded, hessians, formats, method=method, fisher=fisher,
                                                  slice_tokens=held_back, embed_choices=embed, progress=request.progress,
                                                  linear_from=linear_from, keep_results=keep_results)
    entries = [e for e in cached.get("entries", []) if e.get("key") != key][-7:]
    atomic_write_json(path, {"entries": entries + [{"key": key, "table": table.to_json()}]}, checksum=True)
    return table, "scored" if linear_from is None else "lent"


def _refuse_impossible_size(loaded: LoadedModel, formats, embed: list[Choice], budget: Budget) -> None:
    """Bytes need no sensitivity: a size budget that no mix of candidates meets is refused (by the
    allocate stage's own message) before minutes of Hessians, Fisher and sensitivity are spent."""
    if budget.max_latency_ms is not None:  # the joint limit is checked with the measured latencies
        return
    shapes, nbytes = sensitivity_stage.layer_bytes(loaded, formats, embed)
    choices = {layer: [allocate_stage.LayerChoice(fmt=parse_choice(name), nbytes=b, sensitivity=0.0) for name, b in row.items()]
               for layer, row in nbytes.items()}
    allocate_stage.allocate(shapes, choices, budget)


def make_plan(request: PlanRequest, loaded: LoadedModel | None = None,
              on_stage: Callable[[str], None] = lambda _: None) -> PlanReport:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if loaded is None:
        on_stage(f"loading {request.model}")
        loaded = load_model(request.model)
    formats = [parse_format(f) for f in request.formats]
    embed = request.embed_choices()
    work = Path(request.work)
    seconds["load"] = time.perf_counter() - t
    latency = None
    budget = request.budget
    if request.profile is not None or budget.max_latency_ms is not None:
        t = time.perf_counter()
        config = request.profile or default_profile_config()
        pinned = request.pinned_embeddings()
        latency = profile_model(loaded, formats, config, work, on_stage, head_formats=embed or [pinned])
        # A pinned head is part of the fixed time.
        budget = dataclasses.replace(budget, fixed_latency_ms=latency.fixed_ms + (0.0 if embed else latency.head_ms(pinned)))
        seconds["profile"] = time.perf_counter() - t

    _refuse_impossible_size(loaded, formats, embed, budget)

    t = time.perf_counter()
    cal = request.calibration
    held_back = request.slice_windows if sensitivity_stage.uses_held_back(request.sensitivity, loaded.streamed) else 0
    on_stage(f"calibration text: {cal.n_samples} + {held_back} held-back windows of {cal.seq_len} tokens of {cal.text} "
             f"(forwards in {cal.forward_dtype})")
    calibration, held_back_tokens = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, cal, held_back, loaded=loaded,
                                                                             work=work, progress=request.progress)
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    hessians = original_hessians(loaded, cal, work, request.progress, on_stage, calibration)
    seconds["hessians"] = time.perf_counter() - t

    t = time.perf_counter()
    swept = sensitivity_stage.SweepResults()
    table, origin = _sensitivity(request, loaded, formats, embed, calibration, held_back_tokens if held_back else None, hessians,
                                 on_stage, swept)
    seconds["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    arch = loaded.arch
    tied = arch.head not in table.shapes

    def latency_ms(layer: str, choice: Choice) -> float | None:
        if latency is None:
            return None
        if layer == arch.head or (layer == arch.embeddings and tied):
            return latency.head_ms(choice)
        if layer == arch.embeddings:
            return 0.0  # a lookup of one row per token
        return latency.decode_ms(table.shapes[layer], choice)

    choices = {
        layer: [allocate_stage.LayerChoice(fmt=c, nbytes=table.nbytes[layer][c.name], sensitivity=table.damage(layer, c),
                                           latency_ms=latency_ms(layer, c))
                for c in table.candidates(layer)]
        for layer in table.shapes
    }
    plan = allocate_stage.allocate(table.shapes, choices, budget)
    if not embed:
        plan = dataclasses.replace(plan, pinned={name: request.pinned_embeddings() for name in embedding_layers(loaded.model, arch)})
    seconds["allocate"] = time.perf_counter() - t
    ready = {layer: (swept.weights[fmt.name][layer], table.proxy[layer][fmt.name]) for layer, fmt in plan.quantized.items()
             if layer in swept.weights.get(fmt.name, {})}
    return PlanReport(plan=plan, sensitivity=table, choices=choices, seconds=seconds, latency=latency, calibration=calibration,
                      sensitivity_origin=origin,
                      ready=ReadyLayers(ready, swept.settings) if ready else None)

"""The plans of bench/formats.py: the planner's mix of formats at a bits/weight, made from the run's own
Hessians and scored like every format (issue: formats, item 5: new formats join the planner's candidates)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import peers_runs
from tightfit.formats.files import atomic_write_json
from tightfit.formats.registry import parse_format

if TYPE_CHECKING:
    from formats import Progress

# Plans (the planner's mix of formats, one per linear layer, embeddings and head fp16 as in every entry
# here) at these bits/weight, from these candidates: a ladder over the bits, each rung the format of
# its size class with the lowest KL on the held-back windows in this run's 4.5 and 3.5 rows (SpQR at
# 2 and 3 bits, nl4g32-dq at 4.27, lut4g32 at 4.5) with w6g128 on top for the layers that need it most.
PLAN_BUDGETS = (3.5,)
PLAN_CANDIDATES = ("spqr-w2g32-s3-o0.5", "spqr-w3g32-s3-o0.5", "nl4g32-dq", "lut4g32", "w6g128")
PLAN_SENSITIVITY = "fisher"  # what `tightfit compress --bpw` uses by default


def plan_name(bpw: float, candidates: list[str] | tuple[str, ...] = PLAN_CANDIDATES) -> str:
    """plan-B for the default candidates, else plan-B-<hash of the candidates> (their names are in its note),
    so that a resumed run never takes a plan made from other candidates for this one."""
    if tuple(candidates) == PLAN_CANDIDATES:
        return f"plan-{bpw:g}"
    return f"plan-{bpw:g}-{hashlib.sha256(','.join(candidates).encode()).hexdigest()[:6]}"


def measure_plans(model: str, loaded, calibration, hessians, scorer, budgets: list[float], candidates: list[str], out: Path,
                  progress: Progress, fp32_ref: bool = False) -> None:
    """A plan at each bits/weight of `budgets` (tightfit.pipeline.make_plan: the fisher sensitivity of
    every linear layer in every candidate, HiGHS; embeddings and head pinned to fp16), GPTQ of it from
    `hessians` (the sweep's results of its choices taken as they are), scored like every format. The
    sensitivity table is cached in a work folder beside the run's other caches, so each budget
    after the first, and a resumed run, only quantizes and scores."""
    from tightfit.artifacts import QuantizeConfig
    from tightfit.pipeline import PlanRequest, make_plan
    from tightfit.stages.allocate import Budget
    from tightfit.stages.calibrate import save_hessians

    names = {plan_name(b, candidates): b for b in budgets}
    todo = {name: b for name, b in names.items() if not progress.has("tightfit", name)}
    if not todo:
        return
    work = peers_runs.CACHE / f"plans-{hessians.source_sha256[:16]}-{'-'.join(candidates)}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "hessians.safetensors").exists():
        save_hessians(hessians, work / "hessians.safetensors")  # the run's own: make_plan reads them, collects nothing
    for name, b in todo.items():
        t = time.perf_counter()
        request = PlanRequest(model=model, budget=Budget(max_bpw=b), work=work, formats=tuple(candidates),
                              embed_formats=("fp16",), sensitivity=PLAN_SENSITIVITY, calibration=calibration.config)
        report = make_plan(request, loaded, on_stage=lambda s: print(f"  {name}: {s}", flush=True))
        plan_s = time.perf_counter() - t
        timing = work / "planning-seconds.json"  # the sweep's time, for the notes of the plans that reuse it
        if report.sensitivity_origin != "cached":
            atomic_write_json(timing, {"seconds": plan_s})
        swept = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
        config = QuantizeConfig(fmt=parse_format(candidates[0]), method="gptq", plan=report.plan.quantized)
        entries, folders = peers_runs.run_tightfit(loaded, calibration, hessians, {name: config}, scorer, out, fp32_ref, ready=report.ready)
        for e in entries:
            e.note = (f"{PLAN_SENSITIVITY} plan from {', '.join(candidates)}; planning {plan_s:.0f} s "
                      f"({report.sensitivity_origin} sensitivities"
                      + (f", measured in {swept:.0f} s" if swept is not None and report.sensitivity_origin == "cached" else "") + ")")
        progress.add(entries)
        for folder in folders.values():
            shutil.rmtree(folder)

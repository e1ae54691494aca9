"""Mixed-precision plans vs the best uniform format at 2.5, 3.0 and 3.5 bits/weight on the default model.

    .venv/bin/python bench/planner.py [--windows 64] [--budgets 2.5,3.0,3.5]

The planner measures every layer's sensitivity to every candidate format (GPTQ proxy, and the KL
increase on a held-back calibration window when only that layer is quantized), then solves the
integer program for each budget, then refines each plan with EvoPress on the real KL of whole plans
over held-back calibration windows (`--refine` generations). Plans and uniform formats are all
quantized with GPTQ from the same original-model Hessians, packed, reloaded, and scored against the
original on held-out evaluation text: through tightfit's compiled engine (the headline KL) and as the
dequantized fp32 torch model. Each plan is set against every uniform format of its size class
(bench/common.py RIVAL_WINDOW); nothing is chosen on the evaluation text.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ENGINE_COLUMNS, RIVAL_WINDOW, machine_info, machine_line, protocol_line, quantize_and_evaluate, rival_window_text, rivals,
    score_columns, score_json, verdict_cell, windows_help, write_results,
)

from tightfit.algorithms.evopress import EvolutionConfig  # noqa: E402
from tightfit.artifacts import QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.pipeline import PlanRequest, make_plan  # noqa: E402
from tightfit.stages import allocate as allocate_stage  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages.sensitivity import PlanLoss  # noqa: E402

UNIFORM = ["w2g32", "w2g16", "w3g128", "w3g64", "w3g32", "w4g128"]
WORK = Path(__file__).resolve().parents[1] / ".cache" / "planner"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--candidates", default="w2g64,w2g32,w3g128,w3g64,w3g32,w4g128", help="candidate formats per layer")
    ap.add_argument("--budgets", default="2.5,3.0,3.5")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--refine", type=int, default=32, help="EvoPress generations per plan (0: no refinement)")
    ap.add_argument("--refine-windows", type=int, default=4, help="held-back calibration windows EvoPress measures KL on")
    args = ap.parse_args()
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    t = time.perf_counter()
    request = PlanRequest(model=args.model, budget=allocate_stage.Budget(max_bpw=budgets[0]), work=WORK,
                          formats=tuple(args.candidates.split(",")))
    sens_file = WORK / "sensitivity.json"
    written_before = sens_file.stat().st_mtime_ns if sens_file.exists() else None
    first = make_plan(request, loaded)
    measure_seconds = time.perf_counter() - t
    measured_now = sens_file.stat().st_mtime_ns != written_before  # make_plan rewrites it only when it measures
    table = first.sensitivity
    formats = list(table.formats)
    choices = {layer: [allocate_stage.LayerChoice(fmt=f, nbytes=table.nbytes[layer][f.name], sensitivity=table.damage(layer, f))
                       for f in formats] for layer in table.shapes}
    plans = {}
    for b in budgets:
        t = time.perf_counter()
        plans[b] = allocate_stage.allocate(table.shapes, choices, allocate_stage.Budget(max_bpw=b))
        print(f"budget {b}: plan {plans[b].bits_per_weight:.3f} bpw solved in {time.perf_counter() - t:.2f}s", flush=True)

    # windows [refine_windows, T]: the first is the sensitivity slice
    calibration, windows = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, PlanRequest.calibration, args.refine_windows)
    hessians = calibrate_stage.load_hessians(WORK / "hessians.safetensors", loaded, calibration.config)
    refined, refine_seconds, slice_kl = {}, {}, {}
    with PlanLoss(loaded, hessians, windows, screen_windows=1) as plan_loss:
        for b, p in plans.items():
            plan_loss.reset_anchor()
            slice_kl[f"plan {b}"] = plan_loss.loss(p.formats, 1)
            if args.refine:
                t = time.perf_counter()
                refined[b] = allocate_stage.refine(p, table.shapes, choices, plan_loss.loss, EvolutionConfig(generations=args.refine))
                refine_seconds[b] = time.perf_counter() - t
                slice_kl[f"plan+evo {b}"] = refined[b].loss
                print(f"budget {b}: EvoPress {refined[b].start_loss:.4f} -> {refined[b].loss:.4f} on held-back text "
                      f"in {refine_seconds[b]:.0f}s", flush=True)
    fmt0 = parse_format(request.formats[0])
    configs = {f"plan {b}": QuantizeConfig(fmt=fmt0, method="gptq", plan=dict(p.formats)) for b, p in plans.items()}
    configs.update({f"plan+evo {b}": QuantizeConfig(fmt=fmt0, method="gptq", plan=dict(r.plan.formats)) for b, r in refined.items()})
    configs.update({name: QuantizeConfig(fmt=parse_format(name), method="gptq") for name in args.uniform.split(",")})
    eval_config = EvalConfig(n_windows=args.windows)
    rows, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians)

    table_rows = []
    for key in configs:
        r = rows[key]
        row = {"name": key, "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
               **score_json(scores[key])}
        if key.startswith("plan"):
            b = float(key.split()[1])
            p = refined[b].plan if key.startswith("plan+evo") else plans[b]
            row.update(predicted_loss=p.predicted_loss, heldback_kl=slice_kl[key], mix=dict(Counter(f.name for f in p.formats.values())))
            if key.startswith("plan+evo"):
                row.update(refine_seconds=refine_seconds[b], history=refined[b].history, evaluations=list(refined[b].evaluations))
        table_rows.append(row)
    ev0 = next(iter(scores.values())).engine
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "candidates": [f.name for f in formats], "calibration": config_to_json(PlanRequest.calibration),
        "slice_tokens": table.slice_tokens, "measure_seconds": measure_seconds, "sensitivity_measured_now": measured_now,
        "sensitivity_seconds": first.seconds["sensitivity"], "evaluation": config_to_json(eval_config),
        "n_tokens": ev0.n_tokens, "original_ppl": ev0.reference_ppl, "rank_agreement_spearman": table.rank_agreement(),
        "rival_window_bpw": RIVAL_WINDOW, "rows": table_rows, "budgets": verdicts(table_rows, budgets),
        "plans": {str(b): p.to_json() for b, p in plans.items()},
        "refined": {str(b): r.to_json() for b, r in refined.items()}, "refine_generations": args.refine,
        "refine_windows": args.refine_windows, "wall_s": round(time.perf_counter() - t0, 1),
    }
    md = markdown(payload)
    paths = write_results("planner", payload, md)
    print(md)
    print("written:", *paths)


def verdicts(table_rows: list[dict], budgets: list[float]) -> list[dict]:
    """Each plan (with and without EvoPress) against the best uniform rival of its size class by
    evaluation KL; plan_wins None (n/a) when no uniform format is in the window."""
    uniform = [r for r in table_rows if not r["name"].startswith("plan")]
    out = []
    for b in budgets:
        for plan_row in [r for r in table_rows if r["name"] in (f"plan {b}", f"plan+evo {b}")]:
            best = min(rivals(uniform, plan_row["bits_per_weight"]), key=lambda r: r["kl"], default=None)
            out.append({"budget": b, "plan": plan_row["name"], "plan_bpw": plan_row["bits_per_weight"], "plan_kl": plan_row["kl"],
                        "best_uniform": best and best["name"], "uniform_bpw": best and best["bits_per_weight"],
                        "uniform_kl": best and best["kl"], "plan_wins": None if best is None else plan_row["kl"] < best["kl"]})
    return out


def markdown(payload: dict) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    lines = [
        f"# Planner: mixed precision vs uniform formats on {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"Candidates per layer: {', '.join(payload['candidates'])}. Sensitivity = KL increase on {payload['slice_tokens']} "
        f"held-back calibration tokens with only that layer quantized (GPTQ); "
        + (f"measured in this run in {payload['sensitivity_seconds'] / 60:.1f} min (cached afterwards). "
           if payload["sensitivity_measured_now"] else "measured by an earlier run and read from its cache "
           "(.cache/planner/sensitivity.json, which does not record how long that took). ")
        + "Plans: HiGHS MILP. Everything quantized with GPTQ from the same original-model Hessians. "
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} {ENGINE_COLUMNS} "
        f"Wall time {payload['wall_s'] / 60:.0f} min.",
        "",
        "| model | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | formats |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(payload["rows"], key=lambda r: r["bits_per_weight"]):
        mix = ", ".join(f"{k} x{v}" for k, v in r.get("mix", {}).items())
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {score_columns(r)} | {mix} |")
    lines += ["", f"Every plan (none is chosen among them) against its rivals: {rival_window_text()}. "
              "KL is the evaluation KL (engine); n/a: no uniform format in the window.", "",
              "| budget | plan | plan bpw | plan KL | best uniform rival | its bpw | its KL | plan wins |",
              "|---|---|---|---|---|---|---|---|"]
    for v in payload["budgets"]:
        rival = "- | - | -" if v["best_uniform"] is None else f"{v['best_uniform']} | {v['uniform_bpw']:.3f} | {v['uniform_kl']:.4f}"
        lines.append(f"| {v['budget']} | {v['plan']} | {v['plan_bpw']:.3f} | {v['plan_kl']:.4f} | {rival} | {verdict_cell(v['plan_wins'])} |")
    lines += ["", "Proxy (GPTQ objective) vs measured KL increase, Spearman rank correlation across layers: "
              + ", ".join(f"{k} {v:.2f}" for k, v in payload["rank_agreement_spearman"].items())]
    lines += ["", f"Additive model vs the real KL on the {payload['refine_windows']} held-back calibration windows (EvoPress's "
              "objective, measured with the torch reference; the evaluation above is on other, held-out text):", "",
              "| plan | predicted (sum of single-layer KL increases) | measured KL of the whole plan | EvoPress time |",
              "|---|---|---|---|"]
    for r in payload["rows"]:
        if r["name"].startswith("plan"):
            secs = f"{r['refine_seconds'] / 60:.1f} min" if "refine_seconds" in r else "-"
            lines.append(f"| {r['name']} | {r['predicted_loss']:.4f} | {r['heldback_kl']:.4f} | {secs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

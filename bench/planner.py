"""Mixed-precision plans vs the best uniform format at 2.5, 3.0 and 3.5 bits/weight on the default model.

    .venv/bin/python bench/planner.py [--windows 64] [--budgets 2.5,3.0,3.5]

The planner measures every layer's sensitivity to every candidate format (GPTQ proxy, and the KL
increase on a held-back calibration window when only that layer is quantized), then solves the
integer program for each budget, then refines each plan with EvoPress on the real KL of whole plans
over held-back calibration windows (`--refine` generations). Plans and uniform formats are all
quantized with GPTQ from the same original-model Hessians, packed, reloaded, and scored against the
original on held-out evaluation text in one pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, quantize_and_evaluate, write_results  # noqa: E402

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
SIZE_CLASS = 0.35  # rivals: uniform formats at least as large as the plan and at most this much larger (bits/weight)
WORK = Path(__file__).resolve().parents[1] / ".cache" / "planner"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens (protocol default 64; 32 keeps this run near 25 min)")
    ap.add_argument("--candidates", default="w2g64,w2g32,w3g128,w3g64,w3g32,w4g128", help="candidate formats per layer")
    ap.add_argument("--budgets", default="2.5,3.0,3.5")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--refine", type=int, default=32, help="EvoPress generations per plan (0: no refinement)")
    ap.add_argument("--refine-windows", type=int, default=4, help="held-back calibration windows EvoPress measures KL on")
    args = ap.parse_args()

    loaded = load_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    t = time.perf_counter()
    request = PlanRequest(model=args.model, budget=allocate_stage.Budget(max_bpw=budgets[0]), work=WORK,
                          formats=tuple(args.candidates.split(",")))
    first = make_plan(request, loaded)
    measure_seconds = time.perf_counter() - t
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
    rows, results = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians)

    table_rows = []
    for key in configs:
        r, ev = rows[key], results[key]
        row = {"name": key, "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
               "ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1}
        if key.startswith("plan"):
            b = float(key.split()[1])
            p = refined[b].plan if key.startswith("plan+evo") else plans[b]
            row.update(predicted_loss=p.predicted_loss, heldback_kl=slice_kl[key], mix=dict(Counter(f.name for f in p.formats.values())))
            if key.startswith("plan+evo"):
                row.update(refine_seconds=refine_seconds[b], history=refined[b].history, evaluations=list(refined[b].evaluations))
        table_rows.append(row)
    verdicts = []
    for b in budgets:
        for plan_row in [r for r in table_rows if r["name"] in (f"plan {b}", f"plan+evo {b}")]:
            lo = plan_row["bits_per_weight"]
            rivals = [r for r in table_rows if not r["name"].startswith("plan") and lo <= r["bits_per_weight"] <= lo + SIZE_CLASS]
            best = min(rivals, key=lambda r: r["kl"], default=None)
            verdicts.append({"budget": b, "plan": plan_row["name"], "plan_bpw": lo, "plan_kl": plan_row["kl"],
                             "best_uniform": best and best["name"], "uniform_bpw": best and best["bits_per_weight"],
                             "uniform_kl": best and best["kl"], "plan_wins": best is None or plan_row["kl"] < best["kl"]})
    agreement = table.rank_agreement()
    ref_ppl = next(iter(results.values())).reference_ppl
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "candidates": [f.name for f in formats], "calibration": config_to_json(PlanRequest.calibration),
        "slice_tokens": table.slice_tokens, "measure_seconds": measure_seconds, "evaluation": config_to_json(eval_config),
        "original_ppl": ref_ppl, "rank_agreement_spearman": agreement, "rows": table_rows, "budgets": verdicts,
        "plans": {str(b): p.to_json() for b, p in plans.items()},
        "refined": {str(b): r.to_json() for b, r in refined.items()}, "refine_generations": args.refine,
        "refine_windows": args.refine_windows,
    }
    lines = [
        f"# Planner: mixed precision vs uniform formats on {args.model}",
        "",
        f"Candidates per layer: {', '.join(f.name for f in formats)}. Sensitivity = KL increase on {table.slice_tokens} "
        f"held-back calibration tokens with only that layer quantized (GPTQ); "
        + (f"measuring took {measure_seconds / 60:.1f} min (cached afterwards). " if measure_seconds > 60 else
           "measured by an earlier run and read from its cache (.cache/planner/sensitivity.json). ")
        + f"Plans: HiGHS MILP. Everything quantized with GPTQ from the same original-model Hessians; "
        f"evaluation {eval_config.n_windows} x {eval_config.ctx} held-out wiki tokens, original PPL {ref_ppl:.3f}. "
        f"Machine: {payload['machine']['cpu']}.",
        "",
        "| model | bits/weight | PPL | KL | top-1 | formats |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(table_rows, key=lambda r: r["bits_per_weight"]):
        mix = ", ".join(f"{k} x{v}" for k, v in r.get("mix", {}).items())
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | {mix} |")
    lines += ["", f"Rivals of a plan: every uniform format at least as large and at most {SIZE_CLASS} bits/weight larger.", "",
              "| budget | plan | plan bpw | plan KL | best uniform of equal or larger size | its bpw | its KL | plan wins |",
              "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['budget']} | {v['plan']} | {v['plan_bpw']:.3f} | {v['plan_kl']:.4f} | {v['best_uniform'] or '-'} | "
                     f"{v['uniform_bpw'] or 0:.3f} | {v['uniform_kl'] or 0:.4f} | {'yes' if v['plan_wins'] else 'no'} |")
    lines += ["", "Proxy (GPTQ objective) vs measured KL increase, Spearman rank correlation across layers: "
              + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items())]
    lines += ["", f"Additive model vs the real KL on the {args.refine_windows} held-back calibration windows (EvoPress's "
              "objective; the evaluation above is on other, held-out text):", "",
              "| plan | predicted (sum of single-layer KL increases) | measured KL of the whole plan | EvoPress time |",
              "|---|---|---|---|"]
    for r in table_rows:
        if r["name"].startswith("plan"):
            secs = f"{r['refine_seconds'] / 60:.1f} min" if "refine_seconds" in r else "-"
            lines.append(f"| {r['name']} | {r['predicted_loss']:.4f} | {r['heldback_kl']:.4f} | {secs} |")
    paths = write_results("planner", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("written:", *paths)


if __name__ == "__main__":
    main()

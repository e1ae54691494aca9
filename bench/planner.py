"""Mixed-precision plans vs the best uniform format at 2.5, 3.0 and 3.5 bits/weight on the default model.

    .venv/bin/python bench/planner.py [--windows 64] [--budgets 2.5,3.0,3.5] [--sensitivity fisher,measured]

For each sensitivity method (`--sensitivity`: fisher, the KL increase predicted from the Fisher
information of each layer's outputs and its GPTQ error; measured, the KL increase on a held-back
calibration window when only that layer is quantized; proxy, the GPTQ objective) the planner scores
every layer in every candidate format, then solves the integer program for each budget. The
embeddings and head stay fp16 in every model here, plans and uniform formats alike, so bits/weight
compare (`tightfit plan` plans them too by default). Plans and uniform formats are all quantized
with GPTQ from the same original-model Hessians, packed, reloaded, and scored against the original
on held-out evaluation text: through tightfit's compiled engine (the headline KL) and as the
dequantized fp32 torch model. Each plan is set against every uniform format of its size class
(bench/common.py RIVAL_WINDOW); nothing is chosen on the evaluation text. The additive model is
checked on `--heldback-windows` held-back calibration windows: each plan's predicted loss (the sum of
its layers' damages) against the real KL of the whole plan (`PlanLoss`).
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

from tightfit.artifacts import QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.pipeline import PlanRequest, make_plan  # noqa: E402
from tightfit.stages import allocate as allocate_stage  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages.sensitivity import METHOD_TEXT, METHODS, PlanLoss  # noqa: E402

UNIFORM = ["w2g32", "w2g16", "w3g128", "w3g64", "w3g32", "w4g128"]
WORK = Path(__file__).resolve().parents[1] / ".cache" / "planner"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--candidates", default="w2g64,w2g32,w3g128,w3g64,w3g32,w4g128", help="candidate formats per layer")
    ap.add_argument("--budgets", default="2.5,3.0,3.5")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--sensitivity", default="fisher,measured", help=f"comma-separated methods among {', '.join(METHODS)}: "
                    "a plan per budget for each")
    ap.add_argument("--heldback-windows", type=int, default=4, help="held-back calibration windows the whole plans' real KL is measured on")
    args = ap.parse_args()
    t0 = time.perf_counter()
    methods = [m.strip() for m in args.sensitivity.split(",") if m.strip()]
    if not methods or not set(methods) <= set(METHODS):
        ap.error(f"--sensitivity takes methods among {', '.join(METHODS)}, got {args.sensitivity!r}")

    loaded = load_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    tables, seconds, measured_now, plans = {}, {}, {}, {}
    for method in methods:
        t = time.perf_counter()
        request = PlanRequest(model=args.model, budget=allocate_stage.Budget(max_bpw=budgets[0]), work=WORK,
                              formats=tuple(args.candidates.split(",")), embed_formats=("fp16",), sensitivity=method)
        sens_file = WORK / "sensitivity.json"
        written_before = sens_file.stat().st_mtime_ns if sens_file.exists() else None
        first = make_plan(request, loaded)
        seconds[method] = time.perf_counter() - t
        measured_now[method] = sens_file.stat().st_mtime_ns != written_before  # rewritten only when it scores
        table = tables[method] = first.sensitivity
        choices = {layer: [allocate_stage.LayerChoice(fmt=f, nbytes=table.nbytes[layer][f.name], sensitivity=table.damage(layer, f))
                           for f in table.formats] for layer in table.shapes}
        for b in budgets:
            t = time.perf_counter()
            plans[f"plan {b} {method}"] = allocate_stage.allocate(table.shapes, choices, allocate_stage.Budget(max_bpw=b))
            print(f"budget {b} ({method}): plan {plans[f'plan {b} {method}'].bits_per_weight:.3f} bpw solved in "
                  f"{time.perf_counter() - t:.2f}s", flush=True)

    calibration, windows = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, PlanRequest.calibration, args.heldback_windows)
    hessians = calibrate_stage.load_hessians(WORK / "hessians.safetensors", loaded, calibration.config)
    heldback_kl = {}
    with PlanLoss(loaded, hessians, windows, screen_windows=1) as plan_loss:
        for key, p in plans.items():
            plan_loss.reset_anchor()
            heldback_kl[key] = plan_loss.loss(p.quantized, 1)
    fmt0 = parse_format(args.candidates.split(",")[0])
    configs = {key: QuantizeConfig(fmt=fmt0, method="gptq", plan=p.quantized) for key, p in plans.items()}
    configs.update({name: QuantizeConfig(fmt=parse_format(name), method="gptq") for name in args.uniform.split(",")})
    eval_config = EvalConfig(n_windows=args.windows)
    rows, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians)

    table_rows = []
    for key in configs:
        r = rows[key]
        row = {"name": key, "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
               **score_json(scores[key])}
        if key in plans:
            p = plans[key]
            row.update(predicted_loss=p.predicted_loss, heldback_kl=heldback_kl[key], mix=dict(Counter(f.name for f in p.formats.values())))
        table_rows.append(row)
    ev0 = next(iter(scores.values())).engine
    agreement = {}
    if "measured" in tables:
        agreement["proxy"] = tables["measured"].rank_agreement()
        agreement.update({m: tables[m].rank_agreement(tables["measured"]) for m in tables if m != "measured"})
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "candidates": [f.name for f in next(iter(tables.values())).formats], "calibration": config_to_json(PlanRequest.calibration),
        "methods": {m: {"tokens": tables[m].tokens, "seconds": seconds[m], "measured_now": measured_now[m]} for m in methods},
        "evaluation": config_to_json(eval_config), "n_tokens": ev0.n_tokens, "original_ppl": ev0.reference_ppl,
        "rank_agreement_spearman": agreement, "rival_window_bpw": RIVAL_WINDOW, "rows": table_rows,
        "budgets": verdicts(table_rows, budgets), "plans": {key: p.to_json() for key, p in plans.items()},
        "heldback_windows": args.heldback_windows, "wall_s": round(time.perf_counter() - t0, 1),
    }
    md = markdown(payload)
    paths = write_results("planner", payload, md)
    print(md)
    print("written:", *paths)


def verdicts(table_rows: list[dict], budgets: list[float]) -> list[dict]:
    """Each plan (one per sensitivity method) against the best uniform rival of its size class by
    evaluation KL; plan_wins None (n/a) when no uniform format is in the window."""
    uniform = [r for r in table_rows if not r["name"].startswith("plan")]
    out = []
    for b in budgets:
        for plan_row in [r for r in table_rows if r["name"].startswith(f"plan {b} ")]:
            best = min(rivals(uniform, plan_row["bits_per_weight"]), key=lambda r: r["kl"], default=None)
            out.append({"budget": b, "plan": plan_row["name"], "plan_bpw": plan_row["bits_per_weight"], "plan_kl": plan_row["kl"],
                        "best_uniform": best and best["name"], "uniform_bpw": best and best["bits_per_weight"],
                        "uniform_kl": best and best["kl"], "plan_wins": None if best is None else plan_row["kl"] < best["kl"]})
    return out


def markdown(payload: dict) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    scored = []
    for m, info in payload["methods"].items():
        when = (f"scored in this run in {info['seconds'] / 60:.1f} min (cached afterwards)" if info["measured_now"]
                else "read from the cache of an earlier run (.cache/planner/sensitivity.json, which does not record how long it took)")
        scored.append(f"{m} = {METHOD_TEXT[m]}, on {info['tokens']} tokens, {when}")
    lines = [
        f"# Planner: mixed precision vs uniform formats on {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"Candidates per layer: {', '.join(payload['candidates'])}. Sensitivity methods, a plan per budget for each: "
        + "; ".join(scored) + ". Embeddings and head fp16 in every model. "
        "Plans: HiGHS MILP. Everything quantized with GPTQ from the same original-model Hessians. "
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
    for method, agreement in payload["rank_agreement_spearman"].items():
        lines += ["", f"{method} vs measured KL increase, Spearman rank correlation across layers: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items())]
    lines += ["", f"Additive model vs the real KL on {payload['heldback_windows']} held-back calibration windows (measured with "
              "the torch reference; the evaluation above is on other, held-out text):", "",
              "| plan | predicted (sum of its layers' damages) | measured KL of the whole plan |", "|---|---|---|"]
    for r in payload["rows"]:
        if r["name"].startswith("plan"):
            lines.append(f"| {r['name']} | {r['predicted_loss']:.4f} | {r['heldback_kl']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

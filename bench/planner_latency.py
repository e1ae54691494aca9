"""Does a latency-budgeted plan meet its budget when it runs? Predicted vs measured decode latency.

    .venv/bin/python bench/planner_latency.py [--threads 2] [--repeats 7] [--fractions 0.2,0.4,0.6,0.8]

Profiles this machine (cached in .cache/planner/latency.json, like `tightfit profile`: kernel
timings with weights streamed from memory, scaled per format to the engine's own in-context timers
in whole-model decodes), then plans
the default model under decode-latency budgets spread between the fastest and the slowest plan
the candidates allow (`--fractions` of that range), using the sensitivities bench/planner.py
measured (cached in the same folder). Each plan, and each candidate format uniformly, is packed
(round to nearest: speed does not depend on the values) and its decode time measured on the
engine exactly as the profile's whole-model decodes were (a 32-token prompt, then 64 greedy tokens), all
models round-robin in one process, `--repeats` runs each; the median is reported. Embeddings and
head are w8g32-sym in every model (`--embed-format`), profile included. Run it alone:
a concurrent process wrecks 2-thread timings on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.pipeline import PlanRequest, linear_layer_shapes, make_plan, profile_model, uniform_rtn_packed  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.speed import random_prompt, time_round_robin  # noqa: E402
from tightfit.stages.allocate import Budget  # noqa: E402
from tightfit.stages.profile import ProfileConfig  # noqa: E402

WORK = Path(__file__).resolve().parents[1] / ".cache" / "planner"
TOLERANCE = 0.10  # the bar: measured decode within 10 % of the budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per model (round-robin), median reported")
    ap.add_argument("--candidates", default="w2g64,w2g32,w3g128,w3g64,w3g32,w4g128", help="as bench/planner.py")
    ap.add_argument("--fractions", default="0.2,0.4,0.6,0.8", help="budgets: fractions of the range fastest .. slowest plan")
    ap.add_argument("--bpw", default="2.5,3.0,3.5", help="also time the bits/weight plans of bench/planner.py (integer program)")
    ap.add_argument("--embed-format", default="w8g32-sym", help="embeddings and head of every model, as bench/speed.py (Q8_0-like)")
    args = ap.parse_args()
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    formats = [parse_format(f) for f in args.candidates.split(",")]
    config = ProfileConfig(threads=args.threads, embed_format=args.embed_format)
    embed = parse_format(args.embed_format) if args.embed_format else None
    packed_rtn = lambda plan, fmt: uniform_rtn_packed(loaded, fmt, embed, plan)  # noqa: E731
    t = time.perf_counter()
    latency = profile_model(loaded, formats, config, WORK, on_stage=print)
    profile_s = time.perf_counter() - t
    shapes = linear_layer_shapes(loaded)
    fastest = latency.fixed_ms + sum(min(latency.decode_ms(s, f) for f in formats) for s in shapes.values())
    slowest = latency.fixed_ms + sum(max(latency.decode_ms(s, f) for f in formats) for s in shapes.values())
    budgets = [round(fastest + float(x) * (slowest - fastest), 3) for x in args.fractions.split(",")]
    print(f"fixed part {latency.fixed_ms:.3f} ms; plans range {fastest:.3f} .. {slowest:.3f} ms/token; budgets {budgets}")

    models = {}  # name -> (packed, predicted ms, budget ms or None, plan summary)

    def add_plan(name: str, budget: Budget) -> None:
        request = PlanRequest(model=args.model, budget=budget, work=WORK, formats=tuple(args.candidates.split(",")),
                              embed_formats=(args.embed_format or "fp16",), profile=config, progress=False)
        plan = make_plan(request, loaded, on_stage=print).plan
        mix = dict(Counter(f.name for f in plan.formats.values()))
        models[name] = (packed_rtn(plan.quantized, formats[0]), plan.predicted_latency_ms, budget.max_latency_ms,
                        {"bits_per_weight": plan.bits_per_weight, "mix": mix})

    for b in budgets:
        add_plan(f"plan <= {b:.2f} ms", Budget(max_latency_ms=b))
    for b in [float(x) for x in args.bpw.split(",") if x]:
        add_plan(f"plan <= {b} bpw", Budget(max_bpw=b))
    for f in formats:
        predicted = latency.fixed_ms + latency.layers_decode_ms(shapes, {n: f for n in shapes})
        models[f"uniform {f.name}"] = (packed_rtn(None, f), predicted, None, {"bits_per_weight": None, "mix": {f.name: len(shapes)}})

    prompt_tokens, new_tokens = config.fixed_prompt, config.fixed_new_tokens
    backends = {name: FastBackend(m[0], max_positions=prompt_tokens + new_tokens, threads=args.threads) for name, m in models.items()}
    prompt = random_prompt(next(iter(backends.values())).vocab_size, prompt_tokens, 0)
    timed = time_round_robin(backends, prompt, new_tokens, args.repeats)
    runs = {name: [1e3 / d for d in t.decode_tok_s] for name, t in timed.items()}  # ms per decoded token

    rows = []
    for name, (packed, predicted, budget, info) in models.items():
        measured = statistics.median(runs[name])
        rows.append({"name": name, "budget_ms": budget, "predicted_ms": predicted, "measured_ms": measured,
                     "runs_ms": runs[name], "measured_over_predicted": measured / predicted,
                     "within_budget": None if budget is None else measured <= budget * (1 + TOLERANCE),
                     "weight_mb": backends[name].weight_bytes / 1e6, **info})
        print(f"{name}: predicted {predicted:.3f} ms, measured {measured:.3f} ms (runs {min(runs[name]):.3f}..{max(runs[name]):.3f})")
    payload = {"machine": machine_info(), "model": args.model, "threads": args.threads, "candidates": args.candidates.split(","),
               "profile": latency.to_json(), "profile_seconds": profile_s, "repeats": args.repeats, "tolerance": TOLERANCE,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rows": rows,
               "wall_s": round(time.perf_counter() - t0, 1)}
    planned = [r for r in rows if r["budget_ms"] is not None]
    lines = [
        f"# Latency-budgeted plans on {args.model}: predicted vs measured decode",
        "",
        machine_line(payload["machine"], args.threads),
        "",
        f"Read bandwidth {latency.bandwidth_gb_s:.1f} GB/s. "
        f"Prediction = each layer's kernel ms in its format (weights streamed from memory, copies cycled, "
        f"{config.stream_mb} MB) x the format's in-context scale + the fixed part ({latency.fixed_ms:.3f} ms). The "
        "scales and the fixed part come from the profile stage's whole-model decodes, one per candidate format, timed by "
        "the engine's own phase timers (scales: " + ", ".join(f"{k} {v:.2f}" for k, v in latency.context_scale.items())
        + "). Measured: decode ms/token after a "
        f"{prompt_tokens}-token prompt, {new_tokens} tokens, median of {args.repeats} runs, all models round-robin in one process. "
        f"Embeddings and head: {args.embed_format or 'fp16'}. The profile was "
        + ("read from the cache of an earlier run." if profile_s < 5 else f"measured in this run ({profile_s:.0f} s).")
        + f" Wall time {payload['wall_s'] / 60:.0f} min.",
        "",
        "| model | budget ms | predicted ms | measured ms (min..max) | measured / predicted | within budget +10 % | bits/weight | formats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mix = ", ".join(f"{k} x{v}" for k, v in r["mix"].items())
        budget = "-" if r["budget_ms"] is None else f"{r['budget_ms']:.2f}"
        ok = "-" if r["within_budget"] is None else ("yes" if r["within_budget"] else "**no**")
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        lines.append(f"| {r['name']} | {budget} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} "
                     f"({min(r['runs_ms']):.3f}..{max(r['runs_ms']):.3f}) | {r['measured_over_predicted']:.3f} | {ok} | {bpw} | {mix} |")
    met = sum(bool(r["within_budget"]) for r in planned)
    lines += ["", f"{met} of {len(planned)} latency-budgeted plans ran within their budget + {TOLERANCE:.0%}."]
    paths = write_results("planner_latency", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("written:", *paths)


if __name__ == "__main__":
    main()

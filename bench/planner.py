"""Mixed-precision plans vs uniform formats at 2.5, 3.0, 3.5 and 4.0 bits/weight on the default model,
every size counted from the whole file.

    .venv/bin/python bench/planner.py [--windows 64] [--budgets 2.5,3.0,3.5,4.0] [--sensitivity fisher,measured]
                                      [--calib-text wiki,code] [--texts wiki,code]
    .venv/bin/python bench/planner.py --report-only [--note TEXT ...]   # planner.md again from planner.json

Plans are made as `tightfit compress MODEL --bpw B --sensitivity S` makes them (`make_plan`, one
per budget and sensitivity method): the linear layers (among `--candidates`, by default the
planner's DEFAULT_CANDIDATES), the token embeddings and the head (among DEFAULT_EMBED_CANDIDATES; a
tied pair is one decision) are all in the plan. Sensitivity methods (`--sensitivity`): fisher, the KL increase predicted from the Fisher
information of each layer's outputs and its quantization error; measured, the KL increase on a
held-back calibration window when only that layer is quantized; proxy, the GPTQ objective (it has
no measure for the embeddings: they are then fp16). The methods in `--rescore` (default fisher) are
scored from scratch in a scratch folder (the Hessians shared) so that their cost in seconds is
measured here; the others come from the `--work` cache when it holds them (a table made for other
embedding candidates lends its linear layers' scores: only the embeddings are scored again).

The uniform rivals: every linear layer in format F, GPTQ, and the embeddings and head in F when F
is one of the embedding candidates, else in the candidate of the fewest bits/weight not below F's
(`rival_embeddings`): `tightfit compress MODEL --format F --embed-format E`. Every model is
quantized with GPTQ from the same original-model Hessians, packed, reloaded, and scored against
the original on held-out evaluation text: through tightfit's compiled engine (the headline KL) and
as the dequantized fp32 torch model. Bits/weight are the packed file's bytes * 8 over all the
model's weights (norms, header and embeddings included). Each plan is set against every uniform
model of its size class (bench/common.py RIVAL_WINDOW); nothing is chosen on the evaluation text.
The additive model is checked on `--heldback-windows` held-back calibration windows: each plan's
predicted loss (the sum of its layers' damages) against the KL of the packed plan there.
Calibration (Hessians, sensitivities, plans): `--calib-text`, by default the command line's (wiki,code);
each other calibration has a cache folder of its own beside `--work` (named by its calibration_key). Every model is also
scored through the engine on as many held-out windows of each other text of `--texts` (code).
`--embeddings fp16` is the earlier protocol: embeddings and head fp16 in every model, budgets and
sizes over the linear layers only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ENGINE_COLUMNS, RIVAL_WINDOW, add_text_arguments, calibration_key, other_texts, other_texts_lines, machine_info, machine_line, protocol_line, quantize_and_evaluate,
    rival_window_text, rivals, rewrite_results, score_columns, score_json, text_choices, texts_line, verdict_cell, windows_help,
    write_results,
)

from tightfit.artifacts import CalibrationConfig, Choice, QuantizeConfig, config_to_json, format_or_none, parse_choice  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import Format, parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, get_module, load_model  # noqa: E402
from tightfit.model.blocks import embedding_layers  # noqa: E402
from tightfit.pipeline import DEFAULT_CANDIDATES, DEFAULT_EMBED_CANDIDATES, PlanRequest, make_plan  # noqa: E402
from tightfit.pipeline.planning import original_hessians  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages.allocate import Budget  # noqa: E402
from tightfit.stages.sensitivity import METHOD_TEXT, METHODS, probes_text  # noqa: E402

SCALE_RUNS = tuple(Path(__file__).resolve().parent / "results" / f"compress_qwen15-bpw{b}.json"
                   for b in ("2.5-s16", "3.0-s15", "3.5-s16", "4.0-s16"))
SCALE_PEERS = Path(__file__).resolve().parent / "results" / "peers_qwen15.json"
UNIFORM = ("w2g32", "w2g16", "w3g128", "w3g64", "w3g32", "w4g128")
WORK = Path(__file__).resolve().parents[1] / ".cache" / "planner"
# what each `--embeddings` protocol puts in the plan, and the row field sizes are compared on
EMBEDDINGS = {"plan": (DEFAULT_EMBED_CANDIDATES, "model_bits_per_weight"), "fp16": (("fp16",), "bits_per_weight")}


def rival_embeddings(fmt: Format, candidates: tuple[str, ...], shape: tuple[int, int]) -> Choice:
    """The embeddings' and head's format in the uniform model of fmt: fmt itself when it is one of
    the embedding candidates, else the candidate of the fewest bytes among those with no fewer than
    fmt on the embeddings' shape [V, H] (so the rival is no smaller than all-fmt would be)."""
    choices = [parse_choice(c) for c in candidates]
    if fmt in choices:
        return fmt
    size = fmt.nbytes(*shape).total
    return min((c for c in choices if c.nbytes(*shape).total >= size), key=lambda c: c.nbytes(*shape).total,
               default=parse_choice("fp16"))


def work_for(work: Path, calibration: CalibrationConfig) -> Path:
    """The cache folder of a calibration: `work` itself for the library's default (wiki), a sibling
    named by its calibration_key for any other (a folder holds the Hessians of one calibration)."""
    return work if calibration == CalibrationConfig() else work.with_name(f"{work.name}-{calibration_key(calibration)}")


@contextmanager
def scratch_work(work: Path):
    """A fresh work folder sharing work's original-model Hessians: everything else is computed there."""
    with tempfile.TemporaryDirectory(prefix="planner-") as tmp:
        (Path(tmp) / "hessians.safetensors").symlink_to((work / "hessians.safetensors").resolve())
        yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="candidate formats per linear layer (default: the planner's)")
    ap.add_argument("--embeddings", choices=tuple(EMBEDDINGS), default="plan",
                    help="plan (default): embeddings and head in the plan, sizes of the whole file; fp16: the earlier "
                         "protocol, fp16 in every model, budgets and sizes over the linear layers")
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--sensitivity", default="fisher,measured", help=f"comma-separated methods among {', '.join(METHODS)}: "
                    "a plan per budget for each")
    ap.add_argument("--rescore", default="fisher", help="methods scored from scratch in this run, so that their cost is "
                    "measured (the others are read from --work's cache when there); '' for none")
    ap.add_argument("--work", type=Path, default=WORK, help=f"cache of Hessians and sensitivity tables (default {WORK})")
    add_text_arguments(ap)
    ap.add_argument("--heldback-windows", type=int, default=4, help="held-back calibration windows the whole plans' real KL is measured on")
    ap.add_argument("--scale-runs", default=None,
                    help="JSONs of bench/compress_run.py runs of `tightfit compress BIGGER --bpw B` (the cheap estimate), "
                         "shown beside --scale-peers; '' for none (default: the runs listed in SCALE_RUNS; with "
                         "--report-only, given: the stored section is read again from them)")
    ap.add_argument("--scale-peers", type=Path, default=SCALE_PEERS,
                    help="bench/peers.py JSON of the same bigger model on the same windows: the plans' rivals")
    ap.add_argument("--note", action="append", default=[], help="a caveat printed under the tables (e.g. that the "
                    "machine was shared during the run, so the seconds are high)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: planner.md again from planner.json, "
                    "with the --note caveats given (they replace the stored ones; none given keeps them) and the "
                    "bigger model's section read again from --scale-runs")
    args = ap.parse_args(argv)
    scale_runs = [Path(p) for p in (args.scale_runs.split(",") if args.scale_runs is not None else SCALE_RUNS) if str(p).strip()]
    if args.report_only:  # given --scale-runs, the bigger model's section is read again from those runs' JSONs
        replace = None if args.scale_runs is None else {"scale": scale_section(scale_runs, args.scale_peers)}
        print("written:", *rewrite_results("planner", args.note, markdown, "planner.py", replace=replace))
        return
    t0 = time.perf_counter()
    methods = [m.strip() for m in args.sensitivity.split(",") if m.strip()]
    rescore = {m.strip() for m in args.rescore.split(",") if m.strip()}
    if not methods or not set(methods) <= set(METHODS) or not rescore <= set(METHODS):
        ap.error(f"--sensitivity and --rescore take methods among {', '.join(METHODS)}")
    embed_formats, size_key = EMBEDDINGS[args.embeddings]
    candidates = tuple(f.strip() for f in args.candidates.split(",") if f.strip())

    # the bigger model's section is read first: a bad file fails the run now, not after an hour's work
    scale = scale_section(scale_runs, args.scale_peers)
    loaded = load_model(args.model)
    cal, texts = text_choices(args)
    work = work_for(args.work, cal)
    hessians = original_hessians(loaded, cal, work, True, print)
    budgets = [float(b) for b in args.budgets.split(",")]
    tables, methods_json, plans = {}, {}, {}
    for method in methods:
        with (scratch_work(work) if method in rescore else nullcontext(work)) as method_work:
            for b in budgets:
                request = PlanRequest(model=args.model, budget=Budget(max_bpw=b), work=method_work, formats=candidates,
                                      embed_formats=embed_formats, sensitivity=method, calibration=cal)
                report = make_plan(request, loaded, on_stage=lambda s: print(s, flush=True))
                if method not in tables:
                    tables[method] = report.sensitivity
                    methods_json[method] = {"tokens": report.sensitivity.tokens, "seconds": report.seconds["sensitivity"],
                                            "scored": report.sensitivity_origin,
                                            "probe": probes_text(report.sensitivity.probes)}
                plans[f"plan {b} {method}"] = report.plan
                print(f"budget {b} ({method}): plan {report.plan.bits_per_weight:.3f} bits/weight of its layers", flush=True)

    calibration, heldback = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, cal, args.heldback_windows)
    outer = embedding_layers(loaded.model, loaded.arch)
    shape = tuple(get_module(loaded.model, outer[0]).weight.shape)
    fmt0 = parse_format(candidates[0])
    configs = {key: QuantizeConfig(fmt=fmt0, method="gptq", plan=p.quantized) for key, p in plans.items()}
    rival_embed = {name: rival_embeddings(parse_format(name), embed_formats, shape) for name in args.uniform.split(",")}
    configs.update({name: QuantizeConfig(fmt=parse_format(name), method="gptq", embed_format=format_or_none(e))
                    for name, e in rival_embed.items()})
    eval_config = EvalConfig(text=texts[0], n_windows=args.windows)
    rows, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians, held_back=heldback,
                                         texts=texts)

    table_rows = []
    for key in configs:
        r = rows[key]
        row = {"name": key, "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
               "file_bytes": r["file_bytes"], **score_json(scores[key])}
        if key in plans:
            p = plans[key]
            row.update(predicted_loss=p.predicted_loss, embeddings=", ".join(sorted({p.formats.get(n, p.pinned.get(n)).name
                                                                                     for n in outer})),
                       mix=dict(Counter(f.name for n, f in p.formats.items() if n not in outer)))
        else:
            row["embeddings"] = rival_embed[key].name
        table_rows.append(row)
    ev0 = next(iter(scores.values())).engine
    agreement, embed_damages = {}, {}
    if "measured" in tables:
        agreement["proxy"] = tables["measured"].rank_agreement()
        agreement.update({m: tables[m].rank_agreement(tables["measured"]) for m in tables if m != "measured"})
    for m, table in tables.items():
        for name in [n for n in table.shapes if n not in table.proxy]:
            embed_damages.setdefault(name, {})[m] = table.damages[name]
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "candidates": list(candidates), "embed_candidates": list(embed_formats), "embeddings": args.embeddings,
        "size_key": size_key, "calibration": config_to_json(cal), "methods": methods_json,
        "evaluation": config_to_json(eval_config), "texts": list(texts), "texts_line": texts_line(texts),
        "n_tokens": ev0.n_tokens, "original_ppl": ev0.reference_ppl,
        "rank_agreement_spearman": agreement, "embedding_damages": embed_damages, "embedding_layers": outer,
        "rival_window_bpw": RIVAL_WINDOW, "rows": table_rows, "budgets": verdicts(table_rows, budgets, size_key),
        "plans": {key: p.to_json() for key, p in plans.items()}, "heldback_windows": args.heldback_windows,
        "wall_s": round(time.perf_counter() - t0, 1),
        "notes": args.note,
        "scale": scale,
    }
    md = markdown(payload)
    paths = write_results("planner", payload, md)
    print(md)
    print("written:", *paths)


def scale_section(runs: list[Path], peers_json: Path | None) -> dict | None:
    """The plans of `tightfit compress BIG --bpw B` runs (their compress_run.py JSONs) beside the
    llama.cpp presets of bench/peers.py on the same model and windows: each plan against the best
    rival in the rival window (by KL). Entries scored on other windows than the plans are left out."""
    if not runs or peers_json is None:
        return None
    peers = json.loads(peers_json.read_text())
    plans = []
    for path in runs:
        run = json.loads(path.read_text())
        ev, summary = run["report"]["evaluation"], run["report"]["summary"]
        plans.append({"name": path.stem.removeprefix("compress_"), "command": run["command"], "date": run["machine"]["date"],
                      "bits_per_weight": summary["model_bits_per_weight"], "kl": ev["kl"], "top1": ev["top1"], "ppl": ev["ppl"],
                      "n_tokens": ev["n_tokens"]})  # no wall time: runs resumed or shared the machine
    n_tokens = {p["n_tokens"] for p in plans}
    if n_tokens != {peers["n_tokens"]}:
        raise SystemExit(f"--scale-runs scored {sorted(n_tokens)} tokens, --scale-peers {peers['n_tokens']}: not the same windows")
    others = [{"name": f"{e['peer']} {e['name']}", "bits_per_weight": e["bits_per_weight"], "kl": e["kl"],
               "top1": e["top1"], "ppl": e["ppl"]}
              for e in peers["entries"] if e["peer"] != "tightfit" and e.get("kl") is not None and e["kl"] == e["kl"]
              and not e.get("source_grid")]  # a file on the source's own grid is no evidence, and no rival
    for p in plans:
        best = min(rivals(others, p["bits_per_weight"]), key=lambda r: r["kl"], default=None)
        p.update(best_rival=best and best["name"], rival_bpw=best and best["bits_per_weight"], rival_kl=best and best["kl"],
                 plan_wins=None if best is None else p["kl"] < best["kl"])
    return {"model": peers["model"], "evaluation": peers["evaluation"], "n_tokens": peers["n_tokens"],
            "original_ppl": peers["original_ppl"], "peers_file": peers_json.name, "plans": plans, "rivals": others}


def scale_markdown(scale: dict) -> list[str]:
    ev = EvalConfig.from_json(scale["evaluation"])
    lines = ["", f"## The same planner on {scale['model']} (the cheap estimate only)", "",
             "Plans made by `tightfit compress MODEL --bpw B` (default sensitivity: fisher; embeddings and head planned), "
             "each from its own run (command and date below), scored through tightfit's engine; beside them llama.cpp's "
             f"presets from {scale['peers_file']} (their own engine, same windows; files wholly on the source's own grid left out). Uniform tightfit rivals were not run "
             f"on this model (each is a ~40-minute compress run). {protocol_line(ev, scale['n_tokens'], scale['original_ppl'])}",
             "", "| model | bits/weight | PPL | KL | top-1 |", "|---|---|---|---|---|"]
    rows = [{**p, "name": f"tightfit plan ({p['name']})"} for p in scale["plans"]] + scale["rivals"]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    lines += ["", f"Each plan against llama.cpp's presets of its size class ({rival_window_text().replace('uniform format', 'preset')}); "
              "n/a: none in the window.", "",
              "| plan | bpw | KL | best llama.cpp rival | its bpw | its KL | plan wins | run |", "|---|---|---|---|---|---|---|---|"]
    for p in scale["plans"]:
        rival = "- | - | -" if p["best_rival"] is None else f"{p['best_rival']} | {p['rival_bpw']:.3f} | {p['rival_kl']:.4f}"
        lines.append(f"| {p['name']} | {p['bits_per_weight']:.3f} | {p['kl']:.4f} | {rival} | {verdict_cell(p['plan_wins'])} | "
                     f"`{p['command']}` ({p['date'][:10]}) |")
    return lines


def verdicts(table_rows: list[dict], budgets: list[float], size_key: str = "model_bits_per_weight") -> list[dict]:
    """Each plan (one per sensitivity method) against the best uniform rival of its size class (by
    size_key: the whole file's bits/weight, or the linear layers' in the fp16 protocol) by
    evaluation KL; plan_wins None (n/a) when no uniform model is in the window."""
    uniform = [{**r, "bits_per_weight": r[size_key]} for r in table_rows if not r["name"].startswith("plan")]
    out = []
    for b in budgets:
        for plan_row in [r for r in table_rows if r["name"].startswith(f"plan {b} ")]:
            best = min(rivals(uniform, plan_row[size_key]), key=lambda r: r["kl"], default=None)
            out.append({"budget": b, "plan": plan_row["name"], "plan_bpw": plan_row[size_key], "plan_kl": plan_row["kl"],
                        "best_uniform": best and best["name"], "uniform_bpw": best and best["bits_per_weight"],
                        "uniform_kl": best and best["kl"], "plan_wins": None if best is None else plan_row["kl"] < best["kl"]})
    return out


def scored_text(method: str, info: dict) -> str:
    cost = f"{info['seconds']:.0f} s"
    what = "the Fisher statistics and the sweep; " if method == "fisher" else ""
    return {
        "scored": f"scored in this run in {cost} ({what}the shared Hessians not counted)",
        "lent": "the linear layers' scores read from the cache of an earlier run (sensitivity.json in --work, which does "
                      f"not record how long they took), the rest (the embeddings, when planned) scored in this run in {cost}",
        "cached": "read from the cache of an earlier run (sensitivity.json in --work, which does not record how long it took)",
    }[info["scored"]]


def markdown(payload: dict) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    others = other_texts(payload, ev)
    cal = payload.get("calibration")
    calibration_text = f"Calibration text: {cal['text']}, {cal['n_samples']} x {cal['seq_len']} tokens. " if cal else ""
    whole = payload.get("embeddings", "plan") == "plan"
    scored = [f"{m} = {METHOD_TEXT[m]}, on {info['tokens']} tokens, {scored_text(m, info)}"
              + (f"; {info['probe']}" if info.get("probe") else "") for m, info in payload["methods"].items()]
    if whole:
        sizes = (f"Plans as `tightfit compress --bpw B` makes them: the linear layers, the embeddings and the head in the "
                 f"plan (embedding candidates {', '.join(payload['embed_candidates'])}; a tied pair is one decision; the "
                 "budget B covers the plan's layers, the norms and file header come on top). Uniform rivals: every linear "
                 "layer in F, the embeddings and head in F when F is an embedding candidate, else in the candidate of the "
                 "fewest bits/weight not below F's (column 'embeddings'). Bits/weight: the packed file's bytes x 8 / all "
                 "the model's weights (embeddings, norms and header included).")
    else:
        sizes = ("Embeddings and head fp16 in every model (the earlier protocol); bits/weight over the linear layers only.")
    lines = [
        f"# Planner: mixed precision vs uniform formats on {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"Candidates per linear layer: {', '.join(payload['candidates'])}. Sensitivity methods, a plan per budget for "
        "each: " + "; ".join(scored) + f". {sizes} Plans: HiGHS MILP. Linear layers quantized with GPTQ from the same "
        f"original-model Hessians{', embeddings and head rounded to nearest' if whole else ''}. {calibration_text}"
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} {ENGINE_COLUMNS} "
        f"Wall time {payload['wall_s'] / 60:.0f} min.",
        *other_texts_lines(payload, ev),
        "",
        "| model | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | " + "".join(f"KL {t} | " for t in others)
        + "embeddings | linear layers |",
        "|---|---|---|---|---|---|" + "---|" * len(others) + "---|---|",
    ]
    key = payload.get("size_key", "model_bits_per_weight")
    for r in sorted(payload["rows"], key=lambda r: r[key]):
        mix = ", ".join(f"{k} x{v}" for k, v in r.get("mix", {}).items()) or r["name"]
        domains = "".join(f"{r[f'kl_{t}']:.4f} | " for t in others)
        lines.append(f"| {r['name']} | {r[key]:.3f} | {score_columns(r)} | {domains}{r.get('embeddings', 'fp16')} | {mix} |")
    lines += ["", f"Every plan (none is chosen among them) against its rivals: {rival_window_text()}. "
              "KL is the evaluation KL (engine); n/a: no uniform model in the window.", "",
              "| budget | plan | plan bpw | plan KL | best uniform rival | its bpw | its KL | plan wins |",
              "|---|---|---|---|---|---|---|---|"]
    for v in payload["budgets"]:
        rival = "- | - | -" if v["best_uniform"] is None else f"{v['best_uniform']} | {v['uniform_bpw']:.3f} | {v['uniform_kl']:.4f}"
        lines.append(f"| {v['budget']} | {v['plan']} | {v['plan_bpw']:.3f} | {v['plan_kl']:.4f} | {rival} | {verdict_cell(v['plan_wins'])} |")
    by_name = {r["name"]: r for r in payload["rows"]}
    methods = list(payload["methods"])
    if "measured" in methods and len(methods) > 1:
        cheap = [m for m in methods if m != "measured"]
        lines += ["", "Plans from each cheap estimate against the plan from the measured table at the same budget "
                  "(evaluation KL; ratio = cheap / measured, below 1.05 is within 5 %):", "",
                  "| budget | measured plan KL | " + " | ".join(f"{m} plan KL | ratio" for m in cheap) + " |",
                  "|---|---|" + "---|---|" * len(cheap)]
        for b in sorted({v["budget"] for v in payload["budgets"]}):
            ref = by_name.get(f"plan {b} measured")
            if ref is None:
                continue
            cells = [f"{by_name[f'plan {b} {m}']['kl']:.4f} | {by_name[f'plan {b} {m}']['kl'] / ref['kl']:.3f}" for m in cheap]
            lines.append(f"| {b} | {ref['kl']:.4f} | " + " | ".join(cells) + " |")
    for method, agreement in payload["rank_agreement_spearman"].items():
        lines += ["", f"{method} vs measured KL increase, Spearman rank correlation across the linear layers: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items())]
    for name, by_method in payload.get("embedding_damages", {}).items():
        tied = " (tied to the head: one layer, so no rank correlation across layers; the damage of each candidate instead)"
        methods = list(by_method)
        lines += ["", f"{name}{tied if len(payload['embedding_layers']) == 1 else ''}, KL increase (nats/token):", "",
                  "| candidate | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for c in next(iter(by_method.values())):
            lines.append(f"| {c} | " + " | ".join(f"{by_method[m][c]:.4f}" for m in methods) + " |")
    lines += ["", f"Additive model vs the real KL on {payload['heldback_windows']} held-back calibration windows (the "
              "packed plan through the engine; the evaluation above is on other, held-out text):", "",
              "| plan | predicted (sum of its layers' damages) | measured KL of the whole plan |", "|---|---|---|"]
    for r in payload["rows"]:
        if r["name"].startswith("plan"):
            lines.append(f"| {r['name']} | {r['predicted_loss']:.4f} | {r['kl_held_back']:.4f} |")
    if payload.get("notes"):
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in payload["notes"]]
    if payload.get("scale"):
        lines += scale_markdown(payload["scale"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

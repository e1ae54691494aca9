"""Calibration choices measured on two domains (issue 17): KL on wiki and on code, and the penalty out of domain.

    .venv/bin/python bench/calibration.py [--choices wiki,wiki+code,...] [--formats w3g64] [--budgets 3.5]
                                          [--windows 64] [--self-tokens 8192] [--llama IQ2_XS,IQ3_XXS]
    .venv/bin/python bench/calibration.py --report-only [--name calibration] [--note TEXT ...]   (render NAME.md again from NAME.json)

Every calibration choice compresses the default model
- uniformly in each of --formats, GPTQ with sequential Hessians from its calibration windows (as
  `tightfit compress --format` does), and
- with a plan at each of --budgets bits/weight (--sensitivity from its calibration windows, GPTQ from
  the original model's Hessians on them, embeddings and head planned: as `tightfit compress --bpw`),
then packs it, reloads it and scores it through tightfit's engine against the original (fp32) on the
held-out windows of each of --texts: wiki (the calibration's own domain) and code (Python source of
this interpreter's standard library, never calibrated on: its calibration part is another set of
files). The out-of-domain penalty is KL code / KL wiki. Where llama_cpp is importable, llama.cpp's
quantizer with an importance matrix made from the same calibration text (diag(H)/2 of the original
model's Hessians on it, as bench/peers.py does; embeddings F16) stands beside each calibration text.

The choices (CHOICES): wiki (today's default: 64 windows x 512 tokens), wiki+code (half each),
wiki+self (wiki and --self-tokens tokens the model samples itself), more windows (twice as many),
longer windows (twice as long), damp 0.1 (GPTQ dampening; default 0.01), no act-order, and wiki+code
with damp 0.1. The best
choice of each model kind is the one with the lowest KL on its worse domain.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EVAL_TEXTS, RESULTS, calibration_key, machine_info, machine_line, ood_penalty, quantize_and_pack, rewrite_results, score_texts,
    text_windows, texts_line, windows_help, write_results,
)

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.data import load_text  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.pipeline import DEFAULT_CANDIDATES, PlanRequest, make_plan  # noqa: E402
from tightfit.pipeline.planning import original_hessians  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages.allocate import Budget  # noqa: E402
from tightfit.stages.sensitivity import measure_sensitivity  # noqa: E402

# the dampening of the planner's sensitivity sweep (make_plan passes none: measure_sensitivity's default)
SWEEP_DAMP = inspect.signature(measure_sensitivity).parameters["damp"].default

WORK = Path(__file__).resolve().parents[1] / ".cache" / "calibration"
# The peers. Rows of width 576 (smollm2-135m) fall back to IQ4_NL in llama.cpp's IQ types, so
# each type's bits/weight is what its file holds: see the table's column.
LLAMA_TYPES = ("IQ2_XS", "IQ3_XXS")
SELF_TOKENS = 8192
CHOICES = ("wiki", "wiki+code", "wiki+self", "more windows", "longer windows", "damp 0.1", "no act-order", "wiki+code damp 0.1")


@dataclass(frozen=True)
class Choice:
    """One calibration choice: the calibration text and its windows, and GPTQ's settings."""

    name: str
    calibration: CalibrationConfig
    damp: float = QuantizeConfig.damp
    act_order: bool = QuantizeConfig.act_order

    def gptq(self) -> str:
        return f"damp {self.damp:g}, act-order {'on' if self.act_order else 'off'}"


def choices(base: CalibrationConfig, self_tokens: int) -> dict[str, Choice]:
    replace = dataclasses.replace
    made = [
        Choice("wiki", base),
        Choice("wiki+code", replace(base, text=f"{base.text},code")),
        Choice("wiki+self", replace(base, text=f"{base.text},self:{self_tokens}")),
        Choice("more windows", replace(base, n_samples=2 * base.n_samples)),
        Choice("longer windows", replace(base, seq_len=2 * base.seq_len)),
        Choice("damp 0.1", base, damp=0.1),
        Choice("no act-order", base, act_order=False),
        Choice("wiki+code damp 0.1", replace(base, text=f"{base.text},code"), damp=0.1),
    ]
    assert tuple(c.name for c in made) == CHOICES
    return {c.name: c for c in made}


def work_for(calibration: CalibrationConfig, root: Path) -> Path:
    """A cache folder per calibration (Hessians, Fisher, sensitivities, self text)."""
    return root / calibration_key(calibration)


def describe(calibration: CalibrationConfig) -> str:
    return f"{calibration.text}, {calibration.n_samples} x {calibration.seq_len}"


def llama_candidates(loaded, hessians, types, folder: Path, label: str, ctx: int) -> tuple[dict, list[dict], list[str]]:
    """llama.cpp + imatrix (diag(H)/2 of `hessians`) in each type, as evaluate.Scorers, their rows,
    and a line for each type llama.cpp refused."""
    import llamacpp
    import peers_runs

    src = peers_runs.f32_gguf(loaded, peers_runs.CACHE / loaded.source.sha256()[:16])  # one F32 GGUF per source model
    imatrix = peers_runs.imatrix_entries(loaded, hessians)
    scorers, rows, failed = {}, [], []
    for t in types:
        dst = folder / f"{label}-{t}.gguf".replace(" ", "_")
        try:
            seconds = llamacpp.quantize(src, dst, t, imatrix=imatrix, f16_embeddings=True)
        except RuntimeError as e:
            failed.append(f"{label}: llama.cpp+imatrix {t} failed ({e})")
            print(f"  {failed[-1]}", flush=True)
            continue
        bpw, mix = llamacpp.gguf_linear_bits(dst)
        key = f"{label} | llama.cpp+imatrix {t}"
        scorers[key] = llamacpp.LlamaLogits(dst, ctx, torch.get_num_threads())
        rows.append({"key": key, "model": f"llama.cpp+imatrix {t}", "bits_per_weight": bpw, "types": mix,
                     "quantize_seconds": round(seconds, 1)})
    return scorers, rows, failed


def best_choices(rows: list[dict]) -> list[dict]:
    """For each tightfit model kind, the choice with the lowest KL on its worse domain."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r["peer"] == "tightfit"):
        best = min((r for r in rows if r["model"] == model), key=lambda r: r["worse_kl"])
        out.append({"model": model, "choice": best["choice"], "worse_kl": best["worse_kl"]})
    return out


def default_choice(payload: dict) -> str | None:
    """The choice that is the command line's default calibration (`tightfit compress`: its
    --calib-text, windows and GPTQ settings), or None where the run did not measure it."""
    from tightfit.cli.common import DEFAULT_CALIB_TEXT

    ours = Choice("default", CalibrationConfig(text=DEFAULT_CALIB_TEXT))
    wanted = (describe(ours.calibration), ours.gptq())
    return next((r["choice"] for r in payload["rows"] if (r["calibration"], r["gptq"]) == wanted), None)


def ranking(rows: list[dict]) -> list[tuple[str, float]]:
    """Each choice measured on every tightfit model kind, with the geometric mean over the kinds
    of its worse-domain KL / the best choice's of that kind (1 = best everywhere), best first."""
    kinds = list(dict.fromkeys(r["model"] for r in rows if r["peer"] == "tightfit"))
    best = {b["model"]: b["worse_kl"] for b in best_choices(rows)}
    by_choice: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["peer"] == "tightfit":
            by_choice.setdefault(r["choice"], {})[r["model"]] = r["worse_kl"] / best[r["model"]]
    means = {c: math.prod(v.values()) ** (1 / len(v)) for c, v in by_choice.items() if len(v) == len(kinds)}
    return sorted(means.items(), key=lambda kv: kv[1])


def default_lines(payload: dict) -> list[str]:
    """Which choice is the command line's default, where it stands against the best of each kind,
    and across the kinds (ranking): the table's verdict on the default."""
    name = default_choice(payload)
    if name is None:
        return []
    rows = payload["rows"]
    mine = {r["model"]: r["worse_kl"] for r in rows if r["choice"] == name and r["peer"] == "tightfit"}
    parts = [f"{b['model']} " + ("best" if b["choice"] == name else f"{100 * (mine[b['model']] / b['worse_kl'] - 1):+.1f} % "
                                 f"(best: {b['choice']})") for b in best_choices(rows) if b["model"] in mine]
    ranked = ranking(rows)
    place = next((i for i, (c, _) in enumerate(ranked) if c == name), None)
    lines = ["", f"The command line's default calibration is the choice **{name}**. Its worse-domain KL against the best "
             f"choice of each kind: {'; '.join(parts)}."]
    if place is not None:
        lines.append(f"Across the kinds (geometric mean of worse-domain KL / the best of that kind; 1 = best everywhere) it "
                     f"ranks {place + 1} of {len(ranked)}: " + ", ".join(f"{c} {m:.3f}" for c, m in ranked) + ".")
    return lines


def penalties_beside_llama(rows: list[dict], texts: tuple[str, ...]) -> list[dict]:
    """Each tightfit row against the llama.cpp+imatrix row of the same calibration text nearest in bits/weight."""
    out = []
    for r in rows:
        peers_of_r = [p for p in rows if p["peer"] == "llama.cpp" and p["calibration"] == r["calibration"]]
        if r["peer"] != "tightfit" or not peers_of_r:
            continue
        p = min(peers_of_r, key=lambda p: abs(p["bits_per_weight"] - r["bits_per_weight"]))
        for text in texts[1:]:
            out.append({"choice": r["choice"], "model": r["model"], "bpw": r["bits_per_weight"], "text": text,
                        "penalty": r["penalty"][text], "llama": p["model"], "llama_bpw": p["bits_per_weight"],
                        "llama_penalty": p["penalty"][text], "no_worse": r["penalty"][text] <= p["penalty"][text]})
    return out


def llama_types_lines(rows: list[dict]) -> list[str]:
    """What each llama.cpp file holds, type by type over its linear tensors: a type whose blocks span 256
    weights falls back to another on rows that are not a multiple of 256 (smollm2-135m's 576), so the
    file is not the type it is named after."""
    seen: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["peer"] == "llama.cpp" and r.get("types"):
            seen.setdefault(r["model"], r["types"])
    if not seen:
        return []
    lines = ["", "llama.cpp's files, tensor types of their linear layers (the same for every calibration text):"]
    for model, types in seen.items():
        own = model.rsplit(" ", 1)[-1]
        total = sum(types.values())
        rest = ", ".join(f"{t} {n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]) if t != own)
        lines.append(f"- {model}: {own} on {types.get(own, 0)} of {total} tensors"
                     + (f"; the others fell back to {rest}" if rest else ""))
    return lines


def markdown(payload: dict) -> str:
    texts = tuple(payload["texts"])
    ev = EvalConfig.from_json(payload["evaluation"])
    short = "" if ev.n_windows == EvalConfig.n_windows else f" (fewer than the protocol's {EvalConfig.n_windows}: a shorter run)"
    kl_head = " | ".join(f"KL {t}" for t in texts)
    pen_head = " | ".join(f"{t} / {texts[0]}" for t in texts[1:])
    lines = [
        f"# Calibration choices on two domains: {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"Evaluation: {ev.n_windows} windows x {ev.ctx} tokens of held-out text of each domain{short}, KL(original || "
        "model) per token through the engine that runs each model (tightfit's compiled engine; llama.cpp), against "
        f"the original in fp32. {payload['texts_line']} The penalty out of domain is KL on it / KL on {texts[0]}; "
        "'worse' is the larger KL of the domains.",
        "Uniform rows: GPTQ with sequential Hessians from the choice's calibration windows, embeddings fp16. Plan rows: "
        f"{payload['sensitivity']} sensitivity and GPTQ from the original's Hessians on those windows, embeddings and head "
        f"planned (bits/weight includes them); the sensitivity sweep's own GPTQ runs at damp {SWEEP_DAMP:g} in every row "
        "(the planner's), the GPTQ column is the quantized model's. llama.cpp+imatrix: its quantizer with an importance matrix from the "
        "same calibration windows (diag(H)/2), embeddings F16; bits/weight of the linear layers. "
        f"Wall time {payload['wall_s'] / 60:.0f} min.",
        "",
        f"| choice | calibration | GPTQ | model | bits/weight | {kl_head} | {pen_head} | worse |",
        "|---|---|---|---|---|" + "---|" * (2 * len(texts)),
    ]
    for r in payload["rows"]:
        kls = " | ".join(f"{r['kl'][t]:.4f}" for t in texts)
        pens = " | ".join(f"{r['penalty'][t]:.2f}" for t in texts[1:])
        lines.append(f"| {r['choice']} | {r['calibration']} | {r['gptq']} | {r['model']} | {r['bits_per_weight']:.3f} | "
                     f"{kls} | {pens} | {r['worse_kl']:.4f} |")
    lines += ["", "Lowest KL on the worse domain, per model kind:"]
    lines += [f"- {b['model']}: **{b['choice']}** (worse KL {b['worse_kl']:.4f})" for b in payload["best"]]
    lines += default_lines(payload)
    if payload["beside_llama"]:
        lines += ["", "Out-of-domain penalty beside llama.cpp+imatrix calibrated on the same text (nearest bits/weight):"]
        lines += [f"- {x['choice']}, {x['model']} ({x['bpw']:.2f} bpw): {x['text']}/{texts[0]} {x['penalty']:.2f} vs "
                  f"{x['llama']} ({x['llama_bpw']:.2f} bpw) {x['llama_penalty']:.2f}: "
                  f"{'no worse' if x['no_worse'] else 'worse'}" for x in payload["beside_llama"]]
    lines += llama_types_lines(payload["rows"])
    if not any(r["peer"] == "llama.cpp" for r in payload["rows"]):
        lines += ["", f"No llama.cpp+imatrix rows: {payload['llama_note']}"]
    lines += [f"- {line}" for line in payload["llama_failed"]]
    if payload.get("notes"):
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--choices", default=",".join(CHOICES), help=f"comma-separated among: {', '.join(CHOICES)}")
    ap.add_argument("--formats", default="w3g64", help="uniform formats (empty: none)")
    ap.add_argument("--budgets", default="3.5", help="bits/weight of the planned rows (empty: none)")
    ap.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="the planner's candidate formats")
    ap.add_argument("--sensitivity", default="fisher", help="the planner's sensitivity method")
    ap.add_argument("--texts", default=",".join(EVAL_TEXTS), help="evaluation texts; the first is the calibration's domain")
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--ctx", type=int, default=EvalConfig.ctx, help="tokens per evaluation window")
    ap.add_argument("--calib-samples", type=int, default=CalibrationConfig.n_samples, help="the base choice's windows")
    ap.add_argument("--calib-len", type=int, default=CalibrationConfig.seq_len, help="the base choice's window length")
    ap.add_argument("--self-tokens", type=int, default=SELF_TOKENS, help="tokens sampled from the model in wiki+self")
    ap.add_argument("--llama", default=",".join(LLAMA_TYPES), help="llama.cpp types with an imatrix (empty: none)")
    ap.add_argument("--work", type=Path, default=WORK, help="cache of Hessians, Fisher, sensitivities and self text")
    ap.add_argument("--name", default="calibration", help="results name in bench/results/ (empty: write nothing)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: render NAME.md again from NAME.json")
    ap.add_argument("--note", action="append", default=[], help="a caveat printed under the tables (e.g. what shared "
                    "the machine); with --report-only the notes given replace the stored ones, none given keeps them")
    args = ap.parse_args(argv)
    if args.report_only:
        print("written:", *rewrite_results(args.name, args.note, markdown, "calibration.py"))
        return json.loads((RESULTS / f"{args.name}.json").read_text())
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    t0 = time.perf_counter()
    base = CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_len)
    menu = choices(base, args.self_tokens)
    unknown = [c for c in split(args.choices) if c not in menu]
    if unknown:
        ap.error(f"unknown choices {unknown}; known: {', '.join(CHOICES)}")
    texts = tuple(split(args.texts))
    llama_types = split(args.llama)
    llama_note = "none asked for (--llama)" if not llama_types else "llama.cpp refused every type"
    if llama_types:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            llama_types, llama_note = [], f"llama_cpp is not importable here ({e})"

    loaded = load_model(args.model)
    eval_config = EvalConfig(n_windows=args.windows, ctx=args.ctx)
    windows = text_windows(loaded.tokenizer, eval_config, texts)
    candidates, rows, sources, llama_failed = {}, [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in split(args.choices):
            choice = menu[name]
            work = work_for(choice.calibration, args.work)
            calibration = calibrate_stage.calibrate(loaded.tokenizer, choice.calibration, loaded=loaded, work=work)
            sources[describe(choice.calibration)] = [dataclasses.asdict(s) for s in calibration.sources]
            common = {"choice": name, "calibration": describe(choice.calibration)}
            for fmt in split(args.formats):
                config = QuantizeConfig(fmt=parse_format(fmt), damp=choice.damp, act_order=choice.act_order)
                key = f"{name} | {fmt}"
                row, candidates[key], _ = quantize_and_pack(loaded, key, config, calibration, Path(tmp), ctx=args.ctx)
                rows.append({**common, "key": key, "peer": "tightfit", "model": fmt, "gptq": choice.gptq(),
                             "bits_per_weight": row["bits_per_weight"], "quantize_seconds": row["quantize_seconds"]})
            for budget in [float(b) for b in split(args.budgets)]:
                request = PlanRequest(model=args.model, budget=Budget(max_bpw=budget), work=work, formats=tuple(split(args.candidates)),
                                      sensitivity=args.sensitivity, calibration=choice.calibration,
                                      fisher_windows=min(PlanRequest.fisher_windows, choice.calibration.n_samples))
                plan = make_plan(request, loaded).plan
                hessians = original_hessians(loaded, choice.calibration, work, True, print, calibration)
                fmt = Counter(plan.quantized.values()).most_common(1)[0][0]
                config = QuantizeConfig(fmt=fmt, plan=plan.quantized, damp=choice.damp, act_order=choice.act_order)
                key = f"{name} | plan {budget:g}"
                row, candidates[key], _ = quantize_and_pack(loaded, key, config, calibration, Path(tmp), hessians=hessians,
                                                            ctx=args.ctx)
                rows.append({**common, "key": key, "peer": "tightfit", "model": f"plan {budget:g} bpw", "gptq": choice.gptq(),
                             "bits_per_weight": row["bits_per_weight"], "quantize_seconds": row["quantize_seconds"],
                             "plan_mix": dict(Counter(f.name for f in plan.formats.values()))})
            if llama_types and common["calibration"] not in {r["calibration"] for r in rows if r["peer"] == "llama.cpp"}:
                hessians = original_hessians(loaded, choice.calibration, work, True, print, calibration)
                scorers, llama_rows, failed = llama_candidates(loaded, hessians, llama_types, Path(tmp), name, args.ctx)
                candidates.update(scorers)
                llama_failed += failed
                rows += [{**common, **r, "peer": "llama.cpp", "gptq": "-"} for r in llama_rows]
        scores = score_texts(candidates, loaded, windows, eval_config.batch_size)
    for r in rows:
        r["kl"] = {t: scores[r["key"]][t].kl for t in texts}
        r["ppl"] = {t: scores[r["key"]][t].ppl for t in texts}
        r["top1"] = {t: scores[r["key"]][t].top1 for t in texts}
        r["penalty"] = ood_penalty(r["kl"], texts[0])
        r["worse_kl"] = max(r["kl"].values())
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(), "texts": list(texts),
        "texts_line": texts_line(texts), "text_records": {t: load_text(t).record() for t in texts},
        "evaluation": config_to_json(eval_config), "sensitivity": args.sensitivity, "calibration_sources": sources,
        "rows": rows, "best": best_choices(rows), "beside_llama": penalties_beside_llama(rows, texts),
        "llama_note": llama_note, "llama_failed": llama_failed, "wall_s": round(time.perf_counter() - t0, 1), "notes": args.note,
    }
    md = markdown(payload)
    print(md)
    if args.name:
        print("written:", *write_results(args.name, payload, md))
    return payload


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

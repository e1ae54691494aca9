"""SpQR recipes vs uniform GPTQ formats on the default model, at about 2.5, 3.0, 3.5 and 4.5 bits/weight.

    .venv/bin/python bench/spqr.py [--windows 64] [--select-windows 8] [--calib-text wiki,code] [--texts wiki,code]
    .venv/bin/python bench/spqr.py --report-only    # bench/results/spqr.md again from spqr.json, measuring nothing

Every model, SpQR and uniform alike, is quantized with GPTQ from the same Hessians of the original
model (collected once, cached in .cache/), packed to disk, reloaded, and scored against the
original: through tightfit's compiled engine (the headline KL) and as the dequantized fp32 torch
model, on the protocol's evaluation windows. bits/weight is what the file holds for the quantized
layers (SpQR: actual outlier count, both statistic levels, row pointers). Also reports the share of
outliers per layer type. Uniform 4-bit asymmetric g32 is left out: the shipped weights lie on that
grid (lossless). Any recipe that can hold the source's own grid (bench/source_grid.py `source_grids`, read
from the model file) is named in the caveat and gets no verdict.

Calibration: `--calib-text`, by default the command line's (wiki,code). Every model is also scored
through the engine on as many held-out windows of each other text of `--texts` (code).

Per budget the SpQR recipe is chosen on `--select-windows` held-back calibration windows (never
calibrated on, disjoint from the evaluation text) and reported with its evaluation KL, against
every uniform format of the same size class (bench/common.py RIVAL_WINDOW).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ENGINE_COLUMNS, RESULTS, RIVAL_WINDOW, add_text_arguments, other_texts, other_texts_lines, SELECT_WINDOWS, dense_line, hessians_cached, machine_info,
    machine_line, protocol_line, quantize_and_evaluate, rival_window_text, rivals, score_columns, score_json, text_choices, texts_line,
    verdict_cell, windows_help, write_results,
)
from source_grid import (  # noqa: E402
    grids_from_json, grids_json, on_source_grid, recorded_grids, source_grid_caveat, source_grids,
)

from tightfit.artifacts import QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.formats.spqr import SpQRTensor  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402

UNIFORM = ["w2g64", "w2g32", "w2g16", "w3g128", "w3g64", "w3g32", "w4g128"]
SPQR = [
    "spqr-w2g32-s3-o0.5",  # ~2.5
    "spqr-w2g16-s3-o0.5", "spqr-w2g16-s3-o1.0", "spqr-w3g64-s3-o0.0",  # ~3.0
    "spqr-w3g32-s3-o0.5",  # ~3.5
    "spqr-w4g32-s3-o0.5",                        # ~4.5
]
BUDGETS = (2.5, 3.0, 3.5, 4.5)
BUDGET_BAND = 0.25  # SpQR recipes within this many bits/weight of a budget compete for it
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def outlier_shares(layers: dict) -> dict[str, float]:
    count, total = defaultdict(int), defaultdict(int)
    for name, q in layers.items():
        if isinstance(q, SpQRTensor):
            kind = name.rsplit(".", 1)[-1]
            count[kind] += q.n_outliers
            total[kind] += q.shape[0] * q.shape[1]
    return {k: count[k] / total[k] for k in LAYER_TYPES if total[k]}


def verdicts(table: list[dict], grids) -> list[dict]:
    """Per budget: the SpQR recipe with the lowest held-back KL within BUDGET_BAND of it, against
    the best uniform rival by evaluation KL. spqr_wins None (n/a): no rival, or the recipe can hold
    one of the source's `grids` (source_grid.SourceGrid)."""
    out = []
    uniform = [t for t in table if t["family"] == "uniform"]
    for budget in BUDGETS:
        band = [t for t in table if t["family"] == "spqr" and abs(t["bits_per_weight"] - budget) <= BUDGET_BAND]
        chosen = min(band, key=lambda t: t["kl_held_back"], default=None)
        if chosen is None:
            continue
        best = min(rivals(uniform, chosen["bits_per_weight"]), key=lambda t: t["kl"], default=None)
        on_grid = on_source_grid(chosen["format"], grids)
        out.append({
            "budget": budget, "candidates": [t["format"] for t in band],
            "spqr": chosen["format"], "spqr_bpw": chosen["bits_per_weight"], "spqr_kl_held_back": chosen["kl_held_back"],
            "spqr_kl": chosen["kl"], "uniform": best and best["format"], "uniform_bpw": best and best["bits_per_weight"],
            "uniform_kl": best and best["kl"], "source_grid": on_grid,
            "spqr_wins": None if best is None or on_grid else chosen["kl"] < best["kl"],
        })
    return out


def markdown(payload: dict) -> str:
    calib, ev, table = payload["calibration"], EvalConfig.from_json(payload["evaluation"]), payload["rows"]
    others = other_texts(payload, ev)
    lines = [
        f"# SpQR vs uniform GPTQ on {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"GPTQ with Hessians of the original model ({calib['text']}, {calib['n_samples']} x {calib['seq_len']} calibration tokens) for "
        f"every format. {protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} {ENGINE_COLUMNS} "
        f"KL held-back: through the engine on {payload['held_back_windows']} held-back calibration windows (never "
        "calibrated on, disjoint from the evaluation text), what the recipe choice below uses. bits/weight = bytes of "
        f"the quantized layers in the file x 8 / their weights. Wall time {payload['wall_s'] / 60:.0f} min.",
        *other_texts_lines(payload, ev),
        "",
        "| format | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | KL held-back | " + "".join(f"KL {t} | " for t in others)
        + "quantize s |",
        "|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|",
    ]
    for t in sorted(table, key=lambda t: t["bits_per_weight"]):
        domains = "".join(f"{t[f'kl_{x}']:.4f} | " for x in others)
        lines.append(f"| {t['format']} | {t['bits_per_weight']:.3f} | {score_columns(t)} | {t['kl_held_back']:.4f} | "
                     f"{domains}{t['quantize_seconds']:.0f} |")
    lines += ["", "## SpQR recipe chosen per budget vs the uniform formats of its size class", "",
              f"Per budget: among the SpQR recipes within {BUDGET_BAND} bits/weight of it, the one with the lowest KL "
              f"on the held-back calibration windows (chosen before looking at the evaluation text), scored by its "
              f"evaluation KL (engine); its rivals: {rival_window_text()}. n/a: no uniform format in that window, or "
              "the recipe sits on the source's grid.", "",
              "| budget | SpQR (chosen on held-back KL) | bpw | KL held-back | KL (engine) | best uniform rival | bpw | "
              "KL (engine) | SpQR wins |", "|---|---|---|---|---|---|---|---|---|"]
    for v in payload["budgets"]:
        rival = "- | - | -" if v["uniform"] is None else f"{v['uniform']} | {v['uniform_bpw']:.3f} | {v['uniform_kl']:.4f}"
        lines.append(f"| {v['budget']} | {v['spqr']} | {v['spqr_bpw']:.3f} | {v['spqr_kl_held_back']:.4f} | {v['spqr_kl']:.4f} | "
                     f"{rival} | {verdict_cell(v['spqr_wins'])} |")
    lines += ["", "## Share of weights kept as outliers, per layer type", "",
              "| recipe | " + " | ".join(LAYER_TYPES) + " |", "|---" * (len(LAYER_TYPES) + 1) + "|"]
    for t in table:
        if t["outlier_share"]:
            lines.append(f"| {t['format']} | " + " | ".join(f"{100 * t['outlier_share'].get(k, 0):.2f}%" for k in LAYER_TYPES) + " |")
    caveat = source_grid_caveat([t["format"] for t in table], grids_from_json(payload["source_grids"]))
    if caveat:
        lines += ["", f"Source grid: {caveat}"]
    if dense_line(table):
        lines += ["", dense_line(table)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--select-windows", type=int, default=SELECT_WINDOWS,
                    help="held-back calibration windows the recipe per budget is chosen on")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--spqr", default=",".join(SPQR))
    add_text_arguments(ap)
    ap.add_argument("--report-only", action="store_true",
                    help="write bench/results/spqr.md again from spqr.json (e.g. after a caveat was added here), measuring nothing")
    args = ap.parse_args()
    if args.report_only:
        return report()
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    calib_config, texts = text_choices(args)
    eval_config = EvalConfig(text=texts[0], n_windows=args.windows)
    calibration, held_back = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, calib_config, args.select_windows)
    hessians = hessians_cached(loaded, calibration)
    grids = source_grids(loaded.source)
    names = args.uniform.split(",") + args.spqr.split(",")
    configs = {name: QuantizeConfig(fmt=parse_format(name), method="gptq") for name in names}
    rows, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians, held_back=held_back,
                                         texts=texts)

    table = []
    for name in names:
        r = rows[name]
        table.append({
            "format": name, "family": "spqr" if name.startswith("spqr") else "uniform",
            "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
            "file_bytes": r["file_bytes"], **score_json(scores[name]), "engine_dense_layers": r["engine_dense_layers"],
            "quantize_seconds": r["quantize_seconds"], "outlier_share": outlier_shares(r["layers"]),
        })
    ev0 = next(iter(scores.values())).engine
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "texts": list(texts), "texts_line": texts_line(texts), "held_back_windows": args.select_windows, "rival_window_bpw": RIVAL_WINDOW,
        "hessians": "original model (collected once, shared by every format)",
        "source_grids": grids_json(grids), "n_tokens": ev0.n_tokens, "original_ppl": ev0.reference_ppl, "rows": table,
        "budgets": verdicts(table, grids),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    md = markdown(payload)
    paths = write_results("spqr", payload, md)
    print(md)
    print("written:", *paths)


def report() -> None:
    """spqr.md again from spqr.json: the verdicts recomputed from its rows (the source's grids read
    from the model file when the run did not record them), the numbers as measured."""
    payload = json.loads((RESULTS / "spqr.json").read_text())
    payload["source_grids"] = recorded_grids(payload)
    try:
        payload["budgets"] = verdicts(payload["rows"], grids_from_json(payload["source_grids"]))
        md = markdown(payload)
    except KeyError as e:
        sys.exit(f"spqr: {RESULTS / 'spqr.json'} was written by an older bench/spqr.py (no {e}): rerun it")
    write_results("spqr", payload, md)
    print(md)


if __name__ == "__main__":
    main()

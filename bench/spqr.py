"""SpQR recipes vs uniform GPTQ formats on the default model, at about 2.5, 3.0, 3.5 and 4.5 bits/weight.

    .venv/bin/python bench/spqr.py [--windows 64]

Every model, SpQR and uniform alike, is quantized with GPTQ from the same Hessians of the original
model (collected once, cached in .cache/), packed to disk, reloaded, and scored against the
original in one pass. bits/weight is what the file holds for the quantized layers (SpQR: actual
outlier count, both statistic levels, row pointers). Also reports the share of outliers per layer
type. Uniform 4-bit asymmetric g32 is left out: the shipped weights lie on that grid (lossless).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hessians_cached, machine_info, quantize_and_evaluate, source_grid_caveat, write_results  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
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
SIZE_CLASS = 0.35  # rivals: uniform formats at least as large as the SpQR recipe and at most this much larger (bits/weight)
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def outlier_shares(layers: dict) -> dict[str, float]:
    count, total = defaultdict(int), defaultdict(int)
    for name, q in layers.items():
        if isinstance(q, SpQRTensor):
            kind = name.rsplit(".", 1)[-1]
            count[kind] += q.n_outliers
            total[kind] += q.shape[0] * q.shape[1]
    return {k: count[k] / total[k] for k in LAYER_TYPES if total[k]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens (protocol default 64; 32 keeps this run near 25 min)")
    ap.add_argument("--uniform", default=",".join(UNIFORM))
    ap.add_argument("--spqr", default=",".join(SPQR))
    args = ap.parse_args()

    loaded = load_model(args.model)
    calib_config, eval_config = CalibrationConfig(), EvalConfig(n_windows=args.windows)
    calibration = calibrate_stage.calibrate(loaded.tokenizer, calib_config)
    hessians = hessians_cached(loaded, calibration)
    names = args.uniform.split(",") + args.spqr.split(",")
    configs = {name: QuantizeConfig(fmt=parse_format(name), method="gptq") for name in names}
    rows, results = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians)

    table = []
    for name in names:
        r, ev = rows[name], results[name]
        table.append({
            "format": name, "family": "spqr" if name.startswith("spqr") else "uniform",
            "bits_per_weight": r["bits_per_weight"], "model_bits_per_weight": r["model_bits_per_weight"],
            "file_bytes": r["file_bytes"], "ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1,
            "quantize_seconds": r["quantize_seconds"], "outlier_share": outlier_shares(r["layers"]),
        })
    verdicts = []
    for budget in BUDGETS:
        spqr = [t for t in table if t["family"] == "spqr" and abs(t["bits_per_weight"] - budget) <= 0.25]
        best_spqr = min(spqr, key=lambda t: t["kl"], default=None)
        if best_spqr is None:
            continue
        lo = best_spqr["bits_per_weight"]
        uniform = [t for t in table if t["family"] == "uniform" and lo <= t["bits_per_weight"] <= lo + SIZE_CLASS]
        best_uniform = min(uniform, key=lambda t: t["kl"], default=None)
        verdicts.append({
            "budget": budget, "spqr": best_spqr["format"], "spqr_bpw": best_spqr["bits_per_weight"], "spqr_kl": best_spqr["kl"],
            "uniform": best_uniform and best_uniform["format"], "uniform_bpw": best_uniform and best_uniform["bits_per_weight"],
            "uniform_kl": best_uniform and best_uniform["kl"],
            "spqr_wins": best_uniform is None or best_spqr["kl"] < best_uniform["kl"],
        })
    ref_ppl = next(iter(results.values())).reference_ppl
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "hessians": "original model (collected once, shared by every format)",
        "n_tokens": next(iter(results.values())).n_tokens, "original_ppl": ref_ppl, "rows": table, "budgets": verdicts,
    }
    lines = [
        f"# SpQR vs uniform GPTQ on {args.model}",
        "",
        f"GPTQ with Hessians of the original model ({calib_config.n_samples} x {calib_config.seq_len} calibration tokens) "
        f"for every format; evaluation: {eval_config.n_windows} x {eval_config.ctx} held-out wiki tokens, original PPL {ref_ppl:.3f}. "
        f"bits/weight = bytes of the quantized layers in the file x 8 / their weights. Machine: {payload['machine']['cpu']}.",
        "",
        "| format | bits/weight | PPL | KL | top-1 | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for t in sorted(table, key=lambda t: t["bits_per_weight"]):
        lines.append(f"| {t['format']} | {t['bits_per_weight']:.3f} | {t['ppl']:.3f} | {t['kl']:.4f} | {t['top1']:.3f} | {t['quantize_seconds']:.0f} |")
    lines += ["", "## Best SpQR recipe vs the best uniform format of equal or larger size", "",
              f"Per budget: the SpQR recipe within 0.25 bits/weight of it with the lowest KL, against every uniform format "
              f"at least as large and at most {SIZE_CLASS} bits/weight larger (all uniform rows are in the table above).", "",
              "| budget | SpQR | bpw | KL | uniform | bpw | KL | SpQR wins |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['budget']} | {v['spqr']} | {v['spqr_bpw']:.3f} | {v['spqr_kl']:.4f} | {v['uniform'] or '-'} | "
                     f"{v['uniform_bpw'] or 0:.3f} | {v['uniform_kl'] or 0:.4f} | {'yes' if v['spqr_wins'] else 'no'} |")
    lines += ["", "## Share of weights kept as outliers, per layer type", "",
              "| recipe | " + " | ".join(LAYER_TYPES) + " |", "|---" * (len(LAYER_TYPES) + 1) + "|"]
    for t in table:
        if t["outlier_share"]:
            lines.append(f"| {t['format']} | " + " | ".join(f"{100 * t['outlier_share'].get(k, 0):.2f}%" for k in LAYER_TYPES) + " |")
    lines += source_grid_caveat([t["format"] for t in table])
    paths = write_results("spqr", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("written:", *paths)


if __name__ == "__main__":
    main()

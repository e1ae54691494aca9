"""RTN vs GPTQ on the default model at uniform formats: PPL, KL, top-1, bits/weight, wall time.

    .venv/bin/python bench/quality.py [--formats w4g128,w3g128,w3g64,w2g64] [--windows 64] [--texts wiki,code]
    .venv/bin/python bench/quality.py --report-only    # quality.md again from quality.json, measuring nothing

Every model is quantized, packed to disk and reloaded from the packed file before evaluation, so
the figures are those of the artifact a user gets: scored through tightfit's compiled engine (the
headline KL) and as the dequantized fp32 torch model, against the original (fp32, dequantized from
the shipped Q4_1 GGUF), all in one pass over the evaluation windows. GPTQ takes sequential Hessians
from the calibration text (as `tightfit compress`, and by default on its text: wiki,code). 4-bit asymmetric g32 is left out on purpose:
the shipped weights already lie on that grid; a format asked for that can hold the source's grid
(bench/source_grid.py `source_grids`, read from the model file) is named in a caveat. Every model is
also scored through the engine on the held-out windows of each other text of --texts (default: code),
with its out-of-domain penalty (KL there / KL on the first text, wiki). Nothing is chosen here:
every row is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ENGINE_COLUMNS, add_text_arguments, dense_line, other_texts, other_texts_lines, machine_info, machine_line, protocol_line, quantize_and_evaluate, score_columns,
    rewrite_results, score_json, text_choices, texts_line, windows_help, write_results,
)
from source_grid import grids_from_json, grids_json, source_grid_caveat, source_grids  # noqa: E402

from tightfit.artifacts import QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats import QuantFormat  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402


def markdown(payload: dict) -> str:
    calib, ev = payload["calibration"], EvalConfig.from_json(payload["evaluation"])
    others = other_texts(payload, ev)
    lines = [
        f"# Quality: RTN vs GPTQ on {payload['model']}",
        "",
        machine_line(payload["machine"]),
        "",
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} Calibration: {calib['text']}, {calib['n_samples']} x "
        f"{calib['seq_len']} tokens. {ENGINE_COLUMNS}",
        "bits/weight counts codes + scales + zeros of the quantized layers; `all` divides the whole file "
        "(fp16 embeddings included) by all weights. Quantize time includes calibration for GPTQ. "
        f"Wall time {payload['wall_s'] / 60:.0f} min.",
        *other_texts_lines(payload, ev, extra=", ".join(f"{t}/{ev.text}" for t in others)
                           + f": the out-of-domain penalty (KL there / KL on {ev.text})."),
        "",
        "| format | method | bits/weight | bpw all | PPL | KL (engine) | KL (fp32 ref) | top-1 | "
        + "".join(f"KL {t} | {t}/{ev.text} | " for t in others) + "quantize s |",
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(others) + "---|",
    ]
    for r in payload["rows"]:
        domains = "".join(f"{r[f'kl_{t}']:.4f} | {r[f'kl_{t}'] / r['kl']:.2f} | " for t in others)
        lines.append(f"| {r['format']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['model_bits_per_weight']:.3f} | "
                     f"{score_columns(r)} | {domains}{r['quantize_seconds']:.0f} |")
    caveat = source_grid_caveat([r["format"] for r in payload["rows"]], grids_from_json(payload["source_grids"]))
    if caveat:
        lines += ["", f"Source grid: {caveat}"]
    if dense_line(payload["rows"]):
        lines += ["", dense_line(payload["rows"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--formats", default="w4g128,w3g128,w3g64,w2g64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    add_text_arguments(ap)
    ap.add_argument("--name", default="quality")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: render NAME.md again from NAME.json")
    args = ap.parse_args()
    if args.report_only:
        print("written:", *rewrite_results(args.name, [], markdown, "quality.py"))
        return
    calib_config, texts = text_choices(args)
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    eval_config = EvalConfig(text=texts[0], n_windows=args.windows)
    t = time.perf_counter()
    calibration = calibrate_stage.calibrate(loaded.tokenizer, calib_config)
    calib_seconds = time.perf_counter() - t

    configs = {f"{fmt} {method}": QuantizeConfig(fmt=QuantFormat.parse(fmt), method=method)
               for fmt in args.formats.split(",") for method in args.methods.split(",")}
    quantized, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, texts=texts)
    rows = []
    for key, config in configs.items():
        q = quantized[key]
        fmt, method = key.split()
        rows.append({
            "format": fmt, "method": method,
            "quantize_seconds": round(q["quantize_seconds"] + (calib_seconds if method == "gptq" else 0.0), 1),
            "bits_per_weight": q["bits_per_weight"], "file_bytes": q["file_bytes"],
            "model_bits_per_weight": q["model_bits_per_weight"], "engine_dense_layers": q["engine_dense_layers"],
            **score_json(scores[key]),
        })
    ev0 = next(iter(scores.values())).engine
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "texts": list(texts), "texts_line": texts_line(texts),
        "source_grids": grids_json(source_grids(loaded.source)), "n_tokens": ev0.n_tokens, "original_ppl": ev0.reference_ppl,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    md = markdown(payload)
    paths = write_results(args.name, payload, md)
    print(md)
    print("written:", *paths)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

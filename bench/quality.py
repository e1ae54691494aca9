"""RTN vs GPTQ on the default model at uniform formats: PPL, KL, top-1, bits/weight, wall time.

    .venv/bin/python bench/quality.py [--formats w4g128,w3g128,w3g64,w2g64] [--windows 64]

Every model is quantized, packed to disk and reloaded from the packed file before evaluation, so
the figures are those of the artifact a user gets. All models are scored in one pass over the
evaluation windows against the original (fp32, dequantized from the shipped Q4_1 GGUF).
4-bit asymmetric g32 is left out on purpose: the shipped weights already lie on that grid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig, eval_windows, evaluate_many  # noqa: E402
from tightfit.formats import QuantFormat  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.runtime import build_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages import pack as pack_stage  # noqa: E402
from tightfit.stages import quantize as quantize_stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--formats", default="w4g128,w3g128,w3g64,w2g64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows)
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()

    loaded = load_model(args.model)
    calib_config = CalibrationConfig()
    eval_config = EvalConfig(n_windows=args.windows)
    t = time.perf_counter()
    calibration = calibrate_stage.calibrate(loaded.tokenizer, calib_config)
    calib_seconds = time.perf_counter() - t

    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt_name in args.formats.split(","):
            for method in args.methods.split(","):
                config = QuantizeConfig(fmt=QuantFormat.parse(fmt_name), method=method)
                t = time.perf_counter()
                qmodel = quantize_stage.quantize_model(loaded, calibration if method == "gptq" else None, config)
                seconds = time.perf_counter() - t + (calib_seconds if method == "gptq" else 0.0)
                out = pack_stage.write(pack_stage.pack(qmodel, loaded, calib_config), loaded.tokenizer, Path(tmp) / f"{fmt_name}-{method}")
                del qmodel
                packed = load_packed(out)
                key = f"{fmt_name} {method}"
                models[key] = build_model(packed)
                rows.append({
                    "format": fmt_name, "method": method, "quantize_seconds": round(seconds, 1),
                    "bits_per_weight": 8 * packed.quantized_bytes() / packed.quantized_weights(),
                    "file_bytes": (out / "model.safetensors").stat().st_size,
                    "model_bits_per_weight": 8 * (out / "model.safetensors").stat().st_size / packed.total_weights(),
                })
                print(f"{key}: quantized in {seconds:.0f}s", flush=True)
        windows = eval_windows(loaded.tokenizer, eval_config)
        results = evaluate_many(models, windows, reference=loaded.model, batch_size=eval_config.batch_size)
    for row in rows:
        r = results[f"{row['format']} {row['method']}"]
        row.update(ppl=r.ppl, kl=r.kl, top1=r.top1)
    ref_ppl = next(iter(results.values())).reference_ppl
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "n_tokens": next(iter(results.values())).n_tokens, "original_ppl": ref_ppl, "rows": rows,
    }
    lines = [
        f"# Quality: RTN vs GPTQ on {args.model}",
        "",
        f"Evaluation: {eval_config.n_windows} windows x {eval_config.ctx} tokens of held-out wiki text "
        f"({payload['n_tokens']} scored tokens); calibration: {calib_config.n_samples} x {calib_config.seq_len} tokens. "
        f"Original (fp32) PPL {ref_ppl:.3f}. Machine: {payload['machine']['cpu']}, {payload['machine']['torch_threads']} threads.",
        "bits/weight counts codes + scales + zeros of the quantized layers; `all` divides the whole file "
        "(fp16 embeddings included) by all weights. Quantize time includes calibration for GPTQ.",
        "",
        "| format | method | bits/weight | bpw all | PPL | KL | top-1 | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['model_bits_per_weight']:.3f} | "
                     f"{r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['quantize_seconds']:.0f} |")
    paths = write_results(args.name, payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("written:", *paths)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

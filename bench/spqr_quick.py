"""Quick model-level check of SpQR against uniform GPTQ at the budget-matched pairs.

    .venv/bin/python bench/spqr_quick.py [--windows 8] [--formats w2g32,spqr-w2g32-s3-o0.5,...]

A cheap stand-in for bench/spqr.py while iterating on the SpQR quantizer: GPTQ from the cached
original-model Hessians only (no sequential recalibration; the same as bench/spqr.py does), the
packed files reloaded from disk, KL against the original on a few evaluation windows (default
8 x 512 tokens instead of the protocol's 64), through tightfit's engine and as the fp32 torch model,
one thread. Prints a table and the wall time; writes nothing. Figures from here are for comparing
quantizer variants, not for the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hessians_cached, quantize_and_evaluate, score_columns, score_json  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL, load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402

# (budget, SpQR recipe, uniform rival at equal or larger size), as in bench/results/spqr.md
PAIRS = (
    (2.5, "spqr-w2g32-s3-o0.5", "w2g32"),
    (3.0, "spqr-w2g16-s3-o1.0", "w3g64"),
    (3.0, "spqr-w3g64-s3-o0.0", "w3g64"),
    (3.5, "spqr-w3g32-s3-o0.5", "w3g32"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--formats", default=",".join(dict.fromkeys(f for _, s, u in PAIRS for f in (s, u))))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    calib_config, eval_config = CalibrationConfig(), EvalConfig(n_windows=args.windows)
    calibration = calibrate_stage.calibrate(loaded.tokenizer, calib_config)
    hessians = hessians_cached(loaded, calibration)
    names = args.formats.split(",")
    configs = {name: QuantizeConfig(fmt=parse_format(name), method="gptq") for name in names}
    rows, scores = quantize_and_evaluate(loaded, configs, calibration, eval_config, hessians=hessians)

    print(f"\n{args.model}: GPTQ from cached original-model Hessians, KL on {args.windows} x {eval_config.ctx} tokens, "
          f"{args.threads} thread(s)")
    print("| format | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | quantize s |\n|---|---|---|---|---|---|---|")
    for name in sorted(names, key=lambda n: rows[n]["bits_per_weight"]):
        r = rows[name]
        print(f"| {name} | {r['bits_per_weight']:.3f} | {score_columns(score_json(scores[name]))} | {r['quantize_seconds']:.0f} |")
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

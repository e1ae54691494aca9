"""tightfit against its peers in one run (issue 6): llama.cpp's quantizer (with and without an
importance matrix) and HQQ, on the default model and the same held-out windows.

    .venv/bin/python bench/peers.py [--windows 64] [--select-windows 8] [--tightfit w2g64,...]
                                    [--llama Q2_K,...] [--llama-imatrix Q2_K,...] [--hqq 2,3,4] [--no-speed]
                                    [--calib-text wiki,code] [--texts wiki,code]
    .venv/bin/python bench/peers.py --report-only    # peers.md and its plot again from peers.json, measuring nothing

What each peer gets, so that the comparison is fair:
- one reference: the original model (fp32, dequantized from the shipped Q4_1 GGUF). Its log-probs
  on every window are computed once (evaluate.reference_log_probs, ~100 MB per window); every entry
  is scored against them (KL(original || entry), top-1 agreement, PPL) on the same windows of the
  evaluation protocol (tightfit/evaluate.py: held-out wiki text, BOS then 511 text tokens per
  window, 64 windows by default), and on `--select-windows` held-back calibration windows, on which
  the best entry per bits/weight band is chosen; and on as many held-out windows of each other text
  of `--texts` (default: code, Python source), the KL column of another domain.
- one calibration text for every peer that uses data (`--calib-text`, default the command line's:
  wiki,code): tightfit's GPTQ Hessians, and the imatrix made from them.
- each entry is scored through the engine that runs it. tightfit: GPTQ from the cached Hessians of
  the original model (as bench/spqr.py), packed to disk and reloaded, scored through tightfit's
  compiled engine (int8 activations, fp16 KV cache), and also as the dequantized fp32 torch model
  (KL (fp32 ref)).
- llama.cpp: its own quantizer (llama_model_quantize) from an F32 GGUF of the original written
  by tightfit's exporter, so no second quantization. Token embeddings (= the tied head) are kept
  F16 as tightfit keeps them, so both compare quantized linears only. Logits come from llama.cpp
  itself (Llama(logits_all=True)) over the same token ids, BOS included.
- llama.cpp + imatrix: the importance matrix is the per-input-channel mean of squared activations
  of each linear over the calibration text, i.e. diag(H) / 2 of tightfit's cached Hessians
  (H = 2/T sum x x^T), handed to llama_model_quantize as llama_model_imatrix_data entries.
- HQQ (hqq package, CPU, its default group size 64, float32 compute): weights quantized with
  HQQLinear, then dequantized into a copy of the model for scoring (HQQ has no CPU kernels).
  Install it without its GPU dependencies: `.venv/bin/pip install --no-deps hqq==0.2.8.post1 termcolor`.
- engine floors: llama.cpp running the F32 GGUF, and tightfit's engine running the original's
  fp32 weights, against the torch reference: differences below them are noise.

bits/weight counts the bytes of the quantized linear layers (7 per block) over their weights:
tightfit from its packed tensors (codes, scales, zeros, outliers); llama.cpp from the GGUF tensor
sizes of those layers (whatever type llama.cpp chose per tensor: widths that are not a multiple
of 256 make K- and IQ-types fall back, which this reports); HQQ from its packed W_q plus its
scale and zero per group at 16 bits each (its default fp16 meta). Embeddings are not counted.
Quantize seconds: tightfit excludes the one-time Hessian collection (cached), llama.cpp + imatrix
excludes making the imatrix (from the same cache). Decode tok/s: 2 threads, median of 3 runs after
a warm-up, engines timed round-robin (bench/speed.py); only engines that run on CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS, SELECT_WINDOWS, add_text_arguments, machine_info, texts_line, windows_help, write_results,
)
from source_grid import grids_json, source_grids  # noqa: E402
from peers_report import (  # noqa: E402
    NO_MORE_BITS, SPEED_NEW, SPEED_PROMPT, SPEED_REPEATS, SPEED_THREADS, Entry, mark_source_grid, markdown, plot, saved_run,
    verdicts,
)
from peers_runs import (  # noqa: E402
    CACHE, engine_floors, f32_gguf, imatrix_entries, measure_speed, prepare, run_hqq, run_llama, run_tightfit,
)

from tightfit.artifacts import config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.model import DEFAULT_MODEL  # noqa: E402

# best recipes per bits/weight band in bench/results/spqr.md, plus w4g32-sym (the bytes of llama.cpp's Q4_0)
TIGHTFIT = ["w2g64", "w4g128", "w4g32-sym", "spqr-w2g32-s3-o0.5", "spqr-w3g64-s3-o0.0", "spqr-w3g32-s3-o0.5", "spqr-w4g32-s3-o0.5"]
# Q4_1 is left out: the original's weights lie on its grid, so it would be (near) lossless.
LLAMA = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ3_XXS"]
LLAMA_IMATRIX = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ2_XXS"]  # IQ2_XXS needs an imatrix
HQQ_BITS = [2, 3, 4]
HQQ_INSTALL = ".venv/bin/pip install --no-deps hqq==0.2.8.post1 termcolor"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--select-windows", type=int, default=SELECT_WINDOWS,
                    help="held-back calibration windows the band table chooses each peer's entry on")
    ap.add_argument("--tightfit", default=",".join(TIGHTFIT))
    ap.add_argument("--llama", default=",".join(LLAMA))
    ap.add_argument("--llama-imatrix", default=",".join(LLAMA_IMATRIX))
    ap.add_argument("--hqq", default=",".join(map(str, HQQ_BITS)))
    ap.add_argument("--no-speed", action="store_true")
    add_text_arguments(ap)
    ap.add_argument("--name", default="peers", help="results name in bench/results/ (empty: write nothing)")
    ap.add_argument("--report-only", action="store_true",
                    help="write bench/results/NAME.md and its plot again from NAME.json (e.g. after a caveat was added "
                         "here), measuring nothing")
    args = ap.parse_args()
    if args.report_only:
        return report(args.name)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    t0 = time.time()
    if split(args.hqq):  # now, not as an empty HQQ column after half an hour's run
        try:
            importlib.import_module("hqq.core.quantize")  # what run_hqq uses (it needs termcolor too)
        except ImportError as e:
            sys.exit(f"peers.py: error: HQQ is not installed or does not import ({e}): {HQQ_INSTALL}, or pass --hqq '' to leave it out")

    import llama_cpp

    texts = tuple(split(args.texts))
    loaded, calib_config, eval_config, calibration, hessians, scorer = prepare(args.model, args.windows, args.select_windows,
                                                                               args.calib_text, texts)

    entries: list[Entry] = []
    payload: dict = {}
    import tempfile

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        src = f32_gguf(loaded, CACHE)
        payload["engine_floors"] = engine_floors(loaded, src, scorer)

        tf_entries, tf_folders = run_tightfit(loaded, calibration, hessians, split(args.tightfit), scorer, tmp)
        entries += tf_entries
        ll_entries, ll_paths = run_llama(src, split(args.llama), None, scorer, tmp, "llama.cpp")
        entries += ll_entries
        im_entries, im_paths = run_llama(src, split(args.llama_imatrix), imatrix_entries(loaded, hessians), scorer, tmp, "llama.cpp+imatrix")
        entries += im_entries
        entries += run_hqq(loaded, [int(b) for b in split(args.hqq)], scorer)

        if not args.no_speed:
            print("timing decode (round-robin)", flush=True)
            tf = [(e, tf_folders[e.name]) for e in tf_entries if e.name in tf_folders]
            ll = [(e, ll_paths[e.name]) for e in ll_entries if e.name in ll_paths]
            ll += [(e, im_paths[e.name]) for e in im_entries if e.name in im_paths]
            payload["bandwidth_gb_s"] = measure_speed(tf, ll)

    from importlib.metadata import PackageNotFoundError, version

    try:
        hqq_version = version("hqq")
    except PackageNotFoundError:
        hqq_version = "not installed"
    grids = source_grids(loaded.source)
    mark_source_grid(entries, grids)
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "texts": list(texts), "texts_line": texts_line(texts), "held_back_windows": args.select_windows, "source_grids": grids_json(grids), "n_tokens": scorer.count,
        "original_ppl": scorer.reference_ppl,
        "llama_cpp_version": llama_cpp.__version__, "hqq_version": hqq_version, "no_more_bits": NO_MORE_BITS,
        "speed": {"threads": SPEED_THREADS, "prompt_tokens": SPEED_PROMPT, "new_tokens": SPEED_NEW, "repeats": SPEED_REPEATS},
        **payload, "entries": [e.to_json() for e in entries], "wall_s": round(time.time() - t0, 1),
        "verdicts": verdicts(entries),
    }
    md = markdown(payload, entries)
    print(md)
    if args.name:
        write_report(args.name, payload, entries, md)


def write_report(name: str, payload: dict, entries: list[Entry], md: str) -> None:
    paths = write_results(name, payload, md)
    ev = EvalConfig.from_json(payload["evaluation"])
    png = paths[0].with_suffix(".png")
    plot(entries, png, f"{payload['model']}: KL vs bits/weight, {ev.n_windows} x {ev.ctx} held-out tokens")
    print("wrote", *paths, png)


def report(name: str) -> None:
    """NAME.md and its plot again from NAME.json (peers_report.saved_run)."""
    json_path = RESULTS / f"{name}.json"
    payload, entries = saved_run(json_path)
    try:
        md = markdown(payload, entries)
    except KeyError as e:
        sys.exit(f"peers: {json_path} was written by an older bench/peers.py (no {e}): rerun it")
    print(md)
    write_report(name, payload, entries, md)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

"""tightfit's packed files against llama.cpp's presets on a bigger model (issue 11, item 6): whole
files, whole-file bits/weight, each scored by the engine that runs it on the same held-out windows.

    .venv/bin/python bench/peers_files.py --model qwen2.5-coder-1.5b --work out/qwen15-work7 --calib-dtype bf16 \\
        --tightfit out/qwen15-bpw3.0,out/qwen15-bpw3.5,out/qwen15-bpw4.0 [--llama Q2_K,...] [--llama-imatrix ...]

Unlike bench/peers.py (the default model: linear layers only, embeddings F16 on both sides, GPTQ
run inside), this compares what a user gets from each tool's own recipe for a size:
- tightfit: the packed folders given (e.g. `tightfit compress MODEL --bpw B`: the planner decides
  every layer's format, embeddings and head included), scored through tightfit's compiled engine
  (int8 activations, fp16 KV cache).
- llama.cpp: `llama_model_quantize` with its preset's own choices for every tensor (embeddings and
  tied head included), from an F32 GGUF of the original written by tightfit's exporter (from the
  F32 file rather than the original's own, so that no tensor is copied through on its source's
  grid), scored through llama.cpp itself (logits of every position, llama-cpp-python).
- llama.cpp + imatrix: the same with an importance matrix = diag(H) / 2 of the original's Hessians
  in --work (the calibration tokens tightfit's plans saw), i.e. the mean squared input activation
  per channel.
bits/weight = 8 x the bytes of every tensor in the file / the original's parameter count (a tied
head counted once), the same count for every entry. The reference is the original model in fp32
(torch), its log-probs on every window computed once.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from common import RESULTS, machine_info, machine_line, protocol_line, windows_help, write_results  # noqa: E402
from source_grid import grids_from_json, grids_json, source_grids  # noqa: E402
from peers_runs import f32_gguf, imatrix_entries  # noqa: E402
from peers_report import (  # noqa: E402
    Entry, grid_bullet, mark_source_grid, pareto_front, plot, saved_run, types_note, verdict_line, verdicts,
)

from tightfit.artifacts import CalibrationConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig, eval_windows, evaluate, packed_candidate, reference_log_probs  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.metrics import nll_per_position  # noqa: E402
from tightfit.model import load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ["Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_XS", "IQ4_NL", "Q4_K_M"]
LLAMA_IMATRIX = ["IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_XS", "IQ4_NL", "Q4_K_M"]  # IQ2_XS needs one
THREADS = 2


def score(candidate, windows: torch.Tensor, logp: torch.Tensor, entry: Entry) -> None:
    t = time.perf_counter()
    ev = evaluate(candidate, windows, reference=logp, batch_size=1, progress=False)
    entry.ppl, entry.kl, entry.top1 = ev.ppl, ev.kl, ev.top1
    entry.kl_held_back = ev.kl  # no held-back windows here: verdicts compare evaluation KL only
    print(f"  {entry.peer} {entry.name}: {entry.bits_per_weight:.3f} bpw  PPL {entry.ppl:.3f}  KL {entry.kl:.4f}  "
          f"top-1 {entry.top1:.3f}  (scored in {time.perf_counter() - t:.0f} s)", flush=True)


def calibration_note(packed_calibration: dict | None, run_calibration: dict) -> str:
    """'' when a packed file was calibrated as the run's table says, else how it differs (text, windows,
    forward precision)."""
    if packed_calibration is None:
        return "; not calibrated"
    diff = [f"{k} {packed_calibration.get(k)}" for k in ("text", "n_samples", "seq_len", "forward_dtype")
            if packed_calibration.get(k) != run_calibration.get(k)]
    return f"; calibrated with {', '.join(diff)}" if diff else ""


def run_tightfit(folders: list[Path], n_weights: int, windows, logp, run_calibration: dict) -> list[Entry]:
    entries = []
    for folder in folders:
        packed = load_packed(folder)
        nbytes = packed.quantized_bytes() + packed.kept_bytes()
        formats = dict(Counter(q.fmt.name for q in packed.layers.values()).most_common())  # which grids it holds
        entry = Entry("tightfit", folder.name, 8 * nbytes / n_weights, math.nan, file_mb=nbytes / 1e6, types=formats,
                      note=f"{len(formats)} formats" + calibration_note(packed.info.get("calibration"), run_calibration))
        score(packed_candidate(packed, "fast", ctx=windows.shape[1]), windows, logp, entry)
        entries.append(entry)
        del packed
    return entries


def run_llama(src: Path, types: list[str], imatrix, label: str, n_weights: int, windows, logp, tmp: Path) -> list[Entry]:
    entries = []
    for t in types:
        dst = tmp / f"{label}-{t}.gguf"
        try:
            seconds = llamacpp.quantize(src, dst, t, imatrix=imatrix, threads=THREADS)
        except RuntimeError as e:
            print(f"  {label} {t}: {e}", flush=True)
            entries.append(Entry(label, t, math.nan, math.nan, note=str(e)))
            continue
        nbytes, mix = llamacpp.gguf_tensor_bytes(dst)
        entry = Entry(label, t, 8 * nbytes / n_weights, seconds, file_mb=nbytes / 1e6, types=mix)
        fn = llamacpp.LlamaLogits(dst, windows.shape[1], THREADS)
        score(fn, windows, logp, entry)
        fn.close()
        dst.unlink()
        entries.append(entry)
    return entries


def run_times(payload: dict) -> str:
    """The run's wall time and each later --add run's, each with its notes (--note: e.g. what else ran then)."""
    def minutes(run: dict) -> str:
        return f"{run['wall_s'] / 60:.1f} min" + "".join(f"; {n}" for n in run.get("notes", []))

    return (f"Wall time {minutes(payload)}."
            + "".join(f" Added later on the same windows ({a['date']}, {minutes(a)}): {', '.join(a['entries'])}."
                      for a in payload.get("added", [])))


def markdown(payload: dict, entries: list[Entry]) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    grids = grids_from_json(payload["source_grids"])
    lines = [
        f"# tightfit's planned files vs llama.cpp's presets on {payload['model']} (one run)", "",
        machine_line(payload["machine"], THREADS), "",
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} Identical token ids for every engine. "
        + run_times(payload), "",
        "- **tightfit**: the packed folders of `tightfit compress` runs (their plans choose every layer's format, "
        "embeddings and head included), scored through tightfit's compiled engine (int8 activations, fp16 KV cache).",
        f"- **llama.cpp** {payload['llama_cpp_version']}: `llama_model_quantize` with each preset's own per-tensor choices "
        "(embeddings and the tied head included), from an F32 GGUF of the original written by tightfit's exporter; logits "
        "from llama.cpp itself.",
        "- **llama.cpp+imatrix**: the same with an importance matrix = diag(H)/2 of the original's Hessians over the "
        f"calibration text tightfit's plans used ({payload['calibration']['n_samples']} x {payload['calibration']['seq_len']} "
        "tokens).",
        "- bits/weight = 8 x bytes of every tensor in the file / the original's parameter count "
        f"({payload['n_weights'] / 1e9:.3f} B, tied head once), the same for every entry.", "",
        "| peer | recipe | bits/weight | tensor MB | PPL | KL | top-1 | quantize s | types / note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for peer in ("tightfit", "llama.cpp", "llama.cpp+imatrix"):
        for e in sorted((e for e in entries if e.peer == peer), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight)):
            if math.isnan(e.kl):
                lines.append(f"| {peer} | {e.name} | - | - | - | - | - | - | failed: {e.note} |")
                continue
            seconds = "-" if math.isnan(e.quantize_seconds) else f"{e.quantize_seconds:.0f}"
            lines.append(f"| {peer} | {e.name} | {e.bits_per_weight:.3f} | {e.file_mb:.0f} | {e.ppl:.3f} | {e.kl:.4f} | "
                         f"{e.top1:.3f} | {seconds} | {types_note(e)} |")
    lines += ["", "Pareto front (none is both smaller and closer to the original): "
              + ", ".join(f"{e.peer} {e.name} ({e.bits_per_weight:.2f}, {e.kl:.4f})" for e in pareto_front(entries)) + ".",
              "", "## Where tightfit loses", "",
              "Each tightfit file against every llama.cpp file at no more bits (up to 0.05 bits/weight more), by KL.", "",
              *map(verdict_line, payload["verdicts"]), "", "## Caveats", "",
              *([grid_bullet(entries, grids)] if grids else []),
              "- Entries named after a folder are tightfit plans (`--bpw B`, Hessians and sensitivity of one work folder); "
              "a uniform tightfit entry (one format) keeps its embeddings and head in fp16, hence its size.",
              "- A failed entry is llama.cpp refusing the preset (IQ3_XXS and the IQ2 types need an importance matrix).",
              "- tightfit's quantize seconds are in each compress run's own result (bench/results/compress_*.md), not here.",
              "- KL and PPL move by a few percent between window sets; small gaps are not significant.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--work", type=Path, help="a compress work folder holding the original's Hessians (needed unless "
                                               "--report-only)")
    ap.add_argument("--calib-dtype", choices=("fp32", "bf16"), default="bf16", help="as the compress runs used")
    ap.add_argument("--tightfit", default="", help="packed folders, comma-separated")
    ap.add_argument("--llama", default=",".join(LLAMA))
    ap.add_argument("--llama-imatrix", default=",".join(LLAMA_IMATRIX))
    ap.add_argument("--windows", type=int, default=16, help=windows_help())
    ap.add_argument("--name", default="peers_qwen15", help="results name in bench/results/ (empty: write nothing)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite bench/results/NAME.md and its plot from NAME.json (no scoring)")
    ap.add_argument("--add", action="store_true",
                    help="score only the entries given and merge them into bench/results/NAME.json (same model, windows "
                         "and calibration; an entry of the same peer and name is replaced), e.g. one new plan: "
                         "--add --tightfit out/qwen15-bpw2.5 --llama '' --llama-imatrix ''")
    ap.add_argument("--note", action="append", default=[],
                    help="a caveat printed beside this run's wall time and stored in the JSON (e.g. what else shared the "
                         "machine); repeatable")
    args = ap.parse_args()
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if args.report_only:
        return report(args.name)
    with_imatrix = bool(split(args.llama_imatrix))  # the Hessians serve only llama.cpp's importance matrix
    if args.work is None and with_imatrix:
        sys.exit("peers_files: --work is needed for --llama-imatrix (a compress work folder holding the original's Hessians)")
    folders = [Path(f) for f in split(args.tightfit)]
    for f in folders:
        if not (f / "manifest.json").is_file():
            sys.exit(f"peers_files: {f} is not a packed tightfit folder")
    eval_config, calib_config = EvalConfig(n_windows=args.windows), CalibrationConfig(forward_dtype=args.calib_dtype)
    earlier = None
    if args.add:
        json_path = RESULTS / f"{args.name}.json"
        if not args.name or not json_path.is_file():
            sys.exit(f"peers_files: --add needs an earlier run's {json_path} to merge into")
        earlier = json.loads(json_path.read_text())
        same = {"model": args.model, "evaluation": config_to_json(eval_config)}
        if with_imatrix:  # its importance matrices join the earlier ones: the same calibration
            same["calibration"] = config_to_json(calib_config)
        for key, value in same.items():
            if earlier.get(key) != value:
                sys.exit(f"peers_files: --add: {json_path} has another {key} ({earlier.get(key)} vs {value}); "
                         "its entries would not compare")
    t0 = time.time()
    import llama_cpp

    torch.set_num_threads(THREADS)
    cache = ROOT / ".cache" / f"peers-{args.model}"
    cache.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, streamed=False)
    imatrix = None
    if with_imatrix:
        files = args.work / "hessians"  # a streamed model's, one file per block, else one file
        hessians = (calibrate_stage.load_hessian_files(files, loaded, calib_config) if files.is_dir()
                    else calibrate_stage.load_hessians(args.work / "hessians.safetensors", loaded, calib_config))
        if hessians is None:
            sys.exit(f"peers_files: {args.work}/hessians holds no Hessians of {args.model} for this calibration")
        imatrix = imatrix_entries(loaded, hessians)
        del hessians
    n_weights = sum(p.numel() for p in loaded.model.parameters())
    src = f32_gguf(loaded, cache)
    windows = eval_windows(loaded.tokenizer, eval_config)
    logp = reference_log_probs(loaded.model, windows, batch_size=1)  # [W, T-1, V]
    original_ppl = math.exp(nll_per_position(logp, windows[:, 1:]).mean().item())
    print(f"reference: {windows.shape[0]} windows, PPL {original_ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    grids = source_grids(loaded.source)
    del loaded
    gc.collect()

    run_calibration = (earlier or {}).get("calibration") or config_to_json(calib_config)
    entries = run_tightfit(folders, n_weights, windows, logp, run_calibration)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        entries += run_llama(src, split(args.llama), None, "llama.cpp", n_weights, windows, logp, Path(tmp))
        entries += run_llama(src, split(args.llama_imatrix), imatrix, "llama.cpp+imatrix", n_weights, windows, logp, Path(tmp))
    mark_source_grid(entries, grids)
    payload = {
        "machine": machine_info(), "model": args.model, "source_grids": grids_json(grids),
        "calibration": config_to_json(calib_config),
        "evaluation": config_to_json(eval_config), "n_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "original_ppl": original_ppl, "n_weights": n_weights, "llama_cpp_version": llama_cpp.__version__,
        "tightfit_folders": [str(f) for f in folders], "entries": [e.to_json() for e in entries],
        "wall_s": round(time.time() - t0, 1), "verdicts": verdicts(entries), "notes": args.note,
    }
    if earlier is not None:  # this run's entries replace or join the earlier run's
        new = {(e.peer, e.name) for e in entries}
        kept = [Entry.from_json(e) for e in earlier["entries"] if (e["peer"], e["name"]) not in new]
        entries = mark_source_grid(kept + entries, grids)
        added = earlier.get("added", []) + [{"entries": sorted(f"{p} {n}" for p, n in new), "date": payload["machine"].get("date"),
                                             "wall_s": payload["wall_s"], "notes": args.note}]
        payload = {**earlier, "entries": [e.to_json() for e in entries], "verdicts": verdicts(entries), "added": added,
                   "source_grids": grids_json(grids),
                   "tightfit_folders": sorted(set(earlier.get("tightfit_folders", [])) | {str(f) for f in folders})}
    md = markdown(payload, entries)
    print(md)
    if args.name:
        paths = write_results(args.name, payload, md)
        write_plot(payload, entries, paths[0].with_suffix(".png"))
        print("wrote", *paths)


def write_plot(payload: dict, entries: list[Entry], png: Path) -> None:
    ev = EvalConfig.from_json(payload["evaluation"])
    try:
        plot(entries, png, f"{payload['model']}: KL vs whole-file bits/weight, {ev.n_windows} x {ev.ctx} held-out tokens",
             xlabel="bits/weight of the whole file (every tensor / the original's parameter count)")
        print("wrote", png)
    except ImportError as e:
        print(f"no plot ({e}): install the bench extra (bash scripts/setup.sh --bench)")


def report(name: str) -> None:
    """The Markdown and the plot of a saved run, from its JSON (peers_report.saved_run), e.g. after a
    caveat was added to this script."""
    json_path = RESULTS / f"{name}.json"
    payload, entries = saved_run(json_path)
    md = markdown(payload, entries)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    write_plot(payload, entries, json_path.with_suffix(".png"))


if __name__ == "__main__":
    main()

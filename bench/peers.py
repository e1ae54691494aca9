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
import copy
import importlib
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from common import (  # noqa: E402
    RESULTS, SELECT_WINDOWS, add_text_arguments, hessians_cached, machine_info, text_windows, texts_line, windows_help, write_results,
)
from source_grid import grids_json, source_grids  # noqa: E402
from peers_report import (  # noqa: E402
    HQQ_GROUP, NO_MORE_BITS, SPEED_NEW, SPEED_PROMPT, SPEED_REPEATS, SPEED_THREADS, Entry, mark_source_grid, markdown, plot,
    saved_run, verdicts,
)

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.data import parse_mix  # noqa: E402
from tightfit.evaluate import EvalConfig, backend_scorer, eval_windows, evaluate, reference_log_probs  # noqa: E402
from tightfit.formats.packed import PackedModel, load_packed  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.metrics import nll_per_position  # noqa: E402
from tightfit.model import DEFAULT_MODEL, get_module, load_model  # noqa: E402
from tightfit.pipeline import linear_layer_shapes  # noqa: E402
from tightfit.runtime import build_model  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages import pack as pack_stage  # noqa: E402
from tightfit.stages import quantize as quantize_stage  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "peers"
# best recipes per bits/weight band in bench/results/spqr.md, plus w4g32-sym (the bytes of llama.cpp's Q4_0)
TIGHTFIT = ["w2g64", "w4g128", "w4g32-sym", "spqr-w2g32-s3-o0.5", "spqr-w3g64-s3-o0.0", "spqr-w3g32-s3-o0.5", "spqr-w4g32-s3-o0.5"]
# Q4_1 is left out: the original's weights lie on its grid, so it would be (near) lossless.
LLAMA = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ3_XXS"]
LLAMA_IMATRIX = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ2_XXS"]  # IQ2_XXS needs an imatrix
HQQ_BITS = [2, 3, 4]
HQQ_INSTALL = ".venv/bin/pip install --no-deps hqq==0.2.8.post1 termcolor"


# ---- scoring against the cached reference --------------------------------------------------------


class Scorer:
    """The original's log-probs on the evaluation and the held-back windows and on the windows of
    each other text, computed once; entries are scored one at a time against them
    (tightfit/evaluate.py, per scored token)."""

    def __init__(self, reference: torch.nn.Module, windows: torch.Tensor, held_back: torch.Tensor,
                 others: dict[str, torch.Tensor] | None = None) -> None:
        self.windows, self.held_back = windows, held_back  # [W, T], [H, T] int64
        self.logp = reference_log_probs(reference, windows)  # [W, T-1, V]
        self.held_back_logp = reference_log_probs(reference, held_back)  # [H, T-1, V]
        self.others = {text: (w, reference_log_probs(reference, w)) for text, w in (others or {}).items()}
        self.count = windows.shape[0] * (windows.shape[1] - 1)
        self.reference_ppl = math.exp(nll_per_position(self.logp, windows[:, 1:]).mean().item())
        self.ctx = max(windows.shape[1], held_back.shape[1])  # the KV cache an engine needs

    def score(self, candidate, entry: Entry, *, fp32: torch.nn.Module | None = None) -> None:
        """candidate: a torch module, or an evaluate.Scorer (ids [T] -> logits [T, V]) of the engine that
        runs the entry; fp32: the same weights as the dequantized torch model. Fills entry's scores."""
        ev = evaluate(candidate, self.windows, reference=self.logp, progress=False)
        entry.ppl, entry.kl, entry.top1 = ev.ppl, ev.kl, ev.top1
        entry.kl_held_back = evaluate(candidate, self.held_back, reference=self.held_back_logp, progress=False).kl
        if fp32 is not None:
            entry.kl_fp32 = evaluate(fp32, self.windows, reference=self.logp, progress=False).kl
        entry.kl_texts = {text: evaluate(candidate, w, reference=logp, progress=False).kl for text, (w, logp) in self.others.items()}
        others = "".join(f"  KL {text} {kl:.4f}" for text, kl in entry.kl_texts.items())
        print(f"  {entry.peer} {entry.name}: {entry.bits_per_weight:.3f} bpw  PPL {entry.ppl:.3f}  KL {entry.kl:.4f}  "
              f"top-1 {entry.top1:.3f}  held-back KL {entry.kl_held_back:.4f}{others}  ({entry.quantize_seconds:.0f} s)", flush=True)


def engine_scorer(packed: PackedModel, scorer: Scorer, entry: Entry):
    """tightfit's engine for a packed model, as an evaluate.Scorer; notes layers it runs dense."""
    backend = FastBackend(packed, max_positions=scorer.ctx)
    if backend.slow_layers:
        entry.note = (entry.note + "; " if entry.note else "") + \
            f"engine runs {len(backend.slow_layers)} layers dense fp32 (no kernel for the format)"
    return backend_scorer(backend)


# ---- tightfit --------------------------------------------------------------------------------------


def original_packed(loaded) -> PackedModel:
    """The original model as a PackedModel with every tensor kept in fp32 (no quantized layer)."""
    kept = quantize_stage.kept_tensors(loaded.model, set(), "fp32")
    return PackedModel(layers={}, kept=kept, hf_config=loaded.model.config.to_dict(),
                       tied=pack_stage.tied_names(loaded, list(kept)),
                       info={"architecture": loaded.arch.name, "source": {"name": loaded.source.name}})


def run_tightfit(loaded, calibration, hessians, recipes: list[str] | dict[str, QuantizeConfig], scorer: Scorer, out: Path,
                 fp32_ref: bool = True, ready=None) -> tuple[list[Entry], dict]:
    """GPTQ of every recipe (a format name, or name -> QuantizeConfig: a plan) from `hessians`, packed,
    reloaded and scored; `ready`: layers already quantized (a plan's sensitivity sweep kept them)."""
    configs = recipes if isinstance(recipes, dict) else {r: QuantizeConfig(fmt=parse_format(r), method="gptq") for r in recipes}
    entries, folders = [], {}
    for recipe, config in configs.items():
        t = time.perf_counter()
        qmodel = quantize_stage.quantize_model(loaded, None, config, hessians=hessians, ready=ready, progress=False)
        seconds = time.perf_counter() - t
        folder = pack_stage.write(pack_stage.pack(qmodel, loaded, calibration.config), loaded.tokenizer, out / f"tightfit-{recipe}")
        del qmodel
        packed = load_packed(folder)
        mix = dict(Counter(f.name for f in config.plan.values())) if config.plan else {}
        entry = Entry("tightfit", recipe, 8 * packed.quantized_bytes() / packed.quantized_weights(), seconds,
                      file_mb=(folder / "model.safetensors").stat().st_size / 1e6, types=mix)
        scorer.score(engine_scorer(packed, scorer, entry), entry, fp32=build_model(packed) if fp32_ref else None)
        entries.append(entry)
        folders[recipe] = folder
    return entries, folders


# ---- llama.cpp -----------------------------------------------------------------------------------


def f32_gguf(loaded, out: Path) -> Path:
    """The original model as an F32 GGUF through tightfit's exporter (every tensor kept in fp32)."""
    from tightfit.export.gguf import export_gguf

    path = out / "original-f32.gguf"
    if path.exists():
        return path
    tok_dir = out / "tokenizer"
    loaded.tokenizer.save_pretrained(str(tok_dir))
    export_gguf(tok_dir, path, packed=original_packed(loaded))
    return path


def imatrix_entries(loaded, hessians) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per input channel [K] fp32 (= diag(H) / 2)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, loaded.model.config.num_hidden_layers)
    out = {}
    for layer in linear_layer_shapes(loaded):
        target = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        assert target is not None and llamacpp.GGUF_LINEAR.match(target), (layer, target)
        out[target] = np.ascontiguousarray((torch.diagonal(hessians.hessians[layer]) / 2).numpy(), dtype=np.float32)
    return out


def run_llama(src: Path, types: list[str], imatrix, scorer: Scorer, out: Path, label: str) -> tuple[list[Entry], dict]:
    entries, paths = [], {}
    for t in types:
        dst = out / f"{label}-{t}.gguf"
        try:
            seconds = llamacpp.quantize(src, dst, t, imatrix=imatrix, f16_embeddings=True)
        except RuntimeError as e:
            print(f"  {label} {t}: {e}", flush=True)
            entries.append(Entry(label, t, math.nan, math.nan, note=str(e)))
            continue
        bpw, mix = llamacpp.gguf_linear_bits(dst)
        entry = Entry(label, t, bpw, seconds, file_mb=dst.stat().st_size / 1e6, types=mix)
        fn = llamacpp.LlamaLogits(dst, scorer.ctx, SPEED_THREADS)
        scorer.score(fn, entry)
        fn.close()
        entries.append(entry)
        paths[t] = dst
    return entries, paths


# ---- HQQ -----------------------------------------------------------------------------------------


def run_hqq(loaded, bits_list: list[int], scorer: Scorer) -> list[Entry]:
    """HQQ's entries (main has checked that hqq imports)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    entries = []
    layers = list(linear_layer_shapes(loaded))
    for bits in bits_list:
        name = f"w{bits}g{HQQ_GROUP}"
        model = copy.deepcopy(loaded.model)
        config = BaseQuantizeConfig(nbits=bits, group_size=HQQ_GROUP)
        nbits = nweights = 0
        try:
            t = time.perf_counter()
            for layer in layers:
                linear = get_module(model, layer)
                hq = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu", del_orig=False)
                w = hq.dequantize().reshape(linear.weight.shape).float()  # [N, K]
                # what HQQ stores: packed W_q, plus scale and zero per group at 16 bits (its default fp16 meta)
                nbits += 8 * hq.W_q.numel() * hq.W_q.element_size() + 16 * (hq.meta["scale"].numel() + hq.meta["zero"].numel())
                nweights += linear.weight.numel()
                linear.weight.data.copy_(w)
                del hq
            seconds = time.perf_counter() - t
        except Exception as e:  # a peer that cannot run on CPU is recorded, not fatal
            entries.append(Entry("HQQ", name, math.nan, math.nan, note=f"{type(e).__name__}: {e}"))
            print(f"  HQQ {name}: failed: {e}", flush=True)
            continue
        entry = Entry("HQQ", name, nbits / nweights, seconds, note="scored dequantized in torch fp32 (no CPU kernel)")
        scorer.score(model, entry)
        entries.append(entry)
        del model
    return entries


# ---- decode speed --------------------------------------------------------------------------------


def measure_speed(tf: list[tuple[Entry, Path]], ll: list[tuple[Entry, Path]]) -> float:
    """Decode tok/s of every entry, round-robin (runtime/speed.py time_round_robin); returns the read bandwidth GB/s."""
    from tightfit.runtime.speed import measure_bandwidth, random_prompt, time_round_robin

    torch.set_num_threads(SPEED_THREADS)
    bandwidth = measure_bandwidth(SPEED_THREADS)
    n = SPEED_PROMPT + SPEED_NEW
    engines = [(entry, FastBackend(load_packed(folder), max_positions=n, threads=SPEED_THREADS)) for entry, folder in tf]
    engines += [(entry, llamacpp.LlamaCppBackend(path, SPEED_THREADS, n)) for entry, path in ll]
    prompt = random_prompt(engines[0][1].vocab_size, SPEED_PROMPT)
    runs = time_round_robin({i: backend for i, (_, backend) in enumerate(engines)}, prompt, SPEED_NEW, SPEED_REPEATS)
    for i, (entry, _) in enumerate(engines):
        entry.decode_runs.extend(runs[i].decode_tok_s)
        entry.decode_tok_s = statistics.median(entry.decode_runs)
    return bandwidth


def prepare(model: str, n_windows: int, n_held_back: int, calib_text: str = "wiki", texts: tuple[str, ...] = ("wiki",)):
    """The shared start of a run on `model`: the model loaded, the calibration on `calib_text` (with
    `n_held_back` held-back windows) and its cached Hessians, and a Scorer holding the original's
    log-probs on `n_windows` evaluation windows of each of `texts` (the first is the headline's).
    Returns (loaded, CalibrationConfig, EvalConfig, Calibration, Hessians, Scorer)."""
    torch.set_num_threads(SPEED_THREADS)
    CACHE.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    calib_config = CalibrationConfig(text=str(parse_mix(calib_text)))
    eval_config = EvalConfig(text=texts[0], n_windows=n_windows)
    calibration, held_back = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, calib_config, n_held_back)
    hessians = hessians_cached(loaded, calibration)
    windows = eval_windows(loaded.tokenizer, eval_config)
    scorer = Scorer(loaded.model, windows, held_back, text_windows(loaded.tokenizer, eval_config, texts[1:]))
    print(f"reference: {windows.shape[0]} windows, PPL {scorer.reference_ppl:.3f}", flush=True)
    return loaded, calib_config, eval_config, calibration, hessians, scorer


def engine_floors(loaded, src: Path, scorer: Scorer) -> dict[str, dict]:
    """llama.cpp running the F32 GGUF `src` and tightfit's engine running the original's fp32 weights,
    scored against the torch reference: engine name -> {ppl, kl, top1}."""
    floors = {"llama.cpp": Entry("floor", "llama.cpp F32", 32.0, 0.0),
              "tightfit's engine": Entry("floor", "tightfit engine fp32", 32.0, 0.0)}
    fn = llamacpp.LlamaLogits(src, scorer.ctx, SPEED_THREADS)
    scorer.score(fn, floors["llama.cpp"])
    fn.close()
    scorer.score(engine_scorer(original_packed(loaded), scorer, floors["tightfit's engine"]), floors["tightfit's engine"])
    return {k: {"ppl": e.ppl, "kl": e.kl, "top1": e.top1} for k, e in floors.items()}


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

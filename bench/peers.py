"""tightfit against its peers in one run (issue 6): llama.cpp's quantizer (with and without an
importance matrix) and HQQ, on the default model and the same held-out windows.

    .venv/bin/python bench/peers.py [--windows 16] [--tightfit w2g64,...] [--llama Q2_K,...]
                                    [--llama-imatrix Q2_K,...] [--hqq 2,3,4] [--no-speed]

What each peer gets, so that the comparison is fair:
- one reference: the original model (fp32, dequantized from the shipped Q4_1 GGUF). Its log-probs
  on every window are computed once; every entry is scored against them (KL(original || entry),
  top-1 agreement, PPL) on the same windows of the evaluation protocol (tightfit/evaluate.py:
  held-out wiki text, BOS then 511 text tokens per window; default here 16 windows, not 64).
- tightfit: GPTQ from the cached Hessians of the original model (as bench/spqr.py), packed to
  disk and reloaded; scored through the torch model built from the packed file.
- llama.cpp: its own quantizer (llama_model_quantize) from an F32 GGUF of the original written
  by tightfit's exporter, so no second quantization. Token embeddings (= the tied head) are kept
  F16 as tightfit keeps them, so both compare quantized linears only. Logits come from llama.cpp
  itself (Llama(logits_all=True)) over the same token ids, BOS included.
- llama.cpp + imatrix: the importance matrix is the per-input-channel mean of squared activations
  of each linear over the calibration text, i.e. diag(H) / 2 of tightfit's cached Hessians
  (H = 2/T sum x x^T), handed to llama_model_quantize as llama_model_imatrix_data entries.
- HQQ (hqq package, CPU, its default group size 64, float32 compute): weights quantized with
  HQQLinear, then dequantized into a copy of the model for scoring (HQQ has no CPU kernels).

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
import ctypes
import math
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hessians_cached, machine_info, write_results  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig, eval_windows  # noqa: E402
from tightfit.formats.packed import PackedModel, load_packed  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.metrics import kl_per_position, log_probs, next_token_log_probs, nll_per_position, top1_agreement  # noqa: E402
from tightfit.model import DEFAULT_MODEL, get_module, load_model  # noqa: E402
from tightfit.pipeline import linear_layer_shapes  # noqa: E402
from tightfit.runtime import build_model  # noqa: E402
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
HQQ_GROUP = 64  # hqq's BaseQuantizeConfig default
GGUF_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
SPEED_PROMPT, SPEED_NEW, SPEED_REPEATS, SPEED_THREADS = 32, 128, 3, 2


@dataclass
class Entry:
    """One quantized model: its size, cost, scores, and how to time it (None: no CPU engine)."""

    peer: str
    name: str
    bits_per_weight: float
    quantize_seconds: float
    file_mb: float | None = None
    types: dict[str, int] = field(default_factory=dict)  # llama.cpp: GGML type -> number of linear tensors
    ppl: float = math.nan
    kl: float = math.nan
    top1: float = math.nan
    decode_tok_s: float | None = None
    decode_runs: list[float] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# ---- scoring against the cached reference --------------------------------------------------------


class Scorer:
    """Reference log-probs of every window, computed once ([W, T-1, V] fp32, ~100 MB per window)."""

    def __init__(self, reference: torch.nn.Module, windows: torch.Tensor) -> None:
        self.windows = windows  # [W, T] int64
        with torch.no_grad():
            self.logp = [next_token_log_probs(reference, w[None])[0] for w in windows]  # W x [T-1, V]
        self.count = windows.shape[0] * (windows.shape[1] - 1)
        self.reference_ppl = math.exp(sum(nll_per_position(lp, w[1:]).sum().item() for lp, w in zip(self.logp, windows)) / self.count)

    @torch.no_grad()
    def score(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], entry: Entry) -> None:
        """logits_fn(ids [T]) -> logits [T-1, V] of positions 0..T-2; fills entry's PPL, KL, top-1
        with the per-position measures of tightfit/metrics.py, as tightfit/evaluate.py (per scored token)."""
        nll = kl = 0.0
        agree = 0
        for lp, ids in zip(self.logp, self.windows):
            logq = log_probs(logits_fn(ids))  # [T-1, V]
            nll += nll_per_position(logq, ids[1:]).sum().item()
            kl += kl_per_position(lp, logq).sum().item()
            agree += top1_agreement(lp, logq).sum().item()
        entry.ppl, entry.kl, entry.top1 = math.exp(nll / self.count), kl / self.count, agree / self.count
        print(f"  {entry.peer} {entry.name}: {entry.bits_per_weight:.3f} bpw  PPL {entry.ppl:.3f}  KL {entry.kl:.4f}  "
              f"top-1 {entry.top1:.3f}  ({entry.quantize_seconds:.0f} s)", flush=True)


def torch_logits(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: model(input_ids=ids[None], use_cache=False).logits[0, :-1]


# ---- tightfit --------------------------------------------------------------------------------------


def run_tightfit(loaded, calibration, hessians, recipes: list[str], scorer: Scorer, out: Path) -> tuple[list[Entry], dict]:
    entries, folders = [], {}
    for recipe in recipes:
        config = QuantizeConfig(fmt=parse_format(recipe), method="gptq")
        t = time.perf_counter()
        qmodel = quantize_stage.quantize_model(loaded, None, config, hessians=hessians, progress=False)
        seconds = time.perf_counter() - t
        folder = pack_stage.write(pack_stage.pack(qmodel, loaded, calibration.config), loaded.tokenizer, out / f"tightfit-{recipe}")
        del qmodel
        packed = load_packed(folder)
        entry = Entry("tightfit", recipe, 8 * packed.quantized_bytes() / packed.quantized_weights(), seconds,
                      file_mb=(folder / "model.safetensors").stat().st_size / 1e6)
        scorer.score(torch_logits(build_model(packed)), entry)
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
    kept = quantize_stage.kept_tensors(loaded.model, set(), "fp32")
    packed = PackedModel(layers={}, kept=kept, hf_config=loaded.model.config.to_dict(),
                         tied=pack_stage.tied_names(loaded, list(kept)),
                         info={"architecture": loaded.arch.name, "source": {"name": loaded.source.name}})
    tok_dir = out / "tokenizer"
    loaded.tokenizer.save_pretrained(str(tok_dir))
    export_gguf(tok_dir, path, packed=packed)
    return path


def imatrix_entries(loaded, hessians) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per input channel [K] fp32 (= diag(H) / 2)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, loaded.model.config.num_hidden_layers)
    out = {}
    for layer in linear_layer_shapes(loaded):
        target = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        assert target is not None and GGUF_LINEAR.match(target), (layer, target)
        out[target] = np.ascontiguousarray((torch.diagonal(hessians.hessians[layer]) / 2).numpy(), dtype=np.float32)
    return out


def llama_quantize(src: Path, dst: Path, type_name: str, imatrix: dict[str, np.ndarray] | None) -> float:
    """llama.cpp's quantizer, embeddings kept F16; returns seconds. Raises RuntimeError when it refuses."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = 2
    params.allow_requantize = True
    params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    keep = []
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            keep.append(name.encode())
            arr[i].name = keep[-1]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(imatrix)].name = None  # terminator
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")
    return seconds


def gguf_linear_bits(path: Path) -> tuple[float, dict[str, int]]:
    """(bits/weight of the quantized linears, GGML type -> tensor count) from the GGUF tensor table."""
    from gguf import GGUFReader

    nbytes = nweights = 0
    types: Counter = Counter()
    for t in GGUFReader(str(path)).tensors:
        if GGUF_LINEAR.match(t.name):
            nbytes += int(t.n_bytes)
            nweights += int(t.n_elements)
            types[t.tensor_type.name] += 1
    return 8 * nbytes / nweights, dict(types)


class LlamaLogits:
    """llama.cpp logits of every position of one window (logits_all), cache cleared per window."""

    def __init__(self, path: Path, ctx: int, threads: int = SPEED_THREADS) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return torch.from_numpy(np.array(self.llm.scores[: ids.numel() - 1]))  # [T-1, V]

    def close(self) -> None:
        self.llm.close()


def run_llama(src: Path, types: list[str], imatrix, scorer: Scorer, out: Path, label: str) -> tuple[list[Entry], dict]:
    entries, paths = [], {}
    ctx = scorer.windows.shape[1]
    for t in types:
        dst = out / f"{label}-{t}.gguf"
        try:
            seconds = llama_quantize(src, dst, t, imatrix)
        except RuntimeError as e:
            print(f"  {label} {t}: {e}", flush=True)
            entries.append(Entry(label, t, math.nan, math.nan, note=str(e)))
            continue
        bpw, mix = gguf_linear_bits(dst)
        entry = Entry(label, t, bpw, seconds, file_mb=dst.stat().st_size / 1e6, types=mix)
        fn = LlamaLogits(dst, ctx)
        scorer.score(fn, entry)
        fn.close()
        entries.append(entry)
        paths[t] = dst
    return entries, paths


# ---- HQQ -----------------------------------------------------------------------------------------


def run_hqq(loaded, bits_list: list[int], scorer: Scorer) -> list[Entry]:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as e:
        return [Entry("HQQ", f"w{b}g{HQQ_GROUP}", math.nan, math.nan, note=f"hqq not importable: {e}") for b in bits_list]
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
        entry = Entry("HQQ", name, nbits / nweights, seconds, note="scored dequantized (no CPU kernel)")
        scorer.score(torch_logits(model), entry)
        entries.append(entry)
        del model
    return entries


# ---- decode speed --------------------------------------------------------------------------------


def measure_speed(tf: list[tuple[Entry, Path]], ll: list[tuple[Entry, Path]]) -> float:
    """Decode tok/s of every entry, round-robin (runtime/speed.py time_round_robin); returns the read bandwidth GB/s."""
    from speed import LlamaCppBackend

    from tightfit.runtime.engine import FastBackend
    from tightfit.runtime.speed import measure_bandwidth, random_prompt, time_round_robin

    torch.set_num_threads(SPEED_THREADS)
    bandwidth = measure_bandwidth(SPEED_THREADS)
    n = SPEED_PROMPT + SPEED_NEW
    engines = []
    for entry, folder in tf:
        backend = FastBackend(load_packed(folder), max_positions=n, threads=SPEED_THREADS)
        if backend.slow_layers:
            entry.note = (entry.note + "; " if entry.note else "") + f"engine runs {len(backend.slow_layers)} layers dense fp32 (no kernel for the format)"
        engines.append((entry, backend))
    engines += [(entry, LlamaCppBackend(path, SPEED_THREADS, n)) for entry, path in ll]
    prompt = random_prompt(engines[0][1].vocab_size, SPEED_PROMPT)
    runs = time_round_robin({i: backend for i, (_, backend) in enumerate(engines)}, prompt, SPEED_NEW, SPEED_REPEATS)
    for i, (entry, _) in enumerate(engines):
        entry.decode_runs.extend(runs[i].decode_tok_s)
        entry.decode_tok_s = statistics.median(entry.decode_runs)
    return bandwidth


# ---- report --------------------------------------------------------------------------------------

BANDS = ((2.0, 2.75), (2.75, 3.25), (3.25, 3.75), (3.75, 4.25), (4.25, 4.75), (4.75, 5.5), (5.5, 9.0))
PEERS = ("tightfit", "llama.cpp", "llama.cpp+imatrix", "HQQ")


def markdown(payload: dict, entries: list[Entry]) -> str:
    m = payload["machine"]
    ok = [e for e in entries if not math.isnan(e.kl)]
    lines = [
        f"# tightfit vs peers on {payload['model']} (one run)",
        "",
        f"Evaluation: {payload['evaluation']['n_windows']} windows x {payload['evaluation']['ctx']} tokens of held-out wiki text "
        f"(BOS + 511 tokens each, {payload['n_tokens']} scored tokens; the protocol default is 64 windows), identical token ids "
        f"for every engine; KL(original || entry) and top-1 against the original (fp32, PPL {payload['original_ppl']:.3f}). "
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; wall time {payload['wall_s'] / 60:.1f} min.",
        "",
        "- **tightfit**: GPTQ from cached Hessians of the original (64 x 512 calibration tokens), packed and reloaded; "
        "bits/weight from the packed tensors. Quantize s excludes the one-time Hessian collection.",
        f"- **llama.cpp** {payload['llama_cpp_version']}: `llama_model_quantize` from an F32 GGUF of the original written by "
        "tightfit's exporter; token embeddings / tied head kept F16 (as tightfit); logits from llama.cpp itself. "
        "bits/weight = GGUF bytes of the 210 linear tensors / their weights; `types` shows what llama.cpp actually wrote: "
        "widths 576 (not a multiple of 256) make K- and IQ-types fall back per tensor.",
        "- **llama.cpp+imatrix**: the same, with an importance matrix = diag(H)/2 of the same cached Hessians "
        "(mean squared input activation per channel over the calibration text), passed as `params.imatrix`.",
        f"- **HQQ** {payload['hqq_version']}: CPU, group size {HQQ_GROUP} (its default), float32 compute; scored "
        "dequantized; bits/weight = its packed W_q + fp16 scale and zero per group. No CPU kernel, so no decode speed.",
        f"- decode tok/s: {SPEED_THREADS} threads, {SPEED_PROMPT}-token prompt then {SPEED_NEW} greedy tokens, median of "
        f"{SPEED_REPEATS} after a warm-up, all engines round-robin; read bandwidth {payload.get('bandwidth_gb_s') or 0:.1f} GB/s.",
        "",
        "| peer | recipe | bits/weight | PPL | KL | top-1 | quantize s | decode tok/s | types / note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for peer in PEERS:
        for e in sorted((e for e in entries if e.peer == peer), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight)):
            if math.isnan(e.kl):
                lines.append(f"| {peer} | {e.name} | - | - | - | - | - | - | failed: {e.note} |")
                continue
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(e.types.items(), key=lambda kv: -kv[1]))
            note = "; ".join(x for x in (mix, e.note) if x)
            speed = f"{e.decode_tok_s:.0f}" if e.decode_tok_s else "-"
            lines.append(f"| {peer} | {e.name} | {e.bits_per_weight:.3f} | {e.ppl:.3f} | {e.kl:.4f} | {e.top1:.3f} | "
                         f"{e.quantize_seconds:.1f} | {speed} | {note} |")
    floor = payload.get("engine_floor")
    if floor:
        lines += ["", f"Engine floor: llama.cpp running the unquantized F32 GGUF scores KL {floor['kl']:.1e}, top-1 "
                      f"{floor['top1']:.3f}, PPL {floor['ppl']:.3f} against the torch reference: differences below that are noise."]
    lines += ["", "## Best KL per bits/weight band", "",
              "Per band, each peer's lowest-KL entry inside it (bits/weight of the quantized linears). **Bold**: the band's best.", "",
              "| band | " + " | ".join(PEERS) + " |", "|---" * (len(PEERS) + 1) + "|"]
    for lo, hi in BANDS:
        best = {p: min((e for e in ok if e.peer == p and lo <= e.bits_per_weight < hi), key=lambda e: e.kl, default=None) for p in PEERS}
        if not any(best.values()):
            continue
        top = min((e for e in best.values() if e), key=lambda e: e.kl)
        cells = []
        for p in PEERS:
            e = best[p]
            cell = "-" if e is None else f"{e.name} {e.bits_per_weight:.2f} / {e.kl:.4f}"
            cells.append(f"**{cell}**" if e is top else cell)
        lines.append(f"| {lo:.2f}-{hi:.2f} | " + " | ".join(cells) + " |")
    front, best_kl = [], math.inf
    for e in sorted(ok, key=lambda e: (e.bits_per_weight, e.kl)):
        if e.kl < best_kl:
            front.append(e)
            best_kl = e.kl
    lines += ["", "Pareto front (no entry is both smaller and closer to the original): "
              + ", ".join(f"{e.peer} {e.name} ({e.bits_per_weight:.2f}, {e.kl:.4f})" for e in front) + "."]
    lines += ["", "## Where tightfit loses", "", *payload["verdicts"], "",
              "## Caveats", "",
              "- Calibration: tightfit (GPTQ) and llama.cpp+imatrix use the calibration text; llama.cpp without imatrix "
              "and HQQ are data-free.",
              "- The original's weights are a dequantized Q4_1 file (4-bit asymmetric, groups of 32): formats on that grid "
              "(tightfit w4g32, llama.cpp Q4_1) are left out as (near) lossless, and formats close to it (Q4_K, 4-bit "
              "asymmetric g64/g128) are favoured by the source.",
              "- Widths of 576 (all but ffn_down's input) are not a multiple of 256: llama.cpp's K- and IQ-types fall "
              "back per tensor (mostly to IQ4_NL / Q4_0 / Q5_0), so its '2-bit' and '3-bit' types land near 4 bits/weight "
              "here; the `types` column shows the real mix. On models with widths divisible by 256 they would not.",
              "- HQQ stores 3-bit codes ten to an int32 (3.2 bits) plus fp16 scale and zero per 64 weights, hence 3.70 "
              "bits/weight for its w3g64; it optimizes a weight-space error without data, and at 2 and 3 bits on this "
              "model that is far from enough.",
              "- tightfit's SpQR entries decode on the engine's dense fp32 path (no SpQR kernel yet): their tok/s is not "
              "what a kernel would give.",
              "- KL and PPL on few windows move by a few percent between runs of other window sets; small gaps are not "
              "significant.",
              ""]
    return "\n".join(lines)


def verdicts(entries: list[Entry]) -> list[str]:
    """Every peer entry that beats each tightfit entry at no more bits (within 0.05 bpw), in words."""
    ok = [e for e in entries if not math.isnan(e.kl)]
    out = []
    for t in sorted((e for e in ok if e.peer == "tightfit"), key=lambda e: e.bits_per_weight):
        beaten = [e for e in ok if e.peer != "tightfit" and e.bits_per_weight <= t.bits_per_weight + 0.05 and e.kl < t.kl]
        if beaten:
            b = min(beaten, key=lambda e: e.kl)
            out.append(f"- tightfit {t.name} ({t.bits_per_weight:.2f} bpw, KL {t.kl:.4f}) is beaten by {len(beaten)} peer entr"
                       f"{'y' if len(beaten) == 1 else 'ies'} at no more bits; best: {b.peer} {b.name} ({b.bits_per_weight:.2f} bpw, KL {b.kl:.4f}).")
        else:
            out.append(f"- tightfit {t.name} ({t.bits_per_weight:.2f} bpw, KL {t.kl:.4f}): no peer entry at no more bits has lower KL.")
    return out


def plot(entries: list[Entry], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"tightfit": ("tab:blue", "o"), "llama.cpp": ("tab:orange", "s"), "llama.cpp+imatrix": ("tab:red", "D"), "HQQ": ("tab:green", "^")}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for peer, (color, marker) in style.items():
        pts = sorted((e for e in entries if e.peer == peer and not math.isnan(e.kl)), key=lambda e: e.bits_per_weight)
        if not pts:
            continue
        ax.scatter([e.bits_per_weight for e in pts], [e.kl for e in pts], color=color, marker=marker, label=peer, zorder=3)
        for e in pts:
            ax.annotate(e.name, (e.bits_per_weight, e.kl), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("bits/weight of the quantized linear layers (as stored)")
    ax.set_ylabel("KL(original || quantized) per token (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens (protocol default 64; 16 keeps this run near 25 min on 2 cores)")
    ap.add_argument("--tightfit", default=",".join(TIGHTFIT))
    ap.add_argument("--llama", default=",".join(LLAMA))
    ap.add_argument("--llama-imatrix", default=",".join(LLAMA_IMATRIX))
    ap.add_argument("--hqq", default=",".join(map(str, HQQ_BITS)))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--name", default="peers", help="results name in bench/results/ (empty: write nothing)")
    args = ap.parse_args()
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    t0 = time.time()

    import llama_cpp

    torch.set_num_threads(SPEED_THREADS)
    CACHE.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    calib_config, eval_config = CalibrationConfig(), EvalConfig(n_windows=args.windows)
    calibration = calibrate_stage.calibrate(loaded.tokenizer, calib_config)
    hessians = hessians_cached(loaded, calibration)
    windows = eval_windows(loaded.tokenizer, eval_config)
    scorer = Scorer(loaded.model, windows)
    print(f"reference: {windows.shape[0]} windows, PPL {scorer.reference_ppl:.3f}", flush=True)

    entries: list[Entry] = []
    payload: dict = {}
    import tempfile

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        src = f32_gguf(loaded, CACHE)
        floor = Entry("llama.cpp", "F32 (source)", 32.0, 0.0)
        fn = LlamaLogits(src, windows.shape[1])
        scorer.score(fn, floor)
        fn.close()
        payload["engine_floor"] = {"ppl": floor.ppl, "kl": floor.kl, "top1": floor.top1}

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
    payload = {
        "machine": machine_info(), "model": args.model, "source_sha256": loaded.source.sha256(),
        "calibration": config_to_json(calib_config), "evaluation": config_to_json(eval_config),
        "n_tokens": scorer.count, "original_ppl": scorer.reference_ppl,
        "llama_cpp_version": llama_cpp.__version__, "hqq_version": hqq_version,
        "speed": {"threads": SPEED_THREADS, "prompt_tokens": SPEED_PROMPT, "new_tokens": SPEED_NEW, "repeats": SPEED_REPEATS},
        **payload, "entries": [e.to_json() for e in entries], "wall_s": round(time.time() - t0, 1),
    }
    payload["verdicts"] = verdicts(entries)
    md = markdown(payload, entries)
    print(md)
    if args.name:
        paths = write_results(args.name, payload, md)
        png = paths[0].with_suffix(".png")
        plot(entries, png, f"{args.model}: KL vs bits/weight, {eval_config.n_windows} x {eval_config.ctx} held-out tokens")
        print("wrote", *paths, png)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

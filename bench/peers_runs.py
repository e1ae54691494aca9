"""The peers benchmarks' runners (bench/peers.py, formats.py, peers_files.py, calibration.py): the
original's reference log-probs and each entry scored against them (Scorer), tightfit's recipes
quantized and packed from cached Hessians, llama.cpp's presets from an F32 GGUF with or without an
importance matrix, HQQ, and the round-robin decode timing. Each returns Entry rows (peers_report)."""

from __future__ import annotations

import copy
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
from common import hessians_cached, text_windows  # noqa: E402
from peers_report import HQQ_GROUP, SPEED_NEW, SPEED_PROMPT, SPEED_REPEATS, SPEED_THREADS, Entry  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig  # noqa: E402
from tightfit.data import parse_mix  # noqa: E402
from tightfit.evaluate import EvalConfig, backend_scorer, eval_windows, evaluate, reference_log_probs  # noqa: E402
from tightfit.formats.packed import PackedModel, load_packed  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.metrics import nll_per_position  # noqa: E402
from tightfit.model import get_module, load_model  # noqa: E402
from tightfit.pipeline import linear_layer_shapes  # noqa: E402
from tightfit.runtime import build_model  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402
from tightfit.stages import pack as pack_stage  # noqa: E402
from tightfit.stages import quantize as quantize_stage  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "peers"


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

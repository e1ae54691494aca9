"""Shared by the benchmarks: what machine ran them, the lines every quality table prints (protocol,
engines, rival window, the source's own grid), scoring packed models through the engine that runs them,
and writing JSON + Markdown results."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tightfit
from tightfit.evaluate import EvalConfig, EvalResult

RESULTS = Path(__file__).resolve().parent / "results"


# ---- the machine ---------------------------------------------------------------------------------


def l3_cache() -> str:
    """Size of the L3 cache of cpu0 from /sys (e.g. '32 MiB'), 'unknown' where it is not exposed."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()  # e.g. 32768K
        except OSError:
            continue
        if size.endswith("K") and size[:-1].isdigit():
            kib = int(size[:-1])
            return f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"
        return size
    return "unknown"


def machine_info() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {
        "cpu": cpu,
        "l3": l3_cache(),
        "isa": isa,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tightfit": tightfit.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(machine: dict, threads: int | str | None = None) -> str:
    """The line at the top of every table: CPU, L3, threads (default: torch's), cores, ISA, torch, date."""
    return (f"Machine: {machine['cpu']}, L3 {machine.get('l3', 'unknown')}, "
            f"{threads or machine['torch_threads']} threads of {machine['cores']} cores, ISA {', '.join(machine['isa']) or '-'}; "
            f"torch {machine['torch']}, tightfit {machine['tightfit']}; {machine['date']}.")


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


# ---- what every quality table says about how it was measured ------------------------------------


def windows_help() -> str:
    return f"evaluation windows of {EvalConfig.ctx} tokens (default: the protocol's {EvalConfig.n_windows})"


def protocol_line(config: EvalConfig, n_tokens: int, original_ppl: float) -> str:
    """Evaluation windows, scored tokens and the original's PPL; says so when a run is not the protocol."""
    short = "" if config.n_windows == EvalConfig.n_windows else f", fewer than the protocol's {EvalConfig.n_windows}: a shorter run"
    return (f"Evaluation: {config.n_windows} windows x {config.ctx} tokens of held-out {config.text} text "
            f"({n_tokens} scored tokens{short}); KL(original || model) and top-1 against the original "
            f"(fp32, PPL {original_ppl:.3f}).")


ENGINE_COLUMNS = ("KL (engine) scores each tightfit model through tightfit's compiled engine as it runs (int8 "
                  "activations, fp16 KV cache; SpQR layers, which have no kernel yet, run dense with fp32 activations); "
                  "PPL and top-1 are the engine's too. KL (fp32 ref) scores the same packed file dequantized into the "
                  "torch model with fp32 activations.")

# Verdicts compare against rivals of the same size class: every uniform format at least as large as
# the entry and at most this much larger. Without an upper end every budget would lose to the
# largest format; with none in the window there is no verdict.
RIVAL_WINDOW = 0.35  # bits/weight


def rival_window_text() -> str:
    return (f"every uniform format at least as large and at most {RIVAL_WINDOW} bits/weight larger (the best of them "
            "by evaluation KL, so a win beats them all; all are in the table above)")


def rivals(rows: list[dict], bits_per_weight: float) -> list[dict]:
    """The rows within the rival window above bits_per_weight (rows carry 'bits_per_weight')."""
    return [r for r in rows if bits_per_weight <= r["bits_per_weight"] <= bits_per_weight + RIVAL_WINDOW]


def verdict_cell(wins: bool | None) -> str:
    """'yes', 'no', or 'n/a' where there is no verdict (no rival, or no evidence)."""
    return "n/a" if wins is None else ("yes" if wins else "no")


# ---- the source's own grid ------------------------------------------------------------------------
# A GGUF source that was quantized before we see it (the default model is a Q4_1 file) is dequantized
# to fp32, but its weights still lie on that file's grid: a format that can hold the grid re-quantizes
# them (near) losslessly, so its quality there is no evidence. Which grid it is comes from the file's
# own tensor types (the ones QuantizedSourceWarning names), never from a table of models.


@dataclass(frozen=True)
class SourceGrid:
    """A uniform code grid the source's weights already lie on.

    ggml_type: llama.cpp's type of those tensors ("Q4_1"); bits: code width; group_size: weights per
    scale (a K-type's sub-block); asymmetric: a min (offset) per group besides the scale; tensors:
    how many of the file's linear layers (decoder-block matrices) are of this type.
    """

    ggml_type: str
    bits: int
    group_size: int
    asymmetric: bool
    tensors: int

    def describe(self) -> str:
        kind = "asymmetric" if self.asymmetric else "symmetric"
        return (f"{self.ggml_type} ({self.bits}-bit {kind}, groups of {self.group_size}; {self.tensors} "
                f"linear layer{'' if self.tensors == 1 else 's'})")


# The uniform GGML types (ggml-common.h block layouts): (bits, weights per scale, a min per group).
# The IQ types are lattices and codebooks: no uniform format holds them, so they are not grids here.
GGML_GRIDS: dict[str, tuple[int, int, bool]] = {
    "Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q5_0": (5, 32, False), "Q5_1": (5, 32, True), "Q8_0": (8, 32, False),
    "Q2_K": (2, 16, True), "Q3_K": (3, 16, False), "Q4_K": (4, 32, True), "Q5_K": (5, 32, True), "Q6_K": (6, 16, False),
}


def source_grids(source) -> tuple[SourceGrid, ...]:
    """The uniform grids of a GGUF source's quantized decoder-block matrices (the linear layers the
    benches quantize; the embeddings and head are left out), most tensors first; () for a float
    source (fp16/bf16/fp32, or a safetensors folder). Reads the file's header only."""
    from collections import Counter

    from tightfit.model.checkpoint_files import read_gguf_header
    from tightfit.model.sources import GGUF

    if source.kind != GGUF:
        return ()
    counts = Counter(t.ggml_type.name for t in read_gguf_header(source.path).tensors
                     if t.name.startswith("blk.") and len(t.shape) == 2)
    return tuple(SourceGrid(t, *GGML_GRIDS[t], n) for t, n in counts.most_common() if t in GGML_GRIDS)


def grids_json(grids) -> list[dict]:
    return [dataclasses.asdict(g) for g in grids]


def grids_from_json(items: list[dict]) -> tuple[SourceGrid, ...]:
    return tuple(SourceGrid(**g) for g in items)


def recorded_grids(payload: dict) -> list[dict]:
    """A results payload's `source_grids`; for one written before runs recorded them, its model's,
    read from the model's file header now (a report-only rerender)."""
    if "source_grids" in payload:
        return payload["source_grids"]
    from tightfit.model import resolve_source

    return grids_json(source_grids(resolve_source(payload["model"])))


def code_grid(name: str) -> tuple[int, int, bool] | None:
    """(bits, group size, asymmetric) of the codes of format `name`: a uniform format, an SpQR
    recipe's dense part, or a uniform GGML type ("Q4_K"). None for what has no uniform grouped grid:
    a per-channel format, a fixed or learned non-uniform table (nl4g32, lut4g32), an IQ type, a plan's
    file name."""
    from tightfit.errors import FormatError
    from tightfit.formats.registry import parse_format
    from tightfit.formats.spqr import SpQRFormat
    from tightfit.formats.table import QuantFormat

    if name in GGML_GRIDS:
        return GGML_GRIDS[name]
    try:
        fmt = parse_format(name)
    except FormatError:
        return None
    if not isinstance(fmt, (QuantFormat, SpQRFormat)) or fmt.group_size is None:  # the uniform code grids only
        return None
    return fmt.bits, fmt.group_size, not fmt.symmetric


def is_format(name: str) -> bool:
    """Whether `name` is one format of ours (not a plan's file, not a peer's recipe)."""
    from tightfit.errors import FormatError
    from tightfit.formats.registry import parse_format

    try:
        parse_format(name)
    except FormatError:
        return False
    return True


def holds(code: tuple[int, int, bool], grid: SourceGrid) -> bool:
    """Whether codes (bits, group size, asymmetric) can hold `grid` up to the rounding of their
    statistics: the same bits, groups that divide the grid's (each source group is whole groups of
    ours), and a zero point wherever the grid has a min (a zero point also holds a symmetric grid)."""
    bits, group, asymmetric = code
    return bits == grid.bits and grid.group_size % group == 0 and (asymmetric or not grid.asymmetric)


def favoured(code: tuple[int, int, bool], grid: SourceGrid) -> bool:
    """Codes on the same grid with coarser groups (a multiple of the grid's): not held, but close."""
    bits, group, asymmetric = code
    return (bits == grid.bits and group > grid.group_size and group % grid.group_size == 0
            and (asymmetric or not grid.asymmetric))


def held_grids(name: str, grids) -> list[SourceGrid]:
    """The source grids format `name` (or GGML type) can hold."""
    code = code_grid(name)
    return [] if code is None else [g for g in grids if holds(code, g)]


def on_source_grid(name: str, grids) -> bool:
    """Whether format `name` can hold one of the source's own grids, so re-quantizing to it is (near)
    lossless and proves nothing."""
    return bool(held_grids(name, grids))


def source_line(grids) -> str:
    """What the source's weights already are; '' for a float source."""
    if not grids:
        return ""
    return ("The source is a dequantized GGUF file whose linear layers already lie on a grid: "
            + ", ".join(g.describe() for g in grids) + ".")


def source_grid_caveat(names, grids) -> str:
    """What the source's grid means for the formats `names`: which of them can hold it (no evidence,
    verdicts n/a) and which are favoured by it ('' for a float source)."""
    if not grids:
        return ""
    names = list(dict.fromkeys(names))
    on = [n for n in names if on_source_grid(n, grids)]
    near = [n for n in names if n not in on and (c := code_grid(n)) is not None and any(favoured(c, g) for g in grids)]
    if on:
        held = sorted({g.ggml_type for n in on for g in held_grids(n, grids)})
        text = (f"{', '.join(on)} can hold it ({', '.join(held)}: the same bits, groups that divide the source's, and a "
                "zero point where the source has a min; an SpQR recipe differs from it only in its quantized statistics), "
                "so their quality here is (near) lossless re-quantization, not evidence; verdicts on them are n/a.")
    else:
        text = "None of the formats here can hold it."
    if near:
        text += f" {', '.join(near)} {'is' if len(near) == 1 else 'are'} on its grid with coarser groups, so favoured by it."
    return f"{source_line(grids)} {text}"


# ---- quantize, pack, reload, score ---------------------------------------------------------------

SELECT_WINDOWS = 8  # held-back calibration windows a bench chooses recipes on (never the evaluation text)


@dataclass(frozen=True)
class Scores:
    """One packed model against the original: through the engine that runs it (the headline), as
    the dequantized fp32 torch model, on held-back calibration windows (what choices use), and
    through the engine on the other evaluation texts (domain -> result; `texts`)."""

    engine: EvalResult
    fp32: EvalResult
    held_back: EvalResult | None
    domains: dict[str, EvalResult] = field(default_factory=dict)


def hessians_cached(loaded, calibration):
    """Original-model Hessians for this model and calibration, from .cache/ or collected now."""
    from tightfit.stages import calibrate as calibrate_stage

    cache = Path(__file__).resolve().parents[1] / ".cache" / f"hessians-{loaded.source.sha256()[:16]}.safetensors"
    hessians = calibrate_stage.load_hessians(cache, loaded, calibration.config)
    if hessians is None:
        hessians = calibrate_stage.collect_hessians(loaded, calibration)
        calibrate_stage.save_hessians(hessians, cache)
    return hessians


def quantize_and_pack(loaded, key: str, config, calibration, folder: Path, *, hessians=None, ctx: int = EvalConfig.ctx):
    """Quantize one config, pack it into folder/key, reload the packed model from disk and open it
    in tightfit's engine (a KV cache of ctx tokens). GPTQ takes `hessians` (original model) when
    given, else sequential Hessians from `calibration`; the manifest records calibration.config.
    Returns (row with sizes, seconds and the engine's dense layers, the engine as a Scorer, the
    PackedModel: `runtime.build_model` makes it the dequantized fp32 torch model)."""
    import time

    from tightfit.evaluate import backend_scorer
    from tightfit.formats.packed import load_packed
    from tightfit.runtime.engine import FastBackend
    from tightfit.stages import pack as pack_stage
    from tightfit.stages import quantize as quantize_stage

    t = time.perf_counter()
    use_calibration = config.method == "gptq" and hessians is None
    qmodel = quantize_stage.quantize_model(loaded, calibration if use_calibration else None, config,
                                           hessians=hessians if config.method == "gptq" else None)
    seconds = time.perf_counter() - t
    out = pack_stage.write(pack_stage.pack(qmodel, loaded, calibration.config), loaded.tokenizer,
                           Path(folder) / key.replace(" ", "_"))
    del qmodel
    packed = load_packed(out)
    backend = FastBackend(packed, max_positions=ctx)
    file_bytes = (out / "model.safetensors").stat().st_size
    row = {
        "quantize_seconds": round(seconds, 1),
        "bits_per_weight": 8 * packed.quantized_bytes() / packed.quantized_weights(),
        "file_bytes": file_bytes,
        "model_bits_per_weight": 8 * file_bytes / packed.total_weights(),
        "engine_dense_layers": len(backend.slow_layers),
        "layers": {name: q for name, q in packed.layers.items()},
    }
    print(f"{key}: quantized in {seconds:.0f}s, {row['bits_per_weight']:.3f} bits/weight", flush=True)
    return row, backend_scorer(backend), packed


def quantize_and_evaluate(loaded, configs: dict, calibration, eval_config: EvalConfig, *, hessians=None,
                          held_back: torch.Tensor | None = None, texts: tuple[str, ...] = ()) -> tuple[dict, dict[str, Scores]]:
    """Quantize every config (key -> QuantizeConfig), pack it to a temporary folder, reload the
    packed model from disk, then score all of them against the original: through tightfit's
    engine and as the fp32 torch model on the evaluation windows, through the engine on
    `held_back` calibration windows [n, T] when given (calibrate_with_held_back), and through the
    engine on the evaluation windows of every other text of `texts` (Scores.domains).

    GPTQ takes `hessians` (original model) when given, else sequential Hessians from `calibration`.
    Returns ({key: row with sizes, seconds and the engine's dense layers}, {key: Scores}).
    """
    import tempfile

    from tightfit.evaluate import eval_windows, evaluate_many
    from tightfit.runtime import build_model

    rows, engines, fp32 = {}, {}, {}
    ctx = max(eval_config.ctx, 0 if held_back is None else held_back.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        for key, config in configs.items():
            rows[key], engines[key], packed = quantize_and_pack(loaded, key, config, calibration, Path(tmp),
                                                                hessians=hessians, ctx=ctx)
            fp32[key] = build_model(packed)
        windows = eval_windows(loaded.tokenizer, eval_config)
        by_engine = evaluate_many(engines, windows, reference=loaded.model, batch_size=eval_config.batch_size)
        by_fp32 = evaluate_many(fp32, windows, reference=loaded.model, batch_size=eval_config.batch_size)
        by_held_back = {} if held_back is None else evaluate_many(engines, held_back, reference=loaded.model,
                                                                  batch_size=eval_config.batch_size)
        others = [t for t in texts if t != eval_config.text]
        by_text = score_texts(engines, loaded, text_windows(loaded.tokenizer, eval_config, others), eval_config.batch_size)
    return rows, {key: Scores(by_engine[key], by_fp32[key], by_held_back.get(key), by_text.get(key, {})) for key in configs}


def score_columns(row: dict) -> str:
    """Markdown cells 'PPL | KL (engine) | KL (fp32 ref) | top-1' of a results row (score_json keys)."""
    return f"{row['ppl']:.3f} | {row['kl']:.4f} | {row['kl_fp32']:.4f} | {row['top1']:.3f}"


def score_json(s: Scores) -> dict:
    """A row's scores in the results JSON: the engine's are the headline (ppl, kl, top1); kl_TEXT
    for every other text scored (`texts`)."""
    return {"ppl": s.engine.ppl, "kl": s.engine.kl, "top1": s.engine.top1, "kl_fp32": s.fp32.kl,
            "ppl_fp32": s.fp32.ppl, "top1_fp32": s.fp32.top1, "kl_held_back": s.held_back and s.held_back.kl,
            **{f"kl_{text}": r.kl for text, r in s.domains.items()}}


# ---- a second domain: KL on wiki and on code ------------------------------------------------------

EVAL_TEXTS = ("wiki", "code")  # Wikipedia intros (calibration's own domain) and Python source (another one)


def text_windows(tokenizer, eval_config: EvalConfig, texts) -> dict[str, torch.Tensor]:
    """The evaluation windows [W, T] of each text, with eval_config's count and length."""
    from tightfit.evaluate import eval_windows

    return {text: eval_windows(tokenizer, dataclasses.replace(eval_config, text=text)) for text in texts}


def score_texts(candidates: dict, loaded, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, dict[str, EvalResult]]:
    """Every candidate (key -> module or evaluate.Scorer) against the original on each text's
    windows -> {key: {text: EvalResult}}; the original runs once per batch of each text."""
    from tightfit.evaluate import evaluate_many

    out: dict[str, dict[str, EvalResult]] = {key: {} for key in candidates}
    for text, w in windows.items():
        for key, result in evaluate_many(candidates, w, reference=loaded.model, batch_size=batch_size).items():
            out[key][text] = result
    return out


def ood_penalty(kl_by_text: dict[str, float], base: str = EVAL_TEXTS[0]) -> dict[str, float]:
    """The out-of-domain penalty of each other text: KL on it / KL on `base` (calibration's domain)."""
    return {text: kl / kl_by_text[base] for text, kl in kl_by_text.items() if text != base}


def texts_line(texts) -> str:
    """What each evaluation text is: its origin and fingerprint (data.TextCorpus.record)."""
    from tightfit.data import load_text

    parts = []
    for text in texts:
        r = load_text(text).record()
        parts.append(f"{text} = {r['origin'] or text}, sha256 {r['sha256'][:16]}")
    return "Texts: " + "; ".join(parts) + "."

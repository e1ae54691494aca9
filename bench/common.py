"""Shared by the benchmarks: what machine ran them, the lines every quality table prints (protocol,
engines, rival window), scoring packed models through the engine that runs them,
and writing JSON + Markdown results."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from collections.abc import Callable
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


def rewrite_results(name: str, notes: list[str], markdown: Callable[[dict], str], script: str,
                    replace: dict | None = None) -> tuple[Path, Path]:
    """A script's --report-only: bench/results/NAME.md rendered again from NAME.json by `markdown`,
    measuring nothing; the notes given (caveats) replace the stored ones, none given keeps them;
    `replace`: payload fields read again from other results files (e.g. a section of other runs)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{script}: --report-only: no results file {path}")
    payload = json.loads(path.read_text())
    if notes:
        payload["notes"] = notes
    payload.update(replace or {})
    return write_results(name, payload, markdown(payload))


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
                  "activations, fp16 KV cache; SpQR's sparse outliers with fp32 activations; a layer whose format has no "
                  "kernel runs dense in fp32, and the table says where); "
                  "PPL and top-1 are the engine's too. KL (fp32 ref) scores the same packed file dequantized into the "
                  "torch model with fp32 activations.")

def dense_line(rows: list[dict], name: str = "format") -> str:
    """The caveat on rows the engine ran partly dense in fp32 (rows carry 'engine_dense_layers'), or ''."""
    dense = [f"{r[name]} ({r['engine_dense_layers']})" for r in rows if r.get("engine_dense_layers")]
    return f"Layers the engine ran dense in fp32 (no kernel for their format): {', '.join(dense)}." if dense else ""


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


def calibration_key(config) -> str:
    """A short fingerprint of a CalibrationConfig, naming the cache files and folders made from it."""
    import hashlib

    from tightfit.artifacts import config_to_json

    return hashlib.sha256(json.dumps(config_to_json(config), sort_keys=True).encode()).hexdigest()[:12]


def add_text_arguments(ap) -> None:
    """--calib-text (default: the command line's) and --texts (default: EVAL_TEXTS), as the quality benches take them."""
    from tightfit.cli.common import DEFAULT_CALIB_TEXT

    ap.add_argument("--calib-text", default=DEFAULT_CALIB_TEXT, help="calibration text, as `tightfit compress --calib-text`")
    ap.add_argument("--texts", default=",".join(EVAL_TEXTS), help="evaluation texts; the first is the headline's")


def text_choices(args):
    """What add_text_arguments' flags ask for: (CalibrationConfig of --calib-text, the --texts)."""
    from tightfit.artifacts import CalibrationConfig
    from tightfit.data import parse_mix

    return CalibrationConfig(text=str(parse_mix(args.calib_text))), tuple(t for t in args.texts.split(",") if t)


def hessians_cached(loaded, calibration):
    """Original-model Hessians for this model and calibration, from .cache/ (a file per model and
    calibration config) or collected now."""
    from tightfit.stages import calibrate as calibrate_stage

    cache = (Path(__file__).resolve().parents[1] / ".cache"
             / f"hessians-{loaded.source.sha256()[:16]}-{calibration_key(calibration.config)}.safetensors")
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
        both = evaluate_many({**{("engine", k): m for k, m in engines.items()}, **{("fp32", k): m for k, m in fp32.items()}},
                             windows, reference=loaded.model, batch_size=eval_config.batch_size)  # the original once per batch
        by_engine, by_fp32 = ({k: r for (kind, k), r in both.items() if kind == wanted} for wanted in ("engine", "fp32"))
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


def other_texts(payload: dict, ev: EvalConfig) -> list[str]:
    """The evaluation texts of a results payload besides the headline's (`texts`; none in older runs)."""
    return [t for t in payload.get("texts", [ev.text]) if t != ev.text]


def other_texts_lines(payload: dict, ev: EvalConfig, engines: str = "the engine", extra: str = "") -> list[str]:
    """The caption of a table's KL columns on other texts (none when there are none): the engines,
    the windows, `extra` and what each text is (payload's texts_line)."""
    others = other_texts(payload, ev)
    if not others:
        return []
    return [f"KL {', '.join(others)}: through {engines} on {ev.n_windows} held-out windows of that text (another domain)."
            f"{' ' + extra if extra else ''} {payload['texts_line']}"]


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

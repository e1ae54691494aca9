"""Decode and prefill speed, side by side in one run (issue 5; the 1.5B model: issue 11).

tightfit's compiled engine at several formats vs llama.cpp (llama-cpp-python) at its nearest
GGML types (vs transformers fp32 on the default model), same prompt length, same threads (1 and 2),
medians of repeats, with the read bandwidth probed right before every timed run and each engine's
decode roofline fraction taken run by run against its own moment's bandwidth (the median of those).

Speed does not depend on weight values, so tightfit models are quantized with RTN (fast); every
tightfit model quantizes the embedding/head too (--embed-format), as llama.cpp does. llama.cpp
files are made with llama.cpp's own quantizer from the shipped GGUF (Q4_1 for smollm2-135m, Q4_K_M
for qwen2.5-coder-1.5b, itself one of the entries); types that want an importance matrix get a flat
one (all ones): it changes values, not speed.

    .venv/bin/python bench/speed.py [--model smollm2-135m] [--threads 1,2] [--repeats 5] [--quick] [--name speed_avx2]
                                    [--formats w3g32,lut3g32,lut3g32-row --name speed_tables]
Run it alone: any other process on this 2-core machine halves the figures. Results:
bench/results/speed.{json,md} (default model), speed_<model>.{json,md} (another).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from common import machine_info, machine_line, rewrite_results, write_results  # noqa: E402

from tightfit.errors import TightfitError  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.model import BUILTIN_MODELS  # noqa: E402
from tightfit.model.load import load_model, resolve_source  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.speed import BandwidthProbe, random_prompt, report, time_round_robin  # noqa: E402
from tightfit.runtime.torch_backend import TorchBackend  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "speed"


@dataclass(frozen=True)
class SpeedSetup:
    """What one model is timed in: tightfit files (label -> body format and embedding/head format; a
    body format may appear with several heads), llama.cpp types made from the shipped file (which is
    timed too), the ratios to print (by label), transformers or not."""

    tightfit: dict[str, tuple[str, str]]
    llama_types: tuple[str, ...]
    shipped_type: str
    pairs: tuple[tuple[str, str], ...]
    transformers: bool


def with_head(head: str, *formats: str) -> dict[str, tuple[str, str]]:
    """Body formats sharing one head format, each labelled by its body format alone."""
    return {fmt: (fmt, head) for fmt in formats}


SETUPS = {
    "smollm2-135m": SpeedSetup(
        tightfit=with_head("w8g32-sym", "w8g32-sym", "w4g32-sym", "nl4g32", "lut4g32", "lut4g32-row", "w4g128", "w3g64",
                           "spqr-w3g32-s3-o0.5", "w2g64"),
        llama_types=("Q8_0", "Q4_0", "Q3_K_S", "Q2_K"), shipped_type="Q4_1",
        pairs=(("w8g32-sym", "Q8_0"), ("w4g32-sym", "Q4_0"), ("w4g128", "Q4_1"), ("w3g64", "Q3_K_S"), ("w2g64", "Q2_K")),
        transformers=True),
    # the head is read at every token: 6-bit like llama.cpp's Q6_K output tensor of these types; w2g64 also
    # with a 4-bit head, which brings it under Q2_K's 753 MB (764 MB with the 6-bit head)
    "qwen2.5-coder-1.5b": SpeedSetup(
        tightfit={**with_head("w6g32", "w4g32-sym", "w4g128", "nl4g32", "w3g64", "w3g128", "w2g64"),
                  "w2g64+w4g32-sym": ("w2g64", "w4g32-sym")},
        llama_types=("Q4_0", "Q3_K_M", "IQ4_XS", "IQ3_XXS", "Q2_K"), shipped_type="Q4_K_M",
        pairs=(), transformers=False),
}
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


def tightfit_models(model: str, setup: SpeedSetup) -> dict[str, Path]:
    """label -> packed RTN models (no clipping search: speed does not depend on values), built once into .cache/."""
    from tightfit.artifacts import QuantizeConfig
    from tightfit.formats.registry import parse_format
    from tightfit.pipeline import CompressRequest, compress

    out, loaded = {}, None
    for label, (fmt, embed) in setup.tightfit.items():
        folder = CACHE / model / f"tightfit-{fmt}-e{embed}"  # named by both formats: built ones stay valid
        if not (folder / "manifest.json").exists():
            loaded = loaded or load_model(model)
            config = QuantizeConfig(fmt=parse_format(fmt), method="rtn", clip_search=False, embed_format=parse_format(embed))
            compress(CompressRequest(model=model, out=folder, quantize=config, evaluation=None), loaded)
        out[label] = folder
    return out


def llama_models(model: str, setup: SpeedSetup) -> dict[str, Path]:
    """llama.cpp's own files from the shipped GGUF (its default embedding types), built once into .cache/."""
    shipped = resolve_source(model).path
    out = {setup.shipped_type: shipped}
    for t in setup.llama_types:
        dst = CACHE / model / f"llama-{t}.gguf"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            llamacpp.quantize(shipped, tmp, t, imatrix=flat_imatrix(shipped) if t in NEEDS_IMATRIX else None)
            tmp.rename(dst)
        out[t] = dst
    return out


def flat_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An importance matrix of ones for every 2-D tensor of a GGUF file (input width K): what
    llama.cpp's IQ types insist on, with no effect on their speed."""
    from gguf import GGUFReader

    return {t.name: np.ones(int(t.shape[0]), dtype=np.float32) for t in GGUFReader(str(path)).tensors if len(t.shape) == 2}


def with_formats(setup: SpeedSetup, formats: list[str]) -> SpeedSetup:
    """`setup` timing `formats` (with the head of its first tightfit file) instead of its own tightfit
    files; the ratios kept are those whose tightfit side is still timed."""
    from tightfit.formats.registry import parse_format

    for f in formats:
        parse_format(f)  # a bad name fails here, before anything is built
    head = next(iter(setup.tightfit.values()))[1]
    return dataclasses.replace(setup, tightfit=with_head(head, *formats), pairs=tuple(p for p in setup.pairs if p[0] in formats))


def run(model: str, threads_list: list[int], repeats: int, prompt: int, new: int, quick: bool,
        formats: list[str] | None = None) -> dict:
    """Per thread count: open every engine, then time them round-robin (one run each per round), so
    that drifts of this shared machine hit every engine alike; medians over the rounds. `formats`:
    tightfit's files in these formats instead of the setup's (with_formats)."""
    rows = []
    setup = with_formats(SETUPS[model], formats) if formats else SETUPS[model]
    tf_models = tightfit_models(model, setup)
    ll_models = llama_models(model, setup)
    if quick:
        tf_models = {k: v for k, v in tf_models.items() if k in ("w4g32-sym", "w2g64")}
        ll_models = {k: v for k, v in ll_models.items() if k in ("Q4_0", "Q2_K")}
    for threads in threads_list:
        torch.set_num_threads(threads)
        probe = BandwidthProbe(threads)
        print(f"[{threads} threads] read bandwidth now {probe():.1f} GB/s (probed again before every timed run)", flush=True)
        engines = []  # (engine, model, size MB, backend, weight bytes)
        for fmt, folder in tf_models.items():
            b = FastBackend(load_packed(folder), max_positions=prompt + new, threads=threads)
            engines.append(("tightfit", fmt, folder_mb(folder), b, b.weight_bytes))
        for t, path in ll_models.items():
            engines.append(("llama.cpp", t, path.stat().st_size / 1e6, llamacpp.LlamaCppBackend(path, threads, prompt + new),
                            llamacpp.gguf_bytes_per_token(path)))
        if setup.transformers and not quick:
            loaded = load_model(model)
            wb = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            engines.append(("transformers", "fp32", wb / 1e6, TorchBackend(loaded.model, max_positions=prompt + new), wb))
        tokens = random_prompt(engines[0][3].vocab_size, prompt)
        slowest = {i: max(2, repeats // 2) for i, e in enumerate(engines) if e[0] == "transformers"}  # fewer rounds
        runs = time_round_robin({i: e[3] for i, e in enumerate(engines)}, tokens, new, repeats, max_rounds=slowest,
                                on_round=lambda rnd: print(f"  round {rnd} done", flush=True), probe=probe)
        for i, (engine, name, size, _, wb) in enumerate(engines):
            r = report(threads=threads, prompt_tokens=prompt, new_tokens=new, prefill=runs[i].prefill_tok_s,
                       decode=runs[i].decode_tok_s, weight_bytes=wb, bandwidth_runs=runs[i].bandwidth_gb_s)
            rows.append(dict(engine=engine, model=name, size_mb=size, **r.to_json()))
            show(rows[-1])
        del engines, probe
    return {"machine": machine_info(), "model": model, "prompt_tokens": prompt, "new_tokens": new, "repeats": repeats,
            "rows": rows, "pairs": [list(p) for p in setup.pairs]}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def show(row: dict) -> None:
    print(f"  {row['engine']:12s} {row['model']:10s} {row['size_mb']:7.1f} MB  prefill {row['prefill_tok_s']:7.1f} tok/s  "
          f"decode {row['decode_tok_s']:6.1f} tok/s  roofline {100 * row['roofline_fraction']:4.0f} %", flush=True)


def markdown(result: dict) -> str:
    m = result["machine"]
    model = result.get("model", "smollm2-135m")
    lines = [
        f"# Decode and prefill speed on {model}: tightfit vs llama.cpp" + (" vs transformers" if SETUPS[model].transformers
                                                                          else "") + " (one run)",
        "",
        machine_line(m, threads=" and ".join(str(t) for t in sorted({r["threads"] for r in result["rows"]}))),
        "",
        f"Prompt {result['prompt_tokens']} random tokens, then {result['new_tokens']} greedy tokens; medians of "
        f"{result['repeats']} rounds after a warm-up round; in each round every engine runs once (round-robin), so "
        "drifts of the shared machine hit all alike. Roofline = read bandwidth / weight bytes per token (the KV cache "
        "is not counted); the read bandwidth (tightfit's streaming-read kernel, the best of 2 passes over 1 GB) is "
        "probed right before every timed run, since it drifts by tens of percent within seconds here, and `of "
        "roofline` is the median over the runs of each run's decode against its own probe; `roofline tok/s` uses "
        "the median probe." + (" transformers fp32 runs fewer rounds." if SETUPS[model].transformers
                                                             else ""),
        "",
    ]
    for threads in sorted({r["threads"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["threads"] == threads]
        probes = [b for r in rows for b in r.get("bandwidth_runs", ())] or [rows[0]["bandwidth_gb_s"]]
        lines += [f"## {threads} thread(s), read bandwidth {statistics.median(probes):.1f} GB/s "
                  f"(median of {len(probes)} probes, {min(probes):.1f}-{max(probes):.1f})", "",
                  "| engine | model | file MB | weights MB/token | prefill tok/s | decode tok/s | roofline tok/s | of roofline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['engine']} | {r['model']} | {r['size_mb']:.1f} | {r['weight_bytes'] / 1e6:.1f} | "
                         f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['roofline_tok_s']:.0f} | "
                         f"{100 * r['roofline_fraction']:.0f} % |")
        by = {(r["engine"], r["model"]): r for r in rows}
        ratio_lines = []
        for tf, ll in result.get("pairs", SETUPS[model].pairs):
            a, b = by.get(("tightfit", tf)), by.get(("llama.cpp", ll))
            if a and b:
                ratio_lines.append(f"| {tf} vs {ll} | {a['decode_tok_s'] / b['decode_tok_s']:.2f}x | "
                                   f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x |")
        if ratio_lines:
            lines += ["", "| tightfit vs llama.cpp | decode ratio | prefill ratio |", "|---|---|---|", *ratio_lines]
        lines += ["", *no_larger_lines(rows)]
        equal_bytes = equal_bytes_lines(rows)
        lines += ["", *equal_bytes] if equal_bytes else []
        lines.append("")
    caveat = next((b.grid_caveat for b in BUILTIN_MODELS if b.name == model), "")
    if caveat:
        lines.append(f"Speed does not depend on weight values; still: {caveat}.")
    return "\n".join(lines) + "\n"


UNIFORM = re.compile(r"w\d+g\d+(-sym)?$")  # a plain uniform grid: codes, fp16 scales, u8 zeros


def equal_bytes_lines(rows: list[dict]) -> list[str]:
    """Every other tightfit format (grids, learned tables, SpQR, -dq) beside the plain uniform format of
    this run nearest to it in weight bytes read per token: the decode ratio (of the medians), the median of
    the rounds' ratios (each round times both, a minute apart at most: the machine's slower drifts cancel),
    and the ratio of their roofline fractions (which takes out the few percent of bytes between them);
    none without both kinds."""
    ours = [r for r in rows if r["engine"] == "tightfit"]
    uniform = [r for r in ours if UNIFORM.match(r["model"])]
    others = [r for r in ours if not UNIFORM.match(r["model"])]
    if not uniform or not others:
        return []
    lines = ["| format | weights MB/token | decode tok/s | uniform of nearest bytes | its MB/token | its decode tok/s | "
             "decode ratio | per-round ratio, median (range) | roofline-fraction ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in others:
        u = min(uniform, key=lambda u: abs(u["weight_bytes"] - r["weight_bytes"]))
        paired = [a / b for a, b in zip(r.get("decode_runs", []), u.get("decode_runs", []))]
        per_round = f"{statistics.median(paired):.0%} ({min(paired):.0%}-{max(paired):.0%})" if paired else "-"
        lines.append(f"| {r['model']} | {r['weight_bytes'] / 1e6:.1f} | {r['decode_tok_s']:.1f} | {u['model']} | "
                     f"{u['weight_bytes'] / 1e6:.1f} | {u['decode_tok_s']:.1f} | {r['decode_tok_s'] / u['decode_tok_s']:.0%} | "
                     f"{per_round} | {r['roofline_fraction'] / u['roofline_fraction']:.0%} |")
    return lines + ["", "Weights MB/token are what the engine reads: `-dq` files keep 6-bit scale codes but are expanded to "
                        "fp16 scales at load, so they read and run as their base format (their file is smaller, not their "
                        "decode); SpQR's include its statistics records and outlier tables. One run: the two ratio columns "
                        "of one format differ by the run-to-run drift of this machine; the per-round one is the least "
                        "affected by it."]


def no_larger_lines(rows: list[dict]) -> list[str]:
    """Per llama.cpp file: the tightfit model closest to it in size without being larger (the
    comparison the size budget allows), and the decode ratio."""
    ours = [r for r in rows if r["engine"] == "tightfit"]
    lines = ["| llama.cpp file | its MB | decode tok/s | closest tightfit file no larger | its MB | decode tok/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in [r for r in rows if r["engine"] == "llama.cpp"]:
        fits = [o for o in ours if o["size_mb"] <= r["size_mb"]]
        if not fits:
            lines.append(f"| {r['model']} | {r['size_mb']:.0f} | {r['decode_tok_s']:.1f} | none that small | - | - | - |")
            continue
        best = max(fits, key=lambda o: o["size_mb"])
        lines.append(f"| {r['model']} | {r['size_mb']:.0f} | {r['decode_tok_s']:.1f} | {best['model']} | "
                     f"{best['size_mb']:.0f} | {best['decode_tok_s']:.1f} | {best['decode_tok_s'] / r['decode_tok_s']:.2f}x |")
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SETUPS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--formats", help="comma-separated tightfit formats timed instead of the setup's (e.g. the learned "
                                      "tables beside uniform formats of equal bytes: w3g32,lut3g32,lut3g32-row)")
    ap.add_argument("--quick", action="store_true", help="two formats per engine, no transformers, no results written")
    ap.add_argument("--report-only", action="store_true", help="write NAME.md again from NAME.json, measuring nothing")
    ap.add_argument("--name", help="results name in bench/results/ (default: speed, or speed_<model> for another model); "
                                   "another machine's run under its own name keeps the committed table")
    a = ap.parse_args()
    if a.report_only:
        print("wrote", *rewrite_results(a.name or ("speed" if a.model == "smollm2-135m" else f"speed_{a.model}"), [], markdown, "speed.py"))
        sys.exit(0)
    t0 = time.time()
    try:
        formats = [f for f in (a.formats or "").split(",") if f]
        res = run(a.model, [int(t) for t in a.threads.split(",")], a.repeats, a.prompt_tokens, a.new_tokens, a.quick, formats)
    except TightfitError as e:
        sys.exit(f"speed: {e}")
    res["wall_s"] = round(time.time() - t0, 1)
    if not a.quick:
        name = a.name or ("speed" if a.model == "smollm2-135m" else f"speed_{a.model}")
        paths = write_results(name, res, markdown(res))
        print("wrote", *paths)
    else:
        print(markdown(res))

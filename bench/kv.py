"""The quantized KV cache on a real model (issue 14): quality at long contexts and decode speed, per
KV width, with and without SmoothAttention, beside llama.cpp's quantized caches.

    .venv/bin/python bench/kv.py --model smollm2-135m --packed plain=out/kv-w4g128,smooth=out/kv-w4g128-smooth \\
        [--contexts 512,2048,4096] [--tokens 8192] [--positions 512,2048,4096] [--llama-gguf FILE]

Quality: for each context length C, held-out wiki windows of C tokens (--tokens // C of them, at
least 2), scored through tightfit's compiled engine with a KV cache of 16, 8 and 4 bits against the
original model (fp32, torch) on the same windows: KL(original || engine), top-1, PPL. The packed
files differ only in how they were compressed (e.g. `--smooth-attention`), so their KV16 rows show
the weights' own error and the KV8/KV4 rows what the cache adds.
Speed: decode tok/s after a prompt of P tokens (P in --positions; the cache then holds P..P+new
positions), 2 threads, median of --repeats rounds after a warm-up, every engine round-robin in one
process: tightfit's engine at each KV width, and llama.cpp (llama-cpp-python, flash attention on for
its quantized caches) running --llama-gguf with F16, Q8_0 and Q4_0 caches. Weight files differ
between the two engines: compare the KV columns within an engine, and engines at equal KV width
with their weight bytes in mind (printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

from tightfit.evaluate import EvalConfig, eval_windows, evaluate, packed_candidate, reference_log_probs  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.model import load_model  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.speed import BandwidthProbe, random_prompt, report, time_round_robin  # noqa: E402

KV_WIDTHS = (16, 8, 4)
LLAMA_KV = {16: "F16", 8: "Q8_0", 4: "Q4_0"}
THREADS = 2


def quality(loaded, packed: dict[str, Path], contexts: list[int], tokens: int) -> list[dict]:
    rows = []
    for ctx in contexts:
        config = EvalConfig(n_windows=max(2, tokens // ctx), ctx=ctx)
        windows = eval_windows(loaded.tokenizer, config)
        t = time.perf_counter()
        logp = reference_log_probs(loaded.model, windows, batch_size=1)  # [W, C-1, V]
        print(f"context {ctx}: {windows.shape[0]} windows, reference in {time.perf_counter() - t:.0f} s", flush=True)
        for label, folder in packed.items():
            model = load_packed(folder)
            smooth = (model.info.get("quantize") or {}).get("smooth_attention")
            for bits in KV_WIDTHS:
                t = time.perf_counter()
                ev = evaluate(packed_candidate(model, "fast", ctx=ctx, kv_bits=bits), windows, reference=logp,
                              batch_size=1, progress=False)
                rows.append({"context": ctx, "windows": int(windows.shape[0]), "packed": label, "smooth_attention": smooth,
                             "kv_bits": bits, "kl": ev.kl, "top1": ev.top1, "ppl": ev.ppl})
                print(f"  {label} KV{bits}: KL {ev.kl:.4f}  top-1 {ev.top1:.3f}  PPL {ev.ppl:.3f}  "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
        del logp
    return rows


def speed(folder: Path, llama_gguf: Path | None, positions: list[int], new: int, repeats: int) -> tuple[list[dict], int]:
    """Decode rows per position and KV width, and the bytes of weights tightfit's engine reads per token.
    Each tightfit row also carries the bytes a decode step reads in the middle of its timed tokens
    (weights + KV bytes/token x cached positions) and the roofline fraction against the read bandwidth
    probed right before each run."""
    import llamacpp

    model = load_packed(folder)
    probe = BandwidthProbe(THREADS)
    rows, weight_bytes = [], 0
    for p in positions:
        n = p + new + 1
        engines = {("tightfit", bits): FastBackend(model, max_positions=n, threads=THREADS, kv_bits=bits) for bits in KV_WIDTHS}
        kv_bytes = {key: e.kv_bytes_per_token for key, e in engines.items()}
        weight_bytes = engines[("tightfit", 16)].weight_bytes
        if llama_gguf is not None:
            engines.update({("llama.cpp", bits): llamacpp.LlamaCppBackend(llama_gguf, THREADS, n, kv_type=LLAMA_KV[bits])
                            for bits in KV_WIDTHS})
        prompt = random_prompt(engines[("tightfit", 16)].vocab_size, p)
        runs = time_round_robin(engines, prompt, new, repeats, probe=probe)
        for (engine, bits), r in runs.items():
            kvb = kv_bytes.get((engine, bits))
            read = None if kvb is None else weight_bytes + kvb * (p + new // 2)
            rows.append({"position": p, "engine": engine, "kv_bits": bits, "kv": LLAMA_KV[bits] if engine == "llama.cpp" else f"KV{bits}",
                         "kv_bytes_per_token": kvb, "bytes_read_per_token": read, "decode_tok_s": statistics.median(r.decode_tok_s),
                         "decode_runs": list(r.decode_tok_s), "prefill_tok_s": statistics.median(r.prefill_tok_s),
                         "bandwidth_runs": list(r.bandwidth_gb_s),
                         "roofline_fraction": None if read is None else report(
                             threads=THREADS, prompt_tokens=p, new_tokens=new, prefill=r.prefill_tok_s, decode=r.decode_tok_s,
                             weight_bytes=read, bandwidth_runs=r.bandwidth_gb_s).roofline_fraction})
            print(f"  position {p} {engine} {rows[-1]['kv']}: {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
        for (engine, _), e in engines.items():
            if engine == "llama.cpp":
                e.close()
        del engines
    return rows, weight_bytes


def kv_bound_lines(payload: dict) -> list[str]:
    """What a smaller cache can buy at all: a decode step reads the weights and the cache, so KV4 over
    KV16 is at most (W + kv16 x P) / (W + kv4 x P) at P cached positions (bandwidth-bound, both at the
    same fraction of the roofline), and the position where that bound reaches 1.5x."""
    rows = [r for r in payload["speed"] if r["engine"] == "tightfit"]
    if not rows or not payload.get("weight_bytes"):
        return []
    w = payload["weight_bytes"]
    kv = {r["kv_bits"]: r["kv_bytes_per_token"] for r in rows}
    lines = [f"- Bytes per decoded token: tightfit's weights {w / 1e6:.0f} MB, KV cache {kv[16]} / {kv[8]} / {kv[4]} bytes "
             "per cached position at KV16 / KV8 / KV4 (codes and scales, as allocated). KV4's speed-up over KV16 is at most "
             "(W + kv16 x P) / (W + kv4 x P): " + ", ".join(
                 f"{(w + kv[16] * p) / (w + kv[4] * p):.2f}x at {p}" for p in sorted({r['position'] for r in rows})) + "."]
    # (W + a P) / (W + b P) = 1.5  <=>  P = 0.5 W / (a - 1.5 b)
    if kv[16] > 1.5 * kv[4]:
        cross, last = 0.5 * w / (kv[16] - 1.5 * kv[4]), max(r["position"] for r in rows)
        lines.append(f"- That bound reaches 1.5x from about {cross:,.0f} cached positions with these weights"
                     + (f", beyond the {last} timed here: no KV4 kernel can decode 1.5x faster than KV16 at {last}."
                        if cross > last else "."))
    return lines


def markdown(payload: dict) -> str:
    lines = [f"# KV cache widths on {payload['model']} (one run)", "", machine_line(payload["machine"], THREADS), "",
             "Quality: held-out wiki windows of each context length, scored through tightfit's engine against the "
             "original (fp32, torch); the packed files: " + ", ".join(f"`{k}` = {v['folder']} (SmoothAttention "
             f"{'alpha ' + str(v['smooth_attention']) if v['smooth_attention'] is not None else 'off'}, "
             f"{v['bits_per_weight']:.2f} bits/weight of its quantized layers)" for k, v in payload["packed"].items()) + ".", "",
             "| context | windows | packed | KV | KL | top-1 | PPL |", "|---|---|---|---|---|---|---|"]
    for r in payload["quality"]:
        lines.append(f"| {r['context']} | {r['windows']} | {r['packed']} | {r['kv_bits']} | {r['kl']:.4f} | {r['top1']:.3f} | {r['ppl']:.3f} |")
    if payload["speed"]:
        lines += ["", f"Decode speed: {THREADS} threads, a random prompt of `position` tokens, then {payload['new_tokens']} "
                  f"greedy tokens; median of {payload['repeats']} rounds after a warm-up, every engine round-robin. "
                  f"tightfit runs `{payload['speed_packed']}`; llama.cpp runs {payload['llama_gguf']} "
                  f"({payload['llama_gguf_mb']:.0f} MB) with flash attention for its quantized caches.", "",
                  "Bytes read/token: tightfit's weights plus its KV bytes/token times the positions cached half-way through "
                  "the timed tokens; roofline: that against the read bandwidth probed right before each run (median over runs).", "",
                  "| position | engine | KV | KV bytes/token | bytes read/token | decode tok/s | roofline | vs its own 16-bit cache |",
                  "|---|---|---|---|---|---|---|---|"]
        base = {(r["position"], r["engine"]): r["decode_tok_s"] for r in payload["speed"] if r["kv_bits"] == 16}
        for r in payload["speed"]:
            kvb = "-" if r["kv_bytes_per_token"] is None else str(r["kv_bytes_per_token"])
            read = "-" if r.get("bytes_read_per_token") is None else f"{r['bytes_read_per_token'] / 1e6:.0f} MB"
            roof = "-" if r.get("roofline_fraction") is None else f"{r['roofline_fraction']:.0%}"
            lines.append(f"| {r['position']} | {r['engine']} | {r['kv']} | {kvb} | {read} | {r['decode_tok_s']:.1f} | {roof} | "
                         f"{r['decode_tok_s'] / base[(r['position'], r['engine'])]:.2f}x |")
    lines += ["", "## Caveats", "",
              f"- {payload['caveat']}" if payload["caveat"] else "- (no source caveat)",
              "- Quality rows at one context share their windows; rows at different contexts do not (longer windows, "
              "other text). A few windows per context: KL moves by a few percent between window sets.",
              *kv_bound_lines(payload), *(f"- {note}" for note in payload.get("notes", [])), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--packed", default="", help="LABEL=FOLDER pairs, comma-separated (packed files of --model; "
                                                 "needed unless --report-only)")
    ap.add_argument("--contexts", default="512,2048,4096")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens per context length")
    ap.add_argument("--positions", default="512,2048,4096", help="decode positions timed (empty: no speed)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-gguf", type=Path, default=None, help="a GGUF of the same model for llama.cpp's row")
    ap.add_argument("--speed-packed", type=Path, default=None,
                    help="the packed folder timed for speed (default: the first of --packed; speed does not depend on "
                         "how the weights were made, only on their bytes)")
    ap.add_argument("--name", default="kv", help="results name in bench/results/ (empty: write nothing)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the Markdown again from bench/results/NAME.json (e.g. with a --note), measuring nothing")
    ap.add_argument("--note", action="append", default=[],
                    help="a caveat about this run to print with the table (repeatable; kept in the JSON)")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if args.report_only:
        path = Path(__file__).resolve().parent / "results" / f"{args.name}.json"
        if not path.is_file():
            sys.exit(f"kv: --report-only needs {path}")
        import json

        payload = json.loads(path.read_text())
        payload["notes"] = payload.get("notes", []) + args.note
        md = markdown(payload)
        print(md)
        print("wrote", *write_results(args.name, payload, md))
        return
    if not args.packed:
        sys.exit("kv: --packed LABEL=FOLDER[,...] is needed to measure")
    packed = {}
    for pair in args.packed.split(","):
        label, sep, folder = pair.partition("=")
        if not sep or not (Path(folder) / "manifest.json").is_file():
            sys.exit(f"kv: --packed wants LABEL=FOLDER with a packed model in FOLDER, got {pair!r}")
        packed[label] = Path(folder)
    speed_folder = args.speed_packed or next(iter(packed.values()))
    if not (speed_folder / "manifest.json").is_file():
        sys.exit(f"kv: --speed-packed {speed_folder} holds no packed model")
    if args.llama_gguf is not None and not args.llama_gguf.is_file():
        sys.exit(f"kv: {args.llama_gguf} is not a file")
    t0 = time.time()
    torch.set_num_threads(THREADS)
    loaded = load_model(args.model, streamed=False)  # the reference runs whole windows
    from tightfit.model.builtin import BUILTIN_MODELS

    info = {}
    for label, folder in packed.items():
        m = load_packed(folder)
        info[label] = {"folder": str(folder), "smooth_attention": (m.info.get("quantize") or {}).get("smooth_attention"),
                       "bits_per_weight": 8 * m.quantized_bytes() / max(m.quantized_weights(), 1)}
    rows = quality(loaded, packed, ints(args.contexts), args.tokens)
    del loaded
    speed_rows, weight_bytes = (speed(speed_folder, args.llama_gguf, ints(args.positions), args.new_tokens, args.repeats)
                                if args.positions else ([], 0))
    payload = {"machine": machine_info(), "model": args.model, "packed": info, "quality": rows, "speed": speed_rows,
               "speed_packed": str(speed_folder), "weight_bytes": weight_bytes, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "llama_gguf": None if args.llama_gguf is None else args.llama_gguf.name,
               "llama_gguf_mb": 0.0 if args.llama_gguf is None else args.llama_gguf.stat().st_size / 1e6,
               "caveat": next((b.grid_caveat for b in BUILTIN_MODELS if b.name == args.model), ""),
               "wall_s": round(time.time() - t0, 1), "notes": args.note}
    md = markdown(payload)
    print(md)
    if args.name:
        print("wrote", *write_results(args.name, payload, md))


if __name__ == "__main__":
    main()

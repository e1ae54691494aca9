"""Decode and prefill speed on the default model, side by side in one run (issue 5).

tightfit's compiled engine at several formats vs llama.cpp (llama-cpp-python) at its nearest
GGML types vs transformers fp32, same prompt length, same threads (1 and 2), medians of repeats,
with the read bandwidth measured in the same run and each engine's decode roofline.

Speed does not depend on weight values, so tightfit models are quantized with RTN (fast); every
tightfit model quantizes the tied embedding/head too (--embed-format), as llama.cpp does.
llama.cpp files are made with llama.cpp's own quantizer from the shipped Q4_1 GGUF.

    .venv/bin/python bench/speed.py [--threads 1,2] [--repeats 5] [--quick]
Run it alone: any other process on this 2-core machine halves the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from common import machine_info, machine_line, write_results  # noqa: E402

from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.model.load import load_model, resolve_source  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.speed import measure_bandwidth, random_prompt, report, time_round_robin  # noqa: E402
from tightfit.runtime.torch_backend import TorchBackend  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "speed"
# (tightfit body format, embedding/head format) and the llama.cpp type it is set against
TIGHTFIT = {
    "w8g32-sym": "w8g32-sym",   # ~ Q8_0
    "w4g32-sym": "w8g32-sym",   # ~ Q4_0 (Q8_0 embeddings)
    "w4g128": "w8g32-sym",
    "w3g64": "w8g32-sym",
    "w2g64": "w8g32-sym",
}
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q3_K_S", "Q2_K")


def tightfit_models() -> dict[str, Path]:
    """Packed RTN models (no clipping search: speed does not depend on values), built once into .cache/."""
    from tightfit.artifacts import QuantizeConfig
    from tightfit.formats.registry import parse_format
    from tightfit.pipeline import CompressRequest, compress

    out, loaded = {}, None
    for fmt, embed in TIGHTFIT.items():
        folder = CACHE / f"tightfit-{fmt}-e{embed}"
        if not (folder / "manifest.json").exists():
            loaded = loaded or load_model("smollm2-135m")
            config = QuantizeConfig(fmt=parse_format(fmt), method="rtn", clip_search=False, embed_format=parse_format(embed))
            compress(CompressRequest(model="smollm2-135m", out=folder, quantize=config, evaluation=None), loaded)
        out[fmt] = folder
    return out


def llama_models() -> dict[str, Path]:
    """llama.cpp's own files from the shipped Q4_1 GGUF (its default embedding types), built once into .cache/."""
    shipped = resolve_source("smollm2-135m").path
    out = {"Q4_1": shipped}
    for t in LLAMA_TYPES:
        if t == "Q4_1":
            continue
        dst = CACHE / f"llama-{t}.gguf"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            llamacpp.quantize(shipped, tmp, t)
            tmp.rename(dst)
        out[t] = dst
    return out


def run(threads_list: list[int], repeats: int, prompt: int, new: int, quick: bool) -> dict:
    """Per thread count: open every engine, then time them round-robin (one run each per round), so
    that drifts of this shared machine hit every engine alike; medians over the rounds."""
    rows = []
    tf_models = tightfit_models()
    ll_models = llama_models()
    if quick:
        tf_models = {k: v for k, v in tf_models.items() if k in ("w4g32-sym", "w2g64")}
        ll_models = {k: v for k, v in ll_models.items() if k in ("Q4_0", "Q2_K")}
    for threads in threads_list:
        torch.set_num_threads(threads)
        bandwidth = measure_bandwidth(threads)
        print(f"[{threads} threads] read bandwidth {bandwidth:.1f} GB/s", flush=True)
        engines = []  # (engine, model, size MB, backend, weight bytes)
        for fmt, folder in tf_models.items():
            b = FastBackend(load_packed(folder), max_positions=prompt + new, threads=threads)
            engines.append(("tightfit", fmt, folder_mb(folder), b, b.weight_bytes))
        for t, path in ll_models.items():
            engines.append(("llama.cpp", t, path.stat().st_size / 1e6, llamacpp.LlamaCppBackend(path, threads, prompt + new),
                            llamacpp.gguf_tensor_bytes(path)))
        if not quick:
            loaded = load_model("smollm2-135m")
            wb = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            engines.append(("transformers", "fp32", wb / 1e6, TorchBackend(loaded.model, max_positions=prompt + new), wb))
        tokens = random_prompt(engines[0][3].vocab_size, prompt)
        slowest = {i: max(2, repeats // 2) for i, e in enumerate(engines) if e[0] == "transformers"}  # fewer rounds
        runs = time_round_robin({i: e[3] for i, e in enumerate(engines)}, tokens, new, repeats, max_rounds=slowest,
                                on_round=lambda rnd: print(f"  round {rnd} done", flush=True))
        for i, (engine, model, size, _, wb) in enumerate(engines):
            r = report(threads=threads, prompt_tokens=prompt, new_tokens=new, prefill=runs[i].prefill_tok_s,
                       decode=runs[i].decode_tok_s, weight_bytes=wb, bandwidth_gb_s=bandwidth)
            rows.append(dict(engine=engine, model=model, size_mb=size, **r.to_json()))
            show(rows[-1])
        del engines
    return {"machine": machine_info(), "prompt_tokens": prompt, "new_tokens": new, "repeats": repeats, "rows": rows}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def show(row: dict) -> None:
    print(f"  {row['engine']:12s} {row['model']:10s} {row['size_mb']:7.1f} MB  prefill {row['prefill_tok_s']:7.1f} tok/s  "
          f"decode {row['decode_tok_s']:6.1f} tok/s  roofline {100 * row['roofline_fraction']:4.0f} %", flush=True)


PAIRS = (("w8g32-sym", "Q8_0"), ("w4g32-sym", "Q4_0"), ("w4g128", "Q4_1"), ("w3g64", "Q3_K_S"), ("w2g64", "Q2_K"))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Decode and prefill speed: tightfit vs llama.cpp vs transformers (one run)",
        "",
        machine_line(m, threads=" and ".join(str(t) for t in sorted({r["threads"] for r in result["rows"]}))),
        "",
        f"Prompt {result['prompt_tokens']} random tokens, then {result['new_tokens']} greedy tokens; medians of "
        f"{result['repeats']} rounds after a warm-up round; in each round every engine runs once (round-robin), so "
        "drifts of the shared machine hit all alike. Roofline = read bandwidth measured in the same run / weight "
        "bytes per token (the KV cache is not counted). transformers fp32 runs fewer rounds.",
        "",
    ]
    for threads in sorted({r["threads"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["threads"] == threads]
        bw = rows[0]["bandwidth_gb_s"]
        lines += [f"## {threads} thread(s), read bandwidth {bw:.1f} GB/s", "",
                  "| engine | model | file MB | weights MB/token | prefill tok/s | decode tok/s | roofline tok/s | of roofline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['engine']} | {r['model']} | {r['size_mb']:.1f} | {r['weight_bytes'] / 1e6:.1f} | "
                         f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['roofline_tok_s']:.0f} | "
                         f"{100 * r['roofline_fraction']:.0f} % |")
        by = {(r["engine"], r["model"]): r for r in rows}
        ratio_lines = []
        for tf, ll in PAIRS:
            a, b = by.get(("tightfit", tf)), by.get(("llama.cpp", ll))
            if a and b:
                ratio_lines.append(f"| {tf} vs {ll} | {a['decode_tok_s'] / b['decode_tok_s']:.2f}x | "
                                   f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x |")
        if ratio_lines:
            lines += ["", "| tightfit vs llama.cpp | decode ratio | prefill ratio |", "|---|---|---|", *ratio_lines]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="two formats per engine, no transformers, no results written")
    a = ap.parse_args()
    t0 = time.time()
    res = run([int(t) for t in a.threads.split(",")], a.repeats, a.prompt_tokens, a.new_tokens, a.quick)
    res["wall_s"] = round(time.time() - t0, 1)
    if not a.quick:
        paths = write_results("speed", res, markdown(res))
        print("wrote", *paths)
    else:
        print(markdown(res))

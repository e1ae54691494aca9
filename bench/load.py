"""Load time and peak memory of a GGUF model: tightfit's loader vs transformers' own (issue 11).

Each load runs in a fresh subprocess (peak RSS is per process): `tightfit` is `load_model(spec)`
(model + tokenizer, fp32); `transformers` is what tightfit used before, transformers' GGUF path
(`AutoModelForCausalLM` + `AutoTokenizer.from_pretrained(gguf_file=..., GgufConfig(dequantize=True))`),
without the extra full metadata parse tightfit's old already-quantized check added (about a quarter
more time), so the old figures flatter the old path. Seconds count the load call only (imports of
torch/transformers excluded); peak RSS is the whole process's. Built-in models are resolved (and a
model shipped in pieces assembled) before any timing.

    .venv/bin/python bench/load.py [--models smollm2-135m,qwen2.5-coder-1.5b] [--runs 3] [--runs-big 1]
Run it alone: other processes on this 2-core machine slow both loaders.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

LOADERS = ("transformers", "tightfit")
BIG_BYTES = 2 * 10**9  # fp32 models above this are loaded --runs-big times (minutes each)


def child(loader: str, spec: str) -> dict:
    """One load in this process: seconds, peak RSS and the fp32 size of what was loaded."""
    import warnings

    import torch
    from transformers import AutoTokenizer

    from tightfit.model import load_model, resolve_source
    from tightfit.model.gguf import transformers_gguf_model
    from tightfit.model.reading import quiet_transformers

    warnings.simplefilter("ignore")
    path = resolve_source(spec).path
    start = time.perf_counter()
    if loader == "tightfit":
        model = load_model(spec).model
    else:
        model = transformers_gguf_model(path)
        with quiet_transformers():
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    seconds = time.perf_counter() - start
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fp32_bytes": fp32_bytes, "threads": torch.get_num_threads()}


def run_child(loader: str, spec: str) -> dict:
    """One load in a fresh process, with the machine's 1-minute load average just before it (others' work)."""
    load_average = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--child", loader, spec], check=True, capture_output=True, text=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_average_before": load_average}


def l3_cache() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("L3 cache")), "unknown")


def markdown(rows: list[dict], machine: dict, command: str) -> str:
    lines = ["# GGUF load time and peak memory", "",
             f"Machine: {machine['cpu']}, L3 {machine['l3']}, {machine['cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), {machine['date']}.", "",
             f"Reproduce: `{command}` (each load in its own process; median of the runs shown).", "",
             "| model | loader | runs | load s | s per fp32 GB | peak RSS GB | fp32 model GB | load average before |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        averages = ", ".join(f"{run['load_average_before']:.1f}" for run in r["all"])
        lines.append(f"| {r['model']} | {r['loader']} | {r['runs']} | {r['seconds']:.1f} | {r['seconds_per_gb']:.1f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['fp32_bytes'] / 1e9:.2f} | {averages} |")
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        old, new = (next((r for r in rows if r["model"] == model and r["loader"] == name), None) for name in LOADERS)
        if old and new:
            lines.append(f"- {model}: tightfit loads {old['seconds_per_gb'] / new['seconds_per_gb']:.1f}x faster per GB, "
                         f"peak RSS {new['peak_rss_bytes'] / 1e9:.2f} GB vs {old['peak_rss_bytes'] / 1e9:.2f} GB "
                         f"(fp32 weights {new['fp32_bytes'] / 1e9:.2f} GB).")
    lines += ["", "transformers: its own GGUF path as tightfit called it before (config, tokenizer, weights: three full "
              "metadata parses, dequantization in 16-row groups, two copies per tensor); tightfit's old check for an "
              "already-quantized source added a fourth parse, not counted here. Peak RSS includes about 0.5 GB of "
              "Python, torch and transformers. A load average above 0 means other processes shared the "
              f"{machine['cores']} cores during that run; on a shared machine the figures move by tens of percent."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    ap.add_argument("--runs", type=int, default=3, help="runs per loader for models up to 2 GB in fp32")
    ap.add_argument("--runs-big", type=int, default=1, help="runs per loader for larger models")
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from tightfit.model import resolve_source

    machine = {**machine_info(), "l3": l3_cache()}
    rows = []
    for spec in args.models.split(","):
        resolve_source(spec)  # a model shipped in pieces is assembled now, not inside a timed load
        runs = args.runs
        for loader in LOADERS:
            results = []
            while len(results) < runs:
                results.append(run_child(loader, spec))
                print(f"{spec} {loader}: {results[-1]['seconds']:.1f}s, peak RSS "
                      f"{results[-1]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
                if results[-1]["fp32_bytes"] > BIG_BYTES:
                    runs = min(runs, args.runs_big)
            seconds = statistics.median(r["seconds"] for r in results)
            fp32 = results[0]["fp32_bytes"]
            rows.append({"model": spec, "loader": loader, "runs": len(results), "seconds": seconds,
                         "seconds_per_gb": seconds / (fp32 / 1e9),
                         "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in results),
                         "fp32_bytes": fp32, "all": results})
    command = "python bench/load.py " + " ".join(sys.argv[1:])
    json_path, md_path = write_results("load", {"machine": machine, "command": command, "rows": rows},
                                       markdown(rows, machine, command.strip()))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()

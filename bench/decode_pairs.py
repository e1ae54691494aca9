"""Decode of every non-uniform format beside the uniform format of nearest bytes, timed in alternating
short bursts (A B B A) in one process: the steadier form of speed.py's equal-bytes table (issue 13).

speed.py times each model once per round (a 256-token prompt, then 128 tokens), so a format and its
uniform reference run up to a minute apart, and this shared machine's speed drifts by tens of percent
in seconds. Here each pair is timed within about a second: both backends keep the same prompt in their
KV caches; a burst truncates the cache back to the prompt and decodes N tokens (the same fixed token
ids for every model: decode cost does not depend on them), so every burst of every model reads the
same positions; per round and pair the order is A, B, B, A, which cancels a drift linear in time, and
the pair's ratio is B's time over A's time (A's speed as a share of B's). An A/A pair (the first uniform
format against a second copy of itself) shows what the method's own noise is. Medians over the rounds,
with the quartiles; the first round warms up. One thread by default: on the 2-core VMs of this project two
threads meet at a barrier in every matmul, and a vCPU the host takes away for a moment stalls both, which
makes whole-model ratios swing far more than the kernels differ (A/A quartiles about three times wider);
--threads 2 times the engine as users run it.

    .venv/bin/python bench/decode_pairs.py --formats w4g32-sym,nl4g32,lut4g32,lut4g32-row,w3g64,spqr-w3g32-s3-o0.5 \\
        [--threads 1] [--rounds 25] [--burst 32] [--prompt-tokens 128] [--name decode_pairs]

Files are speed.py's (RTN, w8g32-sym head as llama.cpp's Q8_0 files, built once into .cache/speed/).
Run it alone. Results: bench/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, rewrite_results, write_results  # noqa: E402
from speed import SETUPS, UNIFORM, tightfit_models, with_formats  # noqa: E402

from tightfit.errors import TightfitError  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.speed import random_prompt  # noqa: E402

CONTROL = " (copy)"  # the label suffix of the A/A control's second backend


def nearest_uniform(weight_bytes: dict[str, int], bracket: bool = False) -> list[tuple[str, str]]:
    """(format, reference) pairs: every non-uniform format with the uniform one nearest in weight bytes read
    per token (bracket: with the nearest at no more bytes and the nearest at no fewer, where they differ),
    after the A/A control (the first uniform format against its copy)."""
    uniform = [f for f in weight_bytes if UNIFORM.match(f)]
    others = [f for f in weight_bytes if not UNIFORM.match(f) and not f.endswith(CONTROL)]
    if not uniform or not others:
        raise TightfitError("decode_pairs needs at least one uniform format (wBgG[-sym]) and one other in --formats")
    pairs = [(uniform[0] + CONTROL, uniform[0])]
    for f in others:
        refs = [min(uniform, key=lambda u: abs(weight_bytes[u] - weight_bytes[f]))]
        if bracket:
            below = [u for u in uniform if weight_bytes[u] <= weight_bytes[f]]
            above = [u for u in uniform if weight_bytes[u] >= weight_bytes[f]]
            sides = ([max(below, key=weight_bytes.get)] if below else []) + ([min(above, key=weight_bytes.get)] if above else [])
            refs = sorted(set(sides), key=weight_bytes.get)
        pairs += [(f, u) for u in refs]
    return pairs


def burst_seconds(backend: FastBackend, prompt_len: int, tokens: list[int]) -> float:
    """Seconds to decode `tokens` one at a time after the cache is cut back to the prompt."""
    backend.truncate(prompt_len)
    t = time.perf_counter()
    for tok in tokens:
        backend.forward([tok])
    return time.perf_counter() - t


def time_pairs(backends: dict[str, FastBackend], pairs: list[tuple[str, str]], prompt: list[int], tokens: list[int],
               rounds: int, on_round=lambda rnd: None) -> tuple[dict[tuple[str, str], list[float]], dict[str, list[float]]]:
    """Every pair (A, B) timed A B B A once per round after a warm-up round: ((A, B) -> B's time / A's time per round,
    model -> tok/s of each of its pairs' bursts, two bursts at a time). Each backend gets `prompt` first."""
    for b in backends.values():
        b.reset()
        b.forward(prompt)
    ratios: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    tok_s: dict[str, list[float]] = {f: [] for f in backends}
    for rnd in range(rounds + 1):  # round 0 warms up
        for a, b in pairs:
            ta1 = burst_seconds(backends[a], len(prompt), tokens)
            tb1 = burst_seconds(backends[b], len(prompt), tokens)
            tb2 = burst_seconds(backends[b], len(prompt), tokens)
            ta2 = burst_seconds(backends[a], len(prompt), tokens)
            if rnd:
                ratios[(a, b)].append((tb1 + tb2) / (ta1 + ta2))
                tok_s[a].append(2 * len(tokens) / (ta1 + ta2))
                tok_s[b].append(2 * len(tokens) / (tb1 + tb2))
        on_round(rnd)
    return ratios, tok_s


def rows_of(pairs: list[tuple[str, str]], weight_bytes: dict[str, int], ratios: dict[tuple[str, str], list[float]],
            tok_s: dict[str, list[float]]) -> list[dict]:
    """One results row per pair: medians and quartiles of its rounds."""
    rows = []
    for a, b in pairs:
        r = ratios[(a, b)]
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        rows.append(dict(format=a, reference=b, weight_mb=weight_bytes[a] / 1e6, reference_weight_mb=weight_bytes[b] / 1e6,
                         decode_tok_s=statistics.median(tok_s[a]), reference_decode_tok_s=statistics.median(tok_s[b]),
                         ratio=statistics.median(r), ratio_q1=q[0], ratio_q3=q[2], ratios=r))
    return rows


def run(model: str, formats: list[str], threads: int, rounds: int, burst: int, prompt_tokens: int, bracket: bool = False) -> dict:
    torch.set_num_threads(threads)
    folders = tightfit_models(model, with_formats(SETUPS[model], formats))

    def opened(f: str) -> FastBackend:
        return FastBackend(load_packed(folders[f]), max_positions=prompt_tokens + burst, threads=threads)

    backends = {f: opened(f) for f in formats}
    backends[formats[0] + CONTROL] = opened(formats[0])  # a copy of its own, as the other pairs' models are
    weight_bytes = {f: b.weight_bytes for f, b in backends.items()}
    pairs = nearest_uniform(weight_bytes, bracket)
    vocab = next(iter(backends.values())).vocab_size
    ratios, tok_s = time_pairs(backends, pairs, random_prompt(vocab, prompt_tokens), random_prompt(vocab, burst, seed=1), rounds,
                               on_round=lambda rnd: print(f"  round {rnd} done" + (" (warm-up)" if not rnd else ""), flush=True))
    return {"machine": machine_info(), "model": model, "threads": threads, "rounds": rounds, "burst": burst,
            "prompt_tokens": prompt_tokens, "bracket": bracket, "rows": rows_of(pairs, weight_bytes, ratios, tok_s)}


def markdown(result: dict) -> str:
    rows = result["rows"]
    control = next((r for r in rows if r["format"].endswith(CONTROL)), None)
    lines = [
        f"# Decode beside the uniform format of nearest bytes, paired bursts, on {result['model']} (one run)",
        "",
        machine_line(result["machine"], threads=result["threads"]),
        "",
        f"Both models of a pair hold the same {result['prompt_tokens']}-token prompt; a burst cuts the cache back to it "
        f"and decodes {result['burst']} fixed tokens, in the order A B B A per pair and round ({result['rounds']} rounds "
        "after a warm-up round, every pair once per round). Ratio = B's time / A's time of the round (A's decode speed "
        "as a share of B's); medians and quartiles over the rounds; tok/s are medians over a model's bursts (a "
        "reference serving several pairs: over all of them). Weights MB/token are what the engine reads per "
        "decoded token (SpQR's include statistics records and outliers; the w8g32-sym head in every file).",
        "",
        f"| format | weights MB/token | decode tok/s | {'uniform neighbour in bytes' if result.get('bracket') else 'uniform of nearest bytes'} | "
        "its MB/token | its decode tok/s | "
        "ratio, median | quartiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['weight_mb']:.1f} | {r['decode_tok_s']:.1f} | {r['reference']} | "
                     f"{r['reference_weight_mb']:.1f} | {r['reference_decode_tok_s']:.1f} | **{r['ratio']:.0%}** | "
                     f"{r['ratio_q1']:.0%}-{r['ratio_q3']:.0%} |")
    if control:
        lines += ["", f"The first row is the A/A control ({control['reference']} against a second copy of itself): "
                      f"median {control['ratio']:.0%}, quartiles {control['ratio_q1']:.0%}-{control['ratio_q3']:.0%}; "
                      "a pair whose median lies outside this spread differs by its formats, not by the method's noise."]
    lines += ["", "Whole-model decode includes what every format shares (attention, norms, the w8g32-sym head), so "
                  "a kernel's own gap shows diluted here; bench/matrix_ab.py times one matrix alone."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SETUPS))
    ap.add_argument("--formats", default="w4g32-sym,nl4g32,lut4g32,lut4g32-row,w3g64,spqr-w3g32-s3-o0.5,w2g64",
                    help="comma-separated formats: uniform ones (wBgG, wBgG-sym) and the others, each paired with the "
                         "uniform one nearest in bytes")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (1: the steadiest ratios here, see above)")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--burst", type=int, default=32, help="tokens decoded per burst")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--bracket", action="store_true", help="pair each format with the nearest uniform format at no more "
                                                          "bytes and the nearest at no fewer (both, where they differ)")
    ap.add_argument("--name", default="decode_pairs", help="results name in bench/results/")
    ap.add_argument("--report-only", action="store_true", help="write NAME.md again from NAME.json, measuring nothing")
    a = ap.parse_args()
    if a.report_only:
        print("wrote", *rewrite_results(a.name, [], markdown, "decode_pairs.py"))
        sys.exit(0)
    if a.rounds < 1 or a.burst < 1 or a.prompt_tokens < 1 or a.threads < 1:
        ap.error("--rounds, --burst, --prompt-tokens and --threads must be at least 1")
    t0 = time.time()
    try:
        res = run(a.model, [f for f in a.formats.split(",") if f], a.threads, a.rounds, a.burst, a.prompt_tokens, a.bracket)
    except TightfitError as e:
        sys.exit(f"decode_pairs: {e}")
    res["wall_s"] = round(time.time() - t0, 1)
    print(markdown(res))
    print("wrote", *write_results(a.name, res, markdown(res)))

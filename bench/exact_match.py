"""Greedy generation of a packed model: tightfit's engine in exact mode (fp32 activations) against
the dequantized torch reference, token for token, on a few prompts (issue 11, item 5).

    .venv/bin/python bench/exact_match.py out/qwen15-w4g128 [--tokens 32]
Writes bench/results/exact_<folder name>.{json,md}. A mismatch is reported with the first position
where the two differ and the reference's top-2 logit gap there (a near tie can flip on rounding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.runtime import build_model  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402
from tightfit.runtime.torch_backend import TorchBackend  # noqa: E402

PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "Write a function that reverses a linked list in C.",
)


def greedy(backend, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens after prompt, and the top-2 logit gap at each step."""
    logits, out, gaps = backend.forward(prompt), [], []
    for _ in range(n):
        top = torch.topk(logits.float(), 2).values
        gaps.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
        logits = backend.forward([out[-1]])
    return out, gaps


def run(folder: Path, tokens: int) -> dict:
    from transformers import AutoTokenizer

    packed = load_packed(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    t = time.perf_counter()
    reference = TorchBackend(build_model(packed), max_positions=256)
    fast = FastBackend(packed, max_positions=256, exact=True)
    del packed
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ref, gaps = greedy(reference, ids, tokens)
        reference.reset()
        ours, _ = greedy(fast, ids, tokens)
        fast.reset()
        first = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), None)
        rows.append({"prompt": prompt, "tokens": tokens, "equal": first is None, "first_difference": first,
                     "gap_there": None if first is None else gaps[first], "text": tokenizer.decode(ref)})
        print(f"{prompt!r}: {'equal' if first is None else f'differs at token {first}'}", flush=True)
    return {"machine": machine_info(), "model": str(folder), "rows": rows, "seconds": time.perf_counter() - t}


def markdown(result: dict) -> str:
    lines = [f"# Exact mode against the dequantized torch reference: {Path(result['model']).name}", "",
             machine_line(result["machine"]), "",
             "Greedy tokens of tightfit's engine in exact mode (fp32 activations, fp16 KV cache) and of the torch "
             "reference with the same packed weights dequantized (fp32), from the same prompt.", "",
             "| prompt | tokens | equal | first difference | reference top-2 gap there | reference text |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gap = "-" if r["gap_there"] is None else f"{r['gap_there']:.4f}"
        first = "-" if r["first_difference"] is None else str(r["first_difference"])
        text = r["text"].replace("|", "\\|").replace("\n", "\\n")[:80]
        lines.append(f"| {r['prompt']} | {r['tokens']} | {'yes' if r['equal'] else 'no'} | {first} | {gap} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    res = run(a.folder, a.tokens)
    print("wrote", *write_results(f"exact_{a.folder.name}", res, markdown(res)))

"""Learned 2- and 3-bit tables against the uniform formats of about the same bytes, on a few real layers.

    .venv/bin/python bench/lut_small.py [--layers 0,10,20] [--kinds q_proj,down_proj] [--tokens 512]
                                        [--formats w3g64,lut3g64,...] [--inits] [--time]

For each chosen decoder layer of the default model (SmolLM2-135M) the inputs' second moments
H_jj = mean x_j^2 over a short calibration text (the README) are collected with hooks; every linear
layer of those blocks is then rounded to nearest (RTN) in each format (the learned tables fitted
with H_jj as importance, as GPTQ fits them), and the importance-weighted relative error
sum_j H_jj (w - w_hat)^2 / sum_j H_jj w^2 is summed over the layers. Also compares starting grids of
the 3- and 2-bit tables (formats/lut.py LUT_INITS). With --time: one matmul per format at one token,
one thread, the native kernels, streamed copies of a [1536, 576] layer (tightfit.runtime.kernels.
time_matmul), medians of rounds; on a shared machine these are rough. Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from unittest import mock

import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.formats import lut
from tightfit.formats.registry import parse_format
from tightfit.model import load_model

PAIRS = ("w3g64", "w3g64-sym", "lut3g64", "lut3g64-row", "w3g32", "lut3g32", "lut3g32-row", "w2g32", "lut2g32", "lut2g32-row")
INITS = {  # alternative starting grids of the k-means (3 and 2 bits)
    3: {"normal quantiles (sym)": lut.LUT_INITS[3], "uniform": (-127, -91, -54, -18, 18, 54, 91, 127),
        "NF3 (exact 0, asym)": (-127, -68, -31, 0, 23, 49, 79, 127), "w3-sym grid (asym)": (-127, -95, -64, -32, 0, 32, 64, 95)},
    2: {"normal quantiles (sym)": (-127, -35, 35, 127), "uniform": (-127, -42, 42, 127), "exact 0 (asym)": lut.LUT_INITS[2],
        "w2-sym grid (asym)": (-127, -64, 0, 64)},
}


def second_moments(loaded, layers: list[int], kinds: list[str] | None, tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (w [N, K] fp32, H_jj [K])} of every linear layer in the chosen blocks (of the chosen kinds)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    found, hooks = {}, []
    for name, mod in loaded.model.named_modules():
        chosen = kinds is None or name.rsplit(".", 1)[-1] in kinds
        if isinstance(mod, torch.nn.Linear) and chosen and any(f"layers.{i}." in name for i in layers):
            def hook(m, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # [T, K]
                found[name] = (m.weight.detach().float(), (x * x).mean(0))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    for h in hooks:
        h.remove()
    return found


def weighted_error(w: torch.Tensor, h: torch.Tensor, fmt) -> tuple[float, float]:
    """(sum H_jj (w - w_hat)^2, sum H_jj w^2) of RTN in fmt; a learned table is fitted with importance h."""
    if isinstance(fmt, lut.LutFormat):
        q = lut.quantize_lut_rtn(w, fmt, importance=h)
    else:
        q = quantize_rtn_any(w, fmt)
    return float(((q.dequantize() - w) ** 2 * h).sum()), float((w * w * h).sum())


def errors(layers: dict, names) -> dict[str, float]:
    out = {}
    for name in names:
        fmt = parse_format(name)
        err = [weighted_error(w, h, fmt) for w, h in layers.values()]
        out[name] = sum(e for e, _ in err) / sum(t for _, t in err)
    return out


def timings(names, rounds: int = 5, reps: int = 100) -> dict[str, float]:
    from tightfit.runtime import kernels

    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    mats = {}
    for n in names:  # the codes do not change the time: no scale search; streamed copies (8 x ~0.3-0.5 MB)
        mat = kernels.from_quantized(quantize_rtn_any(w, parse_format(n), clip_search=False))
        mats[n] = [mat] + [mat.clone() for _ in range(7)]
    times = {n: [] for n in names}
    for _ in range(rounds):  # round-robin: drifts of the shared machine hit every format alike
        for n in names:
            times[n].append(kernels.time_matmul(mats[n], 1, threads=1, reps=reps))  # seconds per matmul
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,10,20", help="decoder blocks whose linear layers are measured")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--time", action="store_true", help="also time the kernels (one layer, one token)")
    ap.add_argument("--time-only", action="store_true", help="with --time: only time the kernels")
    ap.add_argument("--kinds", default=None, help="only these linear layers of each block (e.g. q_proj,down_proj)")
    ap.add_argument("--formats", default=",".join(PAIRS))
    ap.add_argument("--inits", default="", help="also compare starting grids of the tables of these widths (e.g. 3,2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.time:
        t = timings(("w3g64-sym", "w3g64", "lut3g64", "lut3g64-row", "w2g32", "lut2g32", "lut2g32-row",
                     "w4g32-sym", "lut4g32", "lut4g32-row"))
        for n, s in t.items():
            print(f"{n:14s} {s * 1e6:8.1f} us/matmul [1536x576], 1 token, 1 thread")
        if args.time_only:
            return
    loaded = load_model("smollm2-135m")
    layers = second_moments(loaded, [int(i) for i in args.layers.split(",")], args.kinds and args.kinds.split(","), args.tokens)
    n, k = 1536, 576
    print(f"{len(layers)} layers ({', '.join(layers)}); weighted relative RTN error (bpw at a {n}x{k} layer)")
    for name, e in errors(layers, args.formats.split(",")).items():
        print(f"{name:14s} {parse_format(name).bits_per_weight(n, k):6.3f} bpw  {e:.5f}")
    for bits, inits in INITS.items():
        if str(bits) in args.inits.split(","):
            for label, levels in inits.items():
                with mock.patch.dict(lut.LUT_INITS, {bits: levels}):
                    e = errors(layers, [f"lut{bits}g{32 if bits == 2 else 64}", f"lut{bits}g32-row"])
                print(f"init {bits}-bit {label:24s} " + "  ".join(f"{n} {v:.5f}" for n, v in e.items()))


if __name__ == "__main__":
    main()

"""How -dq formats round their scale codes: the measurements behind builders.DQ_RTN_ROUNDING and
DQ_GPTQ_HEADROOM (the table in formats/double_quant.py's docstring).

    nice -n 19 .venv/bin/python bench/double_quant.py rtn --blocks 0,15,29 --formats w3g16,w3g32,w4g32-sym,w2g32,nl4g32 --roundings nearest,up
    nice -n 19 .venv/bin/python bench/double_quant.py gptq --blocks 15 --formats w3g32,w4g32-sym,nl4g32 --roundings nearest,up --headrooms 1.0,1.1,1.25

For each format, the Hessian-weighted error tr(dW H dW^T) summed over the q/k/o/gate/up/down
projections of the given blocks of the default model, in the format and in its -dq twin under each
rounding (and GPTQ headroom), relative to the format's own. H = 2 X^T X / T from the first 512
tokens of README.md through the fp32 model. One thread; prints, writes nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

import tightfit.algorithms.builders as builders
from tightfit.algorithms.gptq import gptq_quantize
from tightfit.formats.registry import parse_format
from tightfit.model import DEFAULT_MODEL, load_model

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
README = __file__.rsplit("/bench/", 1)[0] + "/README.md"


def layer_hessians(blocks: list[int], tokens: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (W [N, K] fp32, H [K, K]) of the projections of `blocks`."""
    loaded = load_model(DEFAULT_MODEL)
    ids = loaded.tokenizer(open(README).read(), return_tensors="pt").input_ids[:, :tokens]
    out, hooks = {}, []
    for b in blocks:
        for name in PROJECTIONS:
            mod = loaded.model.model.layers[b].get_submodule(name)

            def hook(mod, inp, _, key=f"{b}.{name}"):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # [T, K]
                out[key] = (mod.weight.detach().float().clone(), 2 * x.T @ x / x.shape[0])

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        loaded.model(ids)
    for h in hooks:
        h.remove()
    return out


def weighted_error(w: torch.Tensor, q, h: torch.Tensor) -> float:
    dw = q.dequantize() - w  # [N, K]
    return float(((dw @ h) * dw).sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("method", choices=("rtn", "gptq"))
    p.add_argument("--blocks", default="15")
    p.add_argument("--formats", default="w3g32,w4g32-sym,nl4g32")
    p.add_argument("--roundings", default="nearest,up")
    p.add_argument("--headrooms", default="1.0,1.1,1.25")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    layers = layer_hessians([int(b) for b in args.blocks.split(",")])
    variants = [(r, float(hr)) for hr in (args.headrooms.split(",") if args.method == "gptq" else ["1.0"])
                for r in args.roundings.split(",")]
    for name in args.formats.split(","):
        base, dq = parse_format(name), parse_format(name + "-dq")
        total = {"base": 0.0, **{v: 0.0 for v in variants}}
        for w, h in layers.values():
            if args.method == "rtn":
                total["base"] += weighted_error(w, builders.quantize_rtn_any(w, base), h)
            else:
                total["base"] += weighted_error(w, gptq_quantize(w, h, base).quantized, h)
            for rounding, headroom in variants:
                if args.method == "rtn":
                    builders.DQ_RTN_ROUNDING = rounding
                    q = builders.quantize_rtn_any(w, dq)
                else:
                    builders.DQ_GPTQ_ROUNDING, builders.DQ_GPTQ_HEADROOM = rounding, headroom
                    q = gptq_quantize(w, h, dq).quantized
                total[(rounding, headroom)] += weighted_error(w, q, h)
        cells = "  ".join(f"{r}{'' if args.method == 'rtn' else f' x{hr}'} {100 * (total[(r, hr)] / total['base'] - 1):+.1f} %"
                          for r, hr in variants)
        print(f"{args.method} {name} ({base.bits_per_weight(576, 1536):.3f} -> {dq.bits_per_weight(576, 1536):.3f} bpw): "
              f"error {total['base']:.4g}; -dq {cells}  [{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()

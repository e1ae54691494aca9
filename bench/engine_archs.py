"""Decode speed of a Gemma3-architecture model: tightfit's compiled engine vs the torch fallback (issue 18).

Until issue 18, `open_backend(engine="auto")` ran Gemma3 models on the torch fallback (TorchBackend:
the transformers model with every weight dequantized to fp32); now the engine runs them. This
times both on one packed model, round-robin in one process (each round runs each backend once, so
drifts of a shared machine hit both alike), medians of repeats after a warm-up round, with the read
bandwidth probed right before every timed run and each backend's decode roofline fraction (the
median over runs of each run against its own probe).

The model: a transformers Gemma3 text config in the shape of google/gemma-3-270m (18 layers, hidden
640, 4 query heads of 256 sharing 1 KV head, GeGLU MLP of 2048, vocabulary 262144, a sliding window
of 512 on five of every six layers), random weights (speed does not depend on values): 268M
weights, quantized round-to-nearest to a 4-bit format, the tied embedding/head to 8 bits, packed
through the pipeline. Source and packed model are built once into .cache/engine_archs/.

    .venv/bin/python bench/engine_archs.py [--threads 2] [--repeats 5] [--prompt-tokens 128] [--new-tokens 64]
    .venv/bin/python bench/engine_archs.py --tiny   # a toy of the same architecture: checks the script, writes nothing
Run it alone: any other process on this 2-core machine halves the figures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.runtime.engine import FastBackend, open_backend  # noqa: E402
from tightfit.runtime.model import build_model  # noqa: E402
from tightfit.runtime.speed import BandwidthProbe, random_prompt, report, time_round_robin  # noqa: E402
from tightfit.runtime.torch_backend import TorchBackend  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "engine_archs"
# google/gemma-3-270m's config.json, shapes and attention pattern (weights random)
GEMMA3_270M = {
    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512,
    "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}
TINY = {**GEMMA3_270M, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6, "head_dim": 32,
        "vocab_size": 1024, "sliding_window": 16, "query_pre_attn_scalar": 32,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of vocab_size entries, built offline: the pipeline packs a tokenizer
    with every model, and speed does not depend on text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def source_model(shape: dict, folder: Path) -> Path:
    """A random Gemma3 text model of `shape` (fp32 safetensors + tokenizer) in folder, built once."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", pad_token_id=0, eos_token_id=1, bos_token_id=2, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    word_tokenizer(shape["vocab_size"]).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def packed_model(source: Path, fmt: str, embed: str, folder: Path) -> Path:
    """source quantized RTN (no clipping search: speed does not depend on values) and packed, built once."""
    if (folder / "manifest.json").exists():
        return folder
    from tightfit.artifacts import QuantizeConfig
    from tightfit.formats.registry import parse_format
    from tightfit.pipeline import CompressRequest, compress

    config = QuantizeConfig(fmt=parse_format(fmt), method="rtn", clip_search=False, embed_format=parse_format(embed))
    compress(CompressRequest(model=str(source), out=folder, quantize=config, evaluation=None, progress=False))
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of a torch model (QuantLinear keeps its fp32 weight as a buffer)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(name: str, shape: dict, fmt: str, embed: str, threads: int, repeats: int, prompt: int, new: int) -> dict:
    source = source_model(shape, CACHE / f"{name}-source")
    folder = packed_model(source, fmt, embed, CACHE / f"{name}-{fmt}-e{embed}")
    packed = load_packed(folder)
    torch.set_num_threads(threads)
    fast = open_backend(packed, engine="auto", max_positions=prompt + new, threads=threads)
    if not isinstance(fast, FastBackend):
        raise SystemExit(f"open_backend(engine='auto') chose {type(fast).__name__}, not the engine")
    model = build_model(packed)
    backends = {"engine": fast, "torch fallback": TorchBackend(model, max_positions=prompt + new)}
    bytes_read = {"engine": fast.weight_bytes, "torch fallback": weight_bytes(model)}
    probe = BandwidthProbe(threads)
    print(f"[{threads} threads] read bandwidth now {probe():.1f} GB/s (probed again before every timed run)", flush=True)
    tokens = random_prompt(fast.vocab_size, prompt)
    runs = time_round_robin(backends, tokens, new, repeats, max_rounds={"torch fallback": max(2, repeats // 2)},
                            on_round=lambda rnd: print(f"  round {rnd} done", flush=True), probe=probe)
    rows = [dict(backend=key, **report(threads=threads, prompt_tokens=prompt, new_tokens=new,
                                       prefill=runs[key].prefill_tok_s, decode=runs[key].decode_tok_s,
                                       weight_bytes=bytes_read[key], bandwidth_runs=runs[key].bandwidth_gb_s).to_json())
            for key in backends]
    # every weight matrix and vector: parameters, and QuantLinear's dequantized weights, which are buffers
    named = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    n_weights = sum(t.numel() for t in {t.data_ptr(): t for n, t in named.items() if n.endswith("weight")}.values())
    return {"machine": machine_info(), "model": name, "shape": shape, "weights": n_weights, "format": fmt,
            "embed_format": embed, "kv_bytes_engine": fast.kv_bytes, "slow_layers": fast.slow_layers,
            "command": " ".join(shlex.quote(a) for a in sys.argv), "rows": rows}


def markdown(result: dict) -> str:
    m, shape, rows = result["machine"], result["shape"], result["rows"]
    by = {r["backend"]: r for r in rows}
    sliding = sum(t == "sliding_attention" for t in shape["layer_types"])
    lines = [
        "# Gemma3 decode: tightfit's engine vs the torch fallback (one run)",
        "",
        machine_line(m, threads=rows[0]["threads"]),
        "",
        f"Model: Gemma3 text in the shape of {'a toy' if result['model'] == 'tiny' else 'google/gemma-3-270m'}, random "
        f"weights: {result['weights'] / 1e6:.0f}M weights, {shape['num_hidden_layers']} layers ({sliding} with a sliding "
        f"window of {shape['sliding_window']}), hidden {shape['hidden_size']}, vocabulary {shape['vocab_size']}; RTN "
        f"{result['format']}, tied embedding/head {result['embed_format']}. The torch fallback is what "
        "open_backend(engine='auto') ran before issue 18: the transformers model with fp32 dequantized weights.",
        "",
        f"Prompt {rows[0]['prompt_tokens']} random tokens, then {rows[0]['new_tokens']} greedy tokens; medians of the "
        "rounds after a warm-up round, both backends once per round (round-robin; the torch fallback sits out the "
        "later rounds). Roofline = read bandwidth / weight bytes per token, the bandwidth probed right before every "
        "timed run; `of roofline` is the median of each run against its own probe, `read bandwidth` the median probe. "
        "Engine KV cache "
        f"{result['kv_bytes_engine'] / 1e6:.1f} MB. Command: `{result['command']}`.",
        "",
        f"## {rows[0]['threads']} thread(s), read bandwidth {rows[0]['bandwidth_gb_s']:.1f} GB/s",
        "",
        "| backend | weights MB/token | prefill tok/s | decode tok/s | decode runs | roofline tok/s | of roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['weight_bytes'] / 1e6:.1f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['decode_runs'])} | {r['roofline_tok_s']:.1f} | "
                     f"{100 * r['roofline_fraction']:.0f} % |")
    lines += ["", f"Engine decode / torch fallback decode: {by['engine']['decode_tok_s'] / by['torch fallback']['decode_tok_s']:.1f}x; "
              f"prefill: {by['engine']['prefill_tok_s'] / by['torch fallback']['prefill_tok_s']:.1f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--format", default="w4g32-sym")
    ap.add_argument("--embed-format", default="w8g32-sym")
    ap.add_argument("--tiny", action="store_true", help="a toy model of the same architecture; prints, writes no results")
    a = ap.parse_args()
    t0 = time.time()
    res = run("tiny" if a.tiny else "gemma3-270m-shape", TINY if a.tiny else GEMMA3_270M, a.format, a.embed_format, a.threads, a.repeats, a.prompt_tokens, a.new_tokens)
    res["wall_s"] = round(time.time() - t0, 1)
    if a.tiny:
        print(markdown(res))
    else:
        print("wrote", *write_results("engine_archs", res, markdown(res)))

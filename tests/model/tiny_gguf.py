"""Tiny GGUF models: a tiny transformers folder (tests/tiny_models.py) written as llama.cpp's converter would.

Names follow gguf-py's table, llama-architecture q/k rows are permuted (rope pairs) and Gemma norms
stored as w + 1, so loading the file must undo both. `types` picks each tensor's GGML type: the
ones gguf-py can quantize are quantized from the weights; Q4_K and Q6_K, which it can only
dequantize, get valid random blocks (so those tensors no longer hold the source weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tightfit.export.gguf import rope_row_permutation
from tightfit.export.gguf_metadata import add_hyperparameters, add_tokenizer

# transformers model_type -> the general.architecture llama.cpp writes (Mistral is run as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "phi3": "phi3"}

TypeChooser = Callable[[str, tuple[int, ...]], str]


def all_f32(name: str, shape: tuple[int, ...]) -> str:
    return "F32"


def mixed_types(name: str, shape: tuple[int, ...]) -> str:
    """Every GGML type the loader must read, spread over the tensors (1-D tensors stay F32, as in llama.cpp)."""
    if len(shape) == 1:
        return "F32"
    by_role = {"token_embd": "Q8_0", "output": "F16", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0",
               "attn_output": "Q5_1", "attn_qkv": "Q4_0", "ffn_gate": "BF16", "ffn_up": "Q8_0"}
    role = name.split(".")[-2]
    if role == "ffn_down":  # 256 inputs: whole K-quant super-blocks
        return "Q4_K" if name.startswith("blk.0.") else "Q6_K"
    return by_role[role]


def _random_blocks(type_name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Valid blocks of a K-quant: random bits with small positive fp16 super-block scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=(shape[0], shape[1] // block_size, type_size),
                                               dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q6_K": (208,)}[type_name]:  # d (and dmin) of each super-block
        raw[..., offset : offset + 2] = scale
    return raw.reshape(shape[0], -1)


def write_tiny_gguf(folder: Path, out: Path, types: TypeChooser = all_f32) -> Path:
    """Write the tiny model in `folder` (config.json, model.safetensors, tokenizer.json) as the GGUF `out`."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    arch_name = GGUF_ARCH[cfg["model_type"]]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(out, arch_name)
    writer.add_name(f"tiny {cfg['model_type']}")
    add_hyperparameters(writer, cfg)
    if arch_name == "gemma3":  # llama.cpp's Gemma 3 converter always writes the head size and the window
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
        writer.add_sliding_window(cfg["sliding_window"])
    add_tokenizer(writer, folder, cfg["vocab_size"])
    for seed, (name, w) in enumerate(sorted(load_file(folder / "model.safetensors").items())):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        if arch_name == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = w[rope_row_permutation(w.shape[0], n_head if "q_proj" in name else n_kv)]
        if arch_name == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1)
        type_name = types(target, tuple(w.shape))
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name in ("F32", "F16"):
            writer.add_tensor(target, w.astype(np.float32 if type_name == "F32" else np.float16))
        elif type_name in ("Q4_K", "Q6_K"):
            writer.add_tensor(target, _random_blocks(type_name, tuple(w.shape), seed), raw_dtype=qtype)
        else:
            writer.add_tensor(target, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

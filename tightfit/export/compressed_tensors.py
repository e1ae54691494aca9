"""Export a packed model as a compressed-tensors "pack-quantized" folder (transformers, vLLM).

compressed-tensors stores an int weight [N, K] of b bits as (compressed_tensors
compressors/pack_quantized):
    weight_packed      int32 [N, ceil(K*b/32)]: signed levels q' in -2**(b-1) .. 2**(b-1)-1, stored
                       as q' + 2**(b-1), packed LSB-first along K (32/b per word for b = 4, 8)
    weight_scale       [N, G] (strategy "group", G = K / group_size) or [N, 1] ("channel")
    weight_zero_point  asymmetric only: int32 [ceil(N*b/32), G], levels packed like the codes along N
    weight_shape       int64 [2] = [N, K]
and dequantizes w = (q' - zp) * s. With q' = q - 2**(b-1) and zp = z - 2**(b-1) this is our
asymmetric w = (q - z) * s; symmetric formats have zp = 0 and q' = q - 2**(b-1). The stored
unsigned values are therefore our codes and zero points themselves: every uniform format maps
exactly, with three adjustments, each reported per layer and still exact:
  * bits: written as 4 or 8 (3 -> 4, 5 and 6 -> 8, 2 -> 4), the widths vLLM's kernels and every
    compressed-tensors release pack alike (dense packing of other widths changed in 0.20);
  * ragged groups: compressed-tensors needs group_size to divide K, so a layer with a narrower
    last group is written with groups of gcd(group_size, K), each scale repeated;
  * scales keep our fp16/bf16 values; loading the model in float32 reproduces our weights bit for bit.
SpQR layers and quantized embeddings have no pack-quantized form: they are written dense in
float32 (exact, not compressed) and listed in `ignore`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tightfit.errors import UnsupportedArchitecture
from tightfit.export.common import ExportReport, TensorMapping, check_output_dir, publish_dir
from tightfit.formats.files import atomic_save_tensors, atomic_write_json
from tightfit.formats.packed import CONFIG_FILE, TENSORS_FILE, PackedModel, load_packed
from tightfit.formats.primitives import QuantizedTensor
from tightfit.formats.registry import AnyQuantizedTensor

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
EMBEDDINGS = "model.embed_tokens"  # an nn.Embedding in every supported architecture, not a Linear
PACK_BITS = (4, 8)  # widths written; narrower formats are widened to the next one
FORMAT = "pack-quantized"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")


def pack_bits(width: int) -> int:
    """The pack-quantized width our `width`-bit codes are written in (see module docstring)."""
    return next(b for b in PACK_BITS if b >= width)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] < 2**bits -> int32 [R, ceil(C*bits/32)], LSB-first along C (zero padded)."""
    assert bits in PACK_BITS and values.dim() == 2, f"bits {bits}, shape {tuple(values.shape)}"
    per_word = 32 // bits
    r, c = values.shape
    padded = torch.zeros(r, math.ceil(c / per_word) * per_word, dtype=torch.int64)
    padded[:, :c] = values.to(torch.int64)
    words = padded.view(r, -1, per_word)  # [R, W, per_word]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits  # [per_word]
    packed = (words << shifts).sum(dim=-1)  # [R, W], < 2**32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 [R, W] -> int64 [R, cols]."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [R, W]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per_word]
    return values.reshape(packed.shape[0], -1)[:, :cols]


def scheme_of(q: QuantizedTensor) -> dict:
    """The compressed-tensors `weights` arguments of q's written form."""
    n, k = q.shape
    group = None if q.fmt.group_size is None else math.gcd(q.fmt.group_width(k), k)
    return {
        "num_bits": pack_bits(q.fmt.bits), "type": "int", "symmetric": q.fmt.symmetric,
        "strategy": "channel" if group is None else "group", "group_size": group,
        "dynamic": False, "actorder": None, "observer": "minmax",
    }


def compress_layer(q: QuantizedTensor) -> tuple[dict[str, torch.Tensor], str]:
    """q -> its pack-quantized tensors (weight_packed, weight_scale, weight_shape[, weight_zero_point]) and a note."""
    n, k = q.shape
    scheme = scheme_of(q)
    bits, b = scheme["num_bits"], q.fmt.bits
    if q.fmt.symmetric:  # level L = q - 2**(b-1), stored as L + 2**(bits-1)
        stored = q.codes.to(torch.int64) - (1 << (b - 1)) + (1 << (bits - 1))
    else:  # q' = q - 2**(bits-1), zp = z - 2**(bits-1): stored values are q and z themselves
        stored = q.codes.to(torch.int64)
    gw = q.fmt.group_width(k)
    repeat = 1 if scheme["group_size"] is None else gw // scheme["group_size"]
    n_groups = 1 if scheme["group_size"] is None else k // scheme["group_size"]
    scales = q.scales.repeat_interleave(repeat, dim=1)[:, :n_groups]  # [N, G']
    out = {
        "weight_packed": pack_int32(stored, bits),
        "weight_scale": scales.to(q.fmt.scale_torch_dtype),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not q.fmt.symmetric:
        zeros = q.zeros.repeat_interleave(repeat, dim=1)[:, :n_groups]  # [N, G']
        out["weight_zero_point"] = pack_int32(zeros.T.contiguous(), bits).T.contiguous()  # packed along N
    notes = []
    if bits != b:
        notes.append(f"{b}-bit codes written as {bits}-bit")
    if repeat != 1:
        notes.append(f"groups of {gw} written as {scheme['group_size']} (K={k} is not a multiple of {gw}; scales repeated)")
    return out, "; ".join(notes)


def decompress_layer(tensors: dict[str, torch.Tensor], scheme: dict) -> torch.Tensor:
    """What compressed-tensors computes from `compress_layer`'s tensors: fp32 [N, K] w = (q' - zp) * s."""
    n, k = (int(v) for v in tensors["weight_shape"])
    bits = scheme["num_bits"]
    offset = 1 << (bits - 1)
    levels = unpack_int32(tensors["weight_packed"], bits, k) - offset  # [N, K]
    scale = tensors["weight_scale"].float()  # [N, G]
    width = k if scheme["group_size"] is None else scheme["group_size"]
    zp = torch.zeros_like(scale)
    if "weight_zero_point" in tensors:
        zp = (unpack_int32(tensors["weight_zero_point"].T.contiguous(), bits, n).T - offset).float()  # [N, G]
    return (levels.float() - zp.repeat_interleave(width, dim=1)) * scale.repeat_interleave(width, dim=1)


def export_compressed_tensors(packed_dir: Path, out: Path, *, packed: PackedModel | None = None) -> ExportReport:
    """Write the packed model at packed_dir as a compressed-tensors pack-quantized folder at `out`
    (absent or empty): config.json with quantization_config, model.safetensors, the tokenizer files.

    Raises UnsupportedArchitecture (not llama/mistral/qwen2) and ExportError (output not a new or empty folder).
    """
    out = check_output_dir(out)
    packed_dir = Path(packed_dir)
    packed = packed if packed is not None else load_packed(packed_dir)
    model_type = packed.hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"compressed-tensors export supports {', '.join(SUPPORTED_MODEL_TYPES)}; this model is '{model_type}'"
        )
    tensors: dict[str, torch.Tensor] = {}
    mappings: list[TensorMapping] = []
    groups: dict[str, dict] = {}  # scheme JSON -> config group
    dense: list[str] = []
    for name, t in sorted(packed.layers.items()):
        if isinstance(t, QuantizedTensor) and name != EMBEDDINGS:
            parts, note = compress_layer(t)
            scheme = scheme_of(t)
            err = float((decompress_layer(parts, scheme) - t.dequantize()).abs().max())
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
            key = json.dumps(scheme, sort_keys=True)
            groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None,
                                    "output_activations": None, "format": FORMAT})["targets"].append(name)
            kind = f"int{scheme['num_bits']} {scheme['strategy']}" + (
                f" {scheme['group_size']}" if scheme["group_size"] else "") + (" sym" if t.fmt.symmetric else " asym")
            mappings.append(TensorMapping(f"{name}.weight", name, t.fmt.name, kind, err == 0.0, err, note))
        else:
            tensors[f"{name}.weight"] = _dense(t)
            dense.append(name)
            why = "an embedding" if name == EMBEDDINGS else f"{t.fmt.name} has no pack-quantized form"
            mappings.append(TensorMapping(f"{name}.weight", name, t.fmt.name, "dense float32", True, 0.0,
                                          f"{why}: written dense (not compressed)"))
    for name, t in sorted(packed.kept.items()):
        tensors[name] = t.contiguous()
        mappings.append(TensorMapping(name, name, str(t.dtype).removeprefix("torch."), str(t.dtype).removeprefix("torch."), True, 0.0))
    config = dict(packed.hf_config)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": dense,
        "kv_cache_scheme": None,
    }

    def write(tmp: Path) -> None:
        atomic_save_tensors(tmp / TENSORS_FILE, tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
        for file in _TOKENIZER_FILES:
            if (packed_dir / file).is_file():
                (tmp / file).write_bytes((packed_dir / file).read_bytes())

    publish_dir(out, write)
    return ExportReport(target="compressed-tensors", path=out, architecture=model_type, tensors=tuple(mappings),
                        nbytes=sum(p.stat().st_size for p in out.iterdir()))


def _dense(t: AnyQuantizedTensor) -> torch.Tensor:
    return t.dequantize().float().contiguous()

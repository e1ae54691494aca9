"""Export a packed model to one GGUF file that llama.cpp loads (gguf-py's GGUFWriter).

Each quantized layer goes to the smallest GGML type that holds exactly our dequantized weight,
else to a requantized type of equal or higher precision, and the report says which (per tensor).

Why exact mappings exist. GGML's legacy types cut every row into blocks of QK = 32 weights with
one fp16 scale d per block (ggml-common.h, GGML_QUANT_SIZES):
    Q4_0  w = d * l,       l in -8..7        Q4_1  w = d * q + m,  q in 0..15, fp16 m
    Q5_0  w = d * l,       l in -16..15      Q5_1  w = d * q + m,  q in 0..31, fp16 m
    Q8_0  w = d * l,       l in -128..127
Our uniform formats are w = s * L with one scale per group and an integer level L = q - z
(asymmetric) or q - 2**(b-1) (symmetric). When every 32-block lies inside one group (group size
a multiple of 32, or per channel, and K a multiple of 32) and s is representable in fp16, a block
is (d = s, levels L), which a type holds exactly when L fits its range (the _1 types store
q = L - min L and m = s * min L, exact only when that product is an fp16 number). So w4g32-sym is
Q4_0, w4g32 is Q4_1 or Q5_0, w8g32-sym is Q8_0, and w3g64 fits Q4_0 as well. Every claim of
exactness is checked by decoding the bytes written with gguf.quants.dequantize and comparing them
to our dequantized weight; a layer that fails is requantized and reported as approximate.

llama.cpp's `llama` architecture applies RoPE to interleaved pairs where transformers rotates
halves, so convert_hf_to_gguf.py permutes the rows of q_proj and k_proj; we apply the same row
permutation to the encoded rows, which is exact (rows are only reordered).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tightfit.errors import ExportError, UnsupportedArchitecture
from tightfit.export.common import ExportReport, TensorMapping, check_output_file, publish_file
from tightfit.export.gguf_metadata import add_hyperparameters, add_tokenizer
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.formats.primitives import QuantizedTensor
from tightfit.formats.registry import AnyQuantizedTensor

QK = 32  # weights per block of GGML's legacy types (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0)


# ---- the architecture table ------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one transformers model_type is written: the GGUF architecture and whether q/k rows are permuted."""

    arch_name: str  # gguf.MODEL_ARCH member name: "LLAMA", "QWEN2"
    permute_qk: bool  # llama.cpp's llama graph rotates interleaved pairs (see module docstring)


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LLAMA", permute_qk=True),
    "mistral": GGUFArchitecture("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GGUFArchitecture("QWEN2", permute_qk=False),  # NEOX-style rope: halves, as transformers
}


def gguf_architecture(hf_config: dict) -> GGUFArchitecture:
    model_type = hf_config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))}; this model is '{model_type}'"
        )
    return GGUF_ARCHITECTURES[model_type]


def rope_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp expects for q_proj (n_head) or k_proj (n_kv_head) [n_rows, K].

    convert_hf_to_gguf.py LlamaModel.permute: w.reshape(n_head, 2, rows_per_head // 2, K)
    .swapaxes(1, 2).reshape(w.shape); returned here as indices, permuted = w[perm].
    """
    assert n_rows % (2 * n_head) == 0, f"{n_rows} rows do not split into {n_head} heads of pairs"
    idx = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2)  # [H, 2, D/2]
    return idx.swapaxes(1, 2).reshape(n_rows)


# ---- GGML block encoders: (levels [M, 32] int16, d [M] fp32) -> bytes [M, type_size] ----------


@dataclass(frozen=True)
class BlockType:
    """A GGML legacy type as data: its level range and whether it stores a minimum m (the _1 types)."""

    name: str  # gguf GGMLQuantizationType member name
    level_min: int  # for _1 types: 0, and the range applies to q = L - min L
    level_max: int
    has_min: bool


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[M, 32] values 0..15 -> [M, 16] bytes: element j in the low nibble of byte j, element j+16 in the high one."""
    u = u.astype(np.uint8)
    return (u[:, : QK // 2] & 0x0F) | ((u[:, QK // 2 :] & 0x0F) << 4)


def _high_bits(u: np.ndarray) -> np.ndarray:
    """[M, 32] values 0..31 -> [M, 4] bytes: bit 4 of element j at bit j of a little-endian u32."""
    return np.packbits((u.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


BLOCK_ENCODERS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]] = {
    "Q4_0": lambda lv, d, m: np.concatenate([_fp16_bytes(d), _nibbles(lv + 8)], axis=1),
    "Q4_1": lambda lv, d, m: np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(lv)], axis=1),
    "Q5_0": lambda lv, d, m: np.concatenate([_fp16_bytes(d), _high_bits(lv + 16), _nibbles(lv + 16)], axis=1),
    "Q5_1": lambda lv, d, m: np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _high_bits(lv), _nibbles(lv)], axis=1),
    "Q8_0": lambda lv, d, m: np.concatenate([_fp16_bytes(d), lv.astype(np.int8).view(np.uint8)], axis=1),
}

# Candidates for an exact mapping, fewest bytes per block first (GGML_QUANT_SIZES: 18, 20, 22, 24, 34).
BLOCK_TYPES: tuple[BlockType, ...] = (
    BlockType("Q4_0", -8, 7, has_min=False),
    BlockType("Q4_1", 0, 15, has_min=True),
    BlockType("Q5_0", -16, 15, has_min=False),
    BlockType("Q5_1", 0, 31, has_min=True),
    BlockType("Q8_0", -128, 127, has_min=False),
)
APPROXIMATE_TYPE = "Q8_0"  # requantization target when no type is exact: >= the precision of every format we have
APPROXIMATE_TYPE_RAGGED = "F16"  # ... when K is not a multiple of 32 (no block type can hold the row)


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def decode(data: np.ndarray, type_name: str) -> np.ndarray:
    """Bytes [N, row_bytes] (or F16/F32 [N, K]) of one GGML type -> fp32 [N, K], via gguf.quants."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(data, _qtype(type_name)), dtype=np.float32)


@dataclass(frozen=True)
class Encoded:
    """One tensor as written: data (uint8 [N, row_bytes] for block types, else F16/F32 values), its
    GGML type name, and whether it decodes exactly to our weight (max_abs_error is then 0)."""

    data: np.ndarray
    type_name: str
    exact: bool
    max_abs_error: float
    note: str = ""


def block_levels(q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray] | str:
    """Our weight as GGML blocks: levels [N, K] int16 and one scale per 32-block [N, K/32] fp32,
    or the reason it cannot be cut into single-scale 32-blocks."""
    n, k = q.shape
    gw = q.fmt.group_width(k)
    if k % QK:
        return f"in_features {k} is not a multiple of GGML's 32-weight block"
    if gw % QK:
        return f"groups of {gw} split GGML's 32-weight blocks (one scale per block)"
    offset = (
        torch.tensor(float(1 << (q.fmt.bits - 1)))
        if q.zeros is None
        else q.zeros.repeat_interleave(gw, dim=1)[:, :k]  # [N, K]
    )
    levels = (q.codes.to(torch.float32) - offset).to(torch.int16).numpy()  # [N, K]
    scales = q.scales.repeat_interleave(gw // QK, dim=1)[:, : k // QK].numpy()  # [N, K/32]
    return levels, scales


def _try_block_type(bt: BlockType, levels: np.ndarray, scales: np.ndarray, weight: np.ndarray) -> Encoded | None:
    """Encode (levels, scales) as `bt` if it holds them; None when a level or fp16 field does not fit or the decode differs."""
    n, k = levels.shape
    lv = levels.reshape(-1, QK).astype(np.int32)  # [M, 32]
    d = scales.reshape(-1).astype(np.float32)  # [M]
    m = None
    if bt.has_min:
        low = lv.min(axis=1)  # [M]
        m = d * low.astype(np.float32)  # exact in fp32: 11-bit scale x small integer
        if not np.array_equal(m.astype(np.float16).astype(np.float32), m):
            return None
        lv = lv - low[:, None]
    if lv.min() < bt.level_min or lv.max() > bt.level_max:
        return None
    if not np.array_equal(d.astype(np.float16).astype(np.float32), d):
        return None
    data = BLOCK_ENCODERS[bt.name](lv, d, m).reshape(n, -1)  # [N, K/32 * type_size]
    if not np.array_equal(decode(data, bt.name), weight):
        return None
    return Encoded(data, bt.name, exact=True, max_abs_error=0.0)


def _requantize(weight: np.ndarray, type_name: str, note: str) -> Encoded:
    from gguf.quants import quantize

    data = np.ascontiguousarray(quantize(weight, _qtype(type_name)))
    err = float(np.abs(decode(data, type_name).astype(np.float64) - weight).max())
    return Encoded(data, type_name, exact=err == 0.0, max_abs_error=err, note="" if err == 0.0 else note)


def encode_layer(t: AnyQuantizedTensor) -> Encoded:
    """The smallest GGML type holding t's dequantized weight exactly, else its requantization (see module docstring)."""
    weight = t.dequantize().numpy()  # [N, K] fp32
    if isinstance(t, QuantizedTensor):
        blocks = block_levels(t)
        if isinstance(blocks, str):
            reason = blocks
        else:
            for bt in BLOCK_TYPES:
                encoded = _try_block_type(bt, *blocks, weight)
                if encoded is not None:
                    return encoded
            reason = "levels or scales do not fit any GGML block type exactly" + (
                f" (8-bit asymmetric levels q - z reach +-{(1 << t.fmt.bits) - 1})" if t.fmt.bits == 8 else ""
            )
    else:
        reason = f"{t.fmt.name} has no GGML equivalent"
    f16 = weight.astype(np.float16)
    if np.array_equal(f16.astype(np.float32), weight):
        return Encoded(f16, "F16", exact=True, max_abs_error=0.0, note=f"{reason}; fp16 holds it exactly")
    target = APPROXIMATE_TYPE if weight.shape[1] % QK == 0 else APPROXIMATE_TYPE_RAGGED
    return _requantize(weight, target, f"{reason}; requantized to {target}")


def encode_kept(t: torch.Tensor) -> Encoded:
    """Unquantized tensors keep their values: 1-D (norms, biases) as F32 as llama.cpp expects, 2-D in their storage dtype."""
    if t.dim() == 1 or t.dtype == torch.float32:
        return Encoded(t.float().numpy(), "F32", exact=True, max_abs_error=0.0)
    if t.dtype == torch.float16:
        return Encoded(t.numpy(), "F16", exact=True, max_abs_error=0.0)
    if t.dtype == torch.bfloat16:  # numpy has no bf16: its 16-bit patterns are GGML's BF16 bytes
        return Encoded(t.view(torch.int16).numpy().view(np.uint8), "BF16", exact=True, max_abs_error=0.0)
    raise ExportError(f"cannot write a {t.dtype} tensor to GGUF")


# ---- the export --------------------------------------------------------------------------------


def _permutations(cfg: dict, arch: GGUFArchitecture) -> dict[str, np.ndarray]:
    """Projection name suffix -> row permutation, for the architectures whose q/k rows llama.cpp permutes."""
    if not arch.permute_qk:
        return {}
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    return {"self_attn.q_proj": rope_row_permutation(n_head * head_dim, n_head),
            "self_attn.k_proj": rope_row_permutation(n_kv * head_dim, n_kv)}


def _permuted(name: str, encoded: Encoded, perms: dict[str, np.ndarray]) -> Encoded:
    module = name.rsplit(".", 1)[0]
    for suffix, perm in perms.items():
        if module.endswith(suffix):
            return Encoded(encoded.data[perm], encoded.type_name, encoded.exact, encoded.max_abs_error, encoded.note)
    return encoded


def _ftype(types: list[str]) -> int:
    """general.file_type: the type of most quantized weights (llama.cpp prints it; it does not read tensors by it)."""
    import gguf

    common = Counter(types).most_common(1)[0][0] if types else "F32"
    if common == "F32":  # ALL_F32 is 0: test for it by name, not by truth value
        return gguf.LlamaFileType.ALL_F32
    return gguf.LlamaFileType[f"MOSTLY_{common}"]


def export_gguf(packed_dir: Path, out: Path, *, packed: PackedModel | None = None) -> ExportReport:
    """Write the packed model at packed_dir (tokenizer included) as one GGUF file at `out`.

    packed: the model at packed_dir if the caller already loaded it.
    Raises UnsupportedArchitecture (not llama/mistral/qwen2) and ExportError (unusable output path,
    tokenizer or RoPE variant GGUF cannot carry, a tensor with no GGUF name).
    """
    import gguf

    out = check_output_file(out)
    packed_dir = Path(packed_dir)
    packed = packed if packed is not None else load_packed(packed_dir)
    cfg = packed.hf_config
    arch = gguf_architecture(cfg)
    model_arch = gguf.MODEL_ARCH[arch.arch_name]
    names = gguf.get_tensor_name_map(model_arch, cfg["num_hidden_layers"])
    perms = _permutations(cfg, arch)

    def gguf_name(name: str) -> str:
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(f"tensor {name} has no GGUF name in llama.cpp's {arch.arch_name.lower()} architecture")
        return mapped

    written: list[tuple[str, Encoded, TensorMapping]] = []
    for layer, t in sorted(packed.layers.items()):
        name = f"{layer}.weight"
        enc = _permuted(name, encode_layer(t), perms)
        written.append((gguf_name(name), enc, TensorMapping(name, gguf_name(name), t.fmt.name, enc.type_name,
                                                            enc.exact, enc.max_abs_error, enc.note)))
    for name, t in sorted(packed.kept.items()):
        enc = _permuted(name, encode_kept(t), perms)
        source = str(t.dtype).removeprefix("torch.")
        written.append((gguf_name(name), enc, TensorMapping(name, gguf_name(name), source, enc.type_name, True, 0.0)))
    # A head tied to the embeddings is not written: llama.cpp reuses token_embd when `output` is absent.

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
        writer.add_name(str(packed.info.get("source", {}).get("name", packed_dir.name)))
        add_hyperparameters(writer, cfg)
        writer.add_file_type(_ftype([m.target_type for _, _, m in written if m.name[:-len(".weight")] in packed.layers]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, packed_dir, cfg["vocab_size"])
        for target_name, enc, _ in written:
            raw = None if enc.type_name in ("F32", "F16") else _qtype(enc.type_name)
            writer.add_tensor(target_name, enc.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    publish_file(out, write)
    return ExportReport(target="gguf", path=out, architecture=gguf.MODEL_ARCH_NAMES[model_arch],
                        tensors=tuple(m for _, _, m in written), nbytes=out.stat().st_size)

"""GGUF metadata of a packed model: llama.cpp's hyperparameter keys and the byte-level BPE tokenizer
(tokenizer.json -> tokenizer.ggml.*), for export/gguf.py, which writes the tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tightfit.errors import ExportError


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type != "default":
        raise ExportError(f"GGUF export supports the default RoPE only; this model uses rope_type '{rope_type}'")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def add_hyperparameters(writer, cfg: dict) -> None:
    hidden, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])


# Pre-tokenizers of byte-level BPE tokenizers (tokenizer.json) -> llama.cpp's tokenizer.ggml.pre names
# (llama-vocab.cpp). A Split regex is matched verbatim.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS: dict[str, str] = {
    "bytelevel": "gpt-2",  # GPT-2's regex inside ByteLevel
    "digits+bytelevel": "smollm",  # each digit apart, then GPT-2's regex
    f"split:{_LLAMA3_SPLIT}+bytelevel-noregex": "llama-bpe",
    f"split:{_QWEN2_SPLIT}+bytelevel-noregex": "qwen2",
}


def _pre_tokenizer_key(pre: dict | None) -> str:
    """A canonical string for a tokenizer.json pre_tokenizer (the keys of PRE_TOKENIZERS)."""
    if pre is None:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "+".join(_pre_tokenizer_key(p) for p in pre.get("pretokenizers", []))
    if kind == "ByteLevel":
        return "bytelevel" if pre.get("use_regex", True) else "bytelevel-noregex"
    if kind == "Digits":
        return "digits" if pre.get("individual_digits") else "digits-grouped"
    if kind == "Split":
        return f"split:{(pre.get('pattern') or {}).get('Regex', '?')}"
    return str(kind)


def add_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    """A GPT-2-style byte-level BPE tokenizer from the packed folder's tokenizer.json (+ tokenizer_config.json,
    chat template) -> tokenizer.ggml.* keys: model "gpt2", pre, tokens, token types, merges, special ids."""
    import gguf

    path = folder / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"GGUF export needs the tokenizer: cannot read {path} ({e})") from e
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; {path} has a "
            f"{model.get('type')} model with a {(tok.get('decoder') or {}).get('type')} decoder"
        )
    pre_key = _pre_tokenizer_key(tok.get("pre_tokenizer"))
    if pre_key not in PRE_TOKENIZERS:
        raise ExportError(f"GGUF export does not know llama.cpp's name for the pre-tokenizer {pre_key[:80]!r} of {path}")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:  # the model's vocab is larger than the tokenizer's: padding rows
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[pre_key])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")  # it logs what it skips (e.g. a pair template's separator) as warnings
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    finally:
        vocab_log.setLevel(level)

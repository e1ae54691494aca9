"""Tiny models and text for the tests, as plain functions and constants (no fixtures).

Tests import these from here, never from `conftest`: several test folders have a conftest.py of
their own, so the module name `conftest` is ambiguous. Nothing here touches the network. The
tokenizer is a byte-level BPE trained in milliseconds on generated text; the models are random
transformers models small enough to load in a fraction of a second, with shapes that every group
size up to 64 divides:
    hidden 128, intermediate 256, 2 layers, 4 heads of 32, 2 kv heads, vocab 384 (= the tokenizer's).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

TINY_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma3_text", "phi3")

TINY_VOCAB_SIZE = 384  # 256 byte symbols + 4 specials + 124 merges; a multiple of 64
TINY_SEED = 0

# Config values every tiny model shares; one home for the tiny shapes.
TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
}

# What differs per model_type is data too: extra config values.
TINY_EXTRA_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    # One sliding-window layer and one full-attention layer, with a window short enough that
    # ordinary test sequences cross it.
    "gemma3_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 16,
        "query_pre_attn_scalar": 32,
    },
    "phi3": {"original_max_position_embeddings": 512},
}

_SUBJECTS = ("the cat", "a small dog", "my old friend", "the teacher", "every student", "the river",
             "a quiet town", "the model", "our neighbour", "the red bird", "this machine", "the farmer")
_VERBS = ("sees", "likes", "walks past", "builds", "remembers", "carries", "follows", "paints",
          "finds", "measures", "opens", "writes about")
_OBJECTS = ("the green house", "a long letter", "the morning train", "some warm bread", "the tall tree",
            "a blue boat", "the last page", "an open window", "the heavy box", "a bright lamp")
_ENDINGS = ("every day", "in the evening", "before the rain", "with great care", "near the market",
            "after lunch", "without a word", "at the station", "for a while", "once again")


def tiny_corpus(n_lines: int = 400, seed: int = TINY_SEED) -> list[str]:
    """Deterministic English-like sentences, a few with digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        sentence = sentence[0].upper() + sentence[1:]
        if i % 7 == 0:
            sentence += f", and counts {rng.randint(0, 999)} of them"
        lines.append(sentence + rng.choice((".", ".", "!", "?")))
    return lines


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly TINY_VOCAB_SIZE tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=TINY_SHAPES["max_position_embeddings"],
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    assert len(wrapped) == TINY_VOCAB_SIZE, f"tiny corpus too small: vocab {len(wrapped)}"
    return wrapped


def build_tiny_model(model_type: str, tokenizer: Any, folder: Path) -> Path:
    """Save a random tiny `model_type` causal LM (safetensors, fp32) and `tokenizer` into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_EXTRA_CONFIG:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {', '.join(TINY_MODEL_TYPES)}")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_SHAPES,
        **TINY_EXTRA_CONFIG[model_type],
    )
    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder




def write_tiny_text(path: Path) -> Path:
    """A .txt of tiny-corpus documents (4 sentences each, blank lines between): enough tokens of
    the tiny tokenizer for small calibration sets and a few evaluation windows."""
    lines = tiny_corpus(3000)
    path.write_text("\n\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)))
    return path

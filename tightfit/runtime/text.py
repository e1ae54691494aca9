"""The text side of running a model: its tokenizer, stop ids, prompts, and text that streams out
token by token.

Incremental detokenization follows vLLM/TGI: a token's text is the difference between decoding
a short window with and without it, so SentencePiece word-start spaces and byte-level BPE
characters split across tokens come out right; while the window ends in an incomplete UTF-8
sequence (decoded as U+FFFD) nothing is emitted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tightfit.errors import GenerationError, PackedModelError, native_stderr_held

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # tokens of left context decoded with each new token (enough for any merge)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a packed (or transformers) model folder."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        with native_stderr_held():  # a panic's message from the Rust `tokenizers`
            return AutoTokenizer.from_pretrained(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust `tokenizers` raises Exception, or pyo3's PanicException (a BaseException)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise PackedModelError(f"{path} has no usable tokenizer ({detail})") from e


def eos_token_ids(path: Path, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's eos, and eos_token_id of config.json and
    generation_config.json (an int or a list) where the folder has them."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise PackedModelError(f"{file} is corrupted ({e})") from e
        ids.update(int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return tuple(sorted(ids))


def text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A plain-text prompt as the model saw text in training: with BOS where the tokenizer adds one."""
    return list(tokenizer(text)["input_ids"])


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Messages [{role, content}] through the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this model's tokenizer has no chat template; use plain completions instead")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja raises its own errors for messages a template refuses
        raise GenerationError(f"the chat template rejected the messages: {e}") from e
    # the template writes the special tokens (BOS included) itself
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces whose concatenation equals decoding them all.

    context: ids before the first generated one (the prompt's tail), decoded only as left
    context so that the first piece gets its leading space right.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # ids before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """The text `token_id` adds; '' while it ends in an incomplete character."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character, shown as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class StopStringFilter:
    """Holds back text that could be the start of a stop string, so none of it leaks into a stream.

    `push(piece)` returns the text that is safe to emit; `stopped` turns True once a stop string
    appeared, and the text before it has then been emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        # keep the longest tail that a stop string starts with
        for k in range(min(len(self.pending), self.longest - 1), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                out, self.pending = self.pending[:-k], tail
                return out
        out, self.pending = self.pending, ""
        return out

    def flush(self) -> str:
        """At the end without a stop string: the held-back text was not a stop after all."""
        out, self.pending = self.pending, ""
        return out

"""generate(): streamed pieces join to the decoded text (multi-byte characters, SentencePiece
spaces), stop strings and stop ids end it without leaking, prefix reuse equals a fresh run;
and the `generate` / `chat` commands on a packed tiny model."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from tests.conftest import tiny_corpus
from tightfit.cli import main
from tightfit.errors import GenerationError
from tightfit.runtime.generate import SamplingConfig, generate
from tightfit.runtime.text import (IncrementalDetokenizer, StopStringFilter, chat_prompt_ids, eos_token_ids,
                                   load_tokenizer, text_prompt_ids)
from tightfit.runtime.torch_backend import load_torch_backend

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0)


class ScriptedBackend:
    """A Backend whose next token is always the next id of `script` (a one-hot logit of 10)."""

    def __init__(self, script: Sequence[int], vocab_size: int, max_positions: int = 256) -> None:
        self.script, self.vocab_size, self.max_positions = list(script), vocab_size, max_positions
        self._position = 0
        self.prompt_len = 0

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0

    def truncate(self, n: int) -> None:
        self._position = n

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        if self._position == 0:
            self.prompt_len = len(ids)
        self._position += len(ids)
        logits = torch.zeros(self.vocab_size)
        step = self._position - self.prompt_len
        logits[self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def _sentencepiece_tokenizer() -> Any:
    """A Metaspace (SentencePiece-style, '▁' word starts) BPE tokenizer trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(tiny_corpus(), trainer=trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    for i in range(256):  # byte-fallback pieces are ordinary vocabulary, as in Llama's tokenizer
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _stream_pieces(tokenizer: Any, prompt: list[int], generated: list[int]) -> list[str]:
    d = IncrementalDetokenizer(tokenizer, prompt)
    return [d.add(t) for t in generated] + [d.flush()]


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_detokenizer_pieces_join_to_the_text(kind: str, tiny_tokenizer: Any) -> None:
    tokenizer = tiny_tokenizer if kind == "byte-level" else _sentencepiece_tokenizer()
    prompt_text, text = "The cat sees", " the green house: naïve café, 日本語 🙂 ok."
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    generated = tokenizer(prompt_text + text, add_special_tokens=False)["input_ids"][len(prompt):]
    assert tokenizer.decode(prompt + generated) == prompt_text + text, "tokenizer does not round-trip the test text"
    pieces = _stream_pieces(tokenizer, prompt, generated)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert pieces[0].startswith(" "), f"the first word lost its space: {pieces[:3]}"
    assert sum(1 for p in pieces if p) > 10, "pieces should stream, not arrive at once"
    if kind == "byte-level":  # '日' is 3 bytes: some token holds a partial character and emits nothing
        assert "" in pieces[:-1]


def test_stop_filter_holds_back_only_possible_stops() -> None:
    f = StopStringFilter(("STOP", "\n\n"))
    out = [f.push(c) for c in "aSTb\nc ST"]
    assert "".join(out) == "aSTb\nc " and f.pending == "ST" and not f.stopped
    assert f.push("OP and more") == "" and f.stopped


@pytest.mark.parametrize("stop", ["green", "n h", "e gr", "ee"])
def test_stop_strings_do_not_leak(stop: str, tiny_tokenizer: Any) -> None:
    text = " the green house every day"
    script = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    backend = ScriptedBackend(script, len(tiny_tokenizer))
    prompt = text_prompt_ids(tiny_tokenizer, "The cat sees")
    stream = generate(backend, tiny_tokenizer, prompt, SamplingConfig(max_new_tokens=50, temperature=0, stop=(stop,)))
    pieces = list(stream)
    expected = text[: text.index(stop)]
    assert "".join(pieces) == expected == stream.result.text
    assert stream.result.finish_reason == "stop"
    streamed = ""
    for p in pieces:  # no prefix of the stream ever reached into the stop string
        streamed += p
        assert len(streamed) <= len(expected)
    assert backend.position == len(prompt) + len(stream.result.token_ids) - 1


def test_stop_token_and_eos_end_generation(tiny_tokenizer: Any) -> None:
    words = tiny_tokenizer(" the red bird", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    backend = ScriptedBackend(words + [eos, 5, 6], len(tiny_tokenizer))
    prompt = text_prompt_ids(tiny_tokenizer, "Hi")
    stream = generate(backend, tiny_tokenizer, prompt, SamplingConfig(max_new_tokens=50, temperature=0), eos_token_ids=(eos,))
    assert stream.text() == " the red bird"
    assert stream.result.finish_reason == "stop" and stream.result.token_ids == (*words, eos)
    stream = generate(backend, tiny_tokenizer, prompt, SamplingConfig(max_new_tokens=50, temperature=0, stop_token_ids=(words[1],)))
    assert stream.text() == tiny_tokenizer.decode(words[:1]) and stream.result.completion_tokens == 2
    stream = generate(backend, tiny_tokenizer, prompt, SamplingConfig(max_new_tokens=2, temperature=0))
    assert stream.text() == tiny_tokenizer.decode(words[:2]) and stream.result.finish_reason == "length"


def test_interrupt_ends_like_max_tokens_with_a_valid_cache(tiny_tokenizer: Any) -> None:
    words = tiny_tokenizer(" the red bird flies over the old house", add_special_tokens=False)["input_ids"]
    backend = ScriptedBackend(words, len(tiny_tokenizer))
    prompt = text_prompt_ids(tiny_tokenizer, "Hi")
    asked: list[int] = []
    stream = generate(backend, tiny_tokenizer, prompt, SamplingConfig(max_new_tokens=50, temperature=0),
                      interrupt=lambda: asked.append(1) or len(asked) == 3)  # True after the third token
    assert stream.text() == tiny_tokenizer.decode(words[:3]) and len(asked) == 3
    assert stream.result.finish_reason == "length" and stream.result.token_ids == tuple(words[:3])
    assert backend.position == len(stream.result.cached_ids) == len(prompt) + 2  # reusable by the next request


def test_result_before_the_end_is_an_error(tiny_tokenizer: Any) -> None:
    stream = generate(ScriptedBackend([50], 384), tiny_tokenizer, [1, 2], GREEDY)
    with pytest.raises(RuntimeError, match="once the iterator is exhausted"):
        stream.result


@pytest.fixture(scope="module")
def packed(packed_llama: Path) -> tuple[Any, Any, tuple[int, ...]]:
    tokenizer = load_tokenizer(packed_llama)
    return load_torch_backend(packed_llama, max_positions=64), tokenizer, eos_token_ids(packed_llama, tokenizer)


def test_generate_on_a_tiny_model(packed: tuple) -> None:
    backend, tokenizer, eos = packed
    assert eos == (tokenizer.eos_token_id,)
    prompt = text_prompt_ids(tokenizer, "The cat sees")
    stream = generate(backend, tokenizer, prompt, GREEDY, eos_token_ids=eos)
    pieces = list(stream)
    r = stream.result
    assert "".join(pieces) == r.text
    assert r.completion_tokens == len(r.token_ids) <= 8 and r.prompt_tokens == len(prompt)
    # greedy: every token is the argmax of a full forward of everything before it
    ids = list(prompt)
    for t in r.token_ids:
        with torch.inference_mode():
            assert t == int(backend.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(t)
    assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert r.prefill_seconds > 0 and r.decode_seconds > 0


def test_seeded_generation_reproduces(packed: tuple) -> None:
    backend, tokenizer, eos = packed
    prompt = text_prompt_ids(tokenizer, "A small dog")
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3)
    runs = [generate(backend, tokenizer, prompt, config).text() for _ in range(2)]
    other = generate(backend, tokenizer, prompt, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=4)).text()
    assert runs[0] == runs[1] != other


def test_prefix_reuse_equals_fresh(packed: tuple) -> None:
    backend, tokenizer, eos = packed
    first = generate(backend, tokenizer, text_prompt_ids(tokenizer, "The cat sees"), GREEDY)
    first.text()
    follow = list(first.result.cached_ids) + text_prompt_ids(tokenizer, " the tall tree")[1:]
    reused = generate(backend, tokenizer, follow, GREEDY, cached=first.result.cached_ids)
    reused.text()
    assert reused.result.reused_tokens == len(first.result.cached_ids)
    fresh = generate(backend, tokenizer, follow, GREEDY)
    assert fresh.text() == reused.result.text and fresh.result.token_ids == reused.result.token_ids
    assert fresh.result.reused_tokens == 0


def test_cache_capacity_ends_with_length(packed: tuple) -> None:
    backend, tokenizer, _ = packed
    prompt = list(range(10, 70))  # 60 of 64 positions
    stream = generate(backend, tokenizer, prompt, SamplingConfig(max_new_tokens=50, temperature=0))
    stream.text()
    assert stream.result.finish_reason == "length" and stream.result.completion_tokens == 5
    with pytest.raises(GenerationError, match="the prompt has 65 tokens but the KV cache holds 64"):
        generate(backend, tokenizer, list(range(10, 75)), GREEDY)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generate(backend, tokenizer, [], GREEDY)


# ---- the commands ------------------------------------------------------------------------------


def test_generate_command_streams_the_text(packed_llama: Path, packed: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    backend, tokenizer, eos = packed
    expected = generate(backend, tokenizer, text_prompt_ids(tokenizer, "The cat sees"), GREEDY, eos_token_ids=eos).text()
    rc = main(["generate", str(packed_llama), "The cat sees", "--max-tokens", "8", "--temperature", "0", "--engine", "torch"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == expected + "\n" and expected.strip()
    assert "prompt tokens" in err and "Traceback" not in err


def test_generate_command_refuses_bad_flags(packed_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", str(packed_llama), "x", "--top-p", "2", "--engine", "torch"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1] == "tightfit: error: top_p must lie in (0, 1] (1 = off), got 2.0"


def test_chat_with_piped_stdin(packed_llama: Path, packed: tuple, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    backend, tokenizer, eos = packed

    def reply(messages: list[dict]) -> str:
        return generate(backend, tokenizer, chat_prompt_ids(tokenizer, messages), GREEDY, eos_token_ids=eos).text()

    first = reply([{"role": "user", "content": "hello"}])
    second = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and then?"}])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand then?\n/reset\nhello\n/exit\nnever read\n"))
    rc = main(["chat", str(packed_llama), "--max-tokens", "8", "--temperature", "0", "--engine", "torch"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == f"{first}\n{second}\n{first}\n", out
    assert "new conversation" in err

"""Sampling and the generation loop over any Backend.

    config = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=("\\n\\n",))
    stream = generate(backend, tokenizer, prompt_ids, config, eos_token_ids=eos)
    for piece in stream:        # text as it is produced
        print(piece, end="", flush=True)
    stream.result               # GenerationResult: ids, finish reason, counts, timings

Per token the loop does one backend.forward, one sample_next (a plain argmax when greedy with no
penalty), one incremental decode, and a stop-string check on the new text only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Literal, Protocol, Sequence

import torch

from tightfit.errors import GenerationError
from tightfit.runtime.backend import Backend
from tightfit.runtime.text import IncrementalDetokenizer, StopStringFilter

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, and when generation ends. The one home of these defaults.

    max_new_tokens:     at most this many generated tokens (the cache capacity may end it sooner)
    temperature:        softmax temperature; 0 = greedy (argmax)
    top_k:              sample among the k most likely tokens; 0 = all
    top_p:              nucleus: the smallest set of most likely tokens with probability >= top_p; 1 = all
    repetition_penalty: CTRL (Keskar et al. 2019, eq. in sec. 4.1): logits of tokens already in the
                        prompt or output are divided by it when positive, multiplied when negative; 1 = off
    stop:               strings that end generation; they and what follows are not part of the output
    stop_token_ids:     ids that end generation, besides the model's EOS
    seed:               seed of the sampler's random generator; None = fresh entropy
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def whole(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise GenerationError(f"{name} must be a whole number, got {value!r}")
            return value

        if whole("max_new_tokens", self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if number("temperature", self.temperature) < 0:
            raise GenerationError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if whole("top_k", self.top_k) < 0:
            raise GenerationError(f"top_k must be 0 (off) or a positive number of tokens, got {self.top_k}")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise GenerationError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise GenerationError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise GenerationError(f"stop_token_ids must be a tuple of token ids (whole numbers >= 0), got {self.stop_token_ids!r}")
        if self.seed is not None and whole("seed", self.seed) < 0:
            raise GenerationError(f"seed must be a whole number >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_json(cls, data: dict) -> SamplingConfig:
        if data.get("version", 1) != 1:
            raise GenerationError(f"sampling config version {data.get('version')!r} is not 1")
        return cls(**data | {"stop": tuple(data.get("stop", ())), "stop_token_ids": tuple(data.get("stop_token_ids", ()))})


def penalize_repetition(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the tokens in `history`; a new tensor, `logits` [V] is untouched."""
    out = logits.clone()
    if penalty == 1.0 or len(history) == 0:
        return out
    seen = torch.as_tensor(history, dtype=torch.long)
    picked = out[seen]
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def candidates(logits: torch.Tensor, config: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution of temperature > 0 after top-k and top-p.

    logits: [V] fp32. Returns (weights [M], ids [M] or None when M = V and weights follow the
    vocabulary order); weights are unnormalized probabilities, zero where top-p cut a token.
    Top-k is applied first and top-p within the k kept tokens (as transformers does).
    """
    assert logits.dim() == 1, f"logits must be [V], got {tuple(logits.shape)}"
    scaled = logits / config.temperature
    ids = None
    if 0 < config.top_k < scaled.numel():
        scaled, ids = scaled.topk(config.top_k)  # sorted, most likely first
    elif config.top_p < 1:
        scaled, ids = scaled.sort(descending=True)
    weights = torch.softmax(scaled, dim=0)
    if config.top_p < 1:
        before = weights.cumsum(0) - weights  # probability of the more likely tokens
        weights = weights.masked_fill(before >= config.top_p, 0.0)  # the first always stays: before = 0
    return weights, ids


def sample_next(logits: torch.Tensor, history: Sequence[int], config: SamplingConfig,
                generator: torch.Generator | None) -> int:
    """The next token id from next-token logits [V]; pure (logits are not modified).

    history: ids of the prompt and the output so far (for the repetition penalty).
    generator: the random source when temperature > 0 (unused when greedy).
    """
    if config.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, history, config.repetition_penalty)
    if config.greedy:
        return int(logits.argmax())
    weights, ids = candidates(logits, config)
    choice = torch.multinomial(weights, 1, generator=generator)
    return int(choice) if ids is None else int(ids[choice])


class LogitsMask(Protocol):
    """Constrains generation (e.g. to a JSON schema): bans tokens before each sample, follows each token."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token not allowed next to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance past a sampled, allowed token."""


@dataclass(frozen=True)
class GenerationResult:
    """What one generate() call produced.

    token_ids:    generated ids, the stop token or the tokens that completed a stop string included
    text:         the output text (stop string excluded), equal to the streamed pieces joined
    finish_reason: "stop" (EOS, stop token or stop string) or "length" (max_new_tokens, cache full, or
                  generate()'s `interrupt`)
    cached_ids:   the ids in the backend's cache afterwards (prompt + all generated ids but the last);
                  pass them as `cached` to the next generate() to reuse the common prefix
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cached_ids: tuple[int, ...]

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


class Generation:
    """An iterator of text pieces; `result` is set once it is exhausted."""

    def __init__(self, steps: Generator[str, None, GenerationResult]) -> None:
        self._steps = steps
        self._result: GenerationResult | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        try:
            return next(self._steps)
        except StopIteration as done:  # the loop returns its result
            self._result = done.value
            raise

    def close(self) -> None:
        """Stop early (client gone); the backend's cache then holds an unknown prefix: reset it."""
        self._steps.close()

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("Generation.result is available once the iterator is exhausted")
        return self._result

    def text(self) -> str:
        """Run to the end and return the whole text."""
        for _ in self:
            pass
        return self.result.text


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def generate(backend: Backend, tokenizer: Any, prompt_ids: Sequence[int], config: SamplingConfig, *,
             eos_token_ids: Sequence[int] = (), cached: Sequence[int] | None = None,
             mask: LogitsMask | None = None, interrupt: Callable[[], bool] | None = None) -> Generation:
    """Generate from `prompt_ids` token by token, streaming text pieces.

    eos_token_ids: the model's end ids (text.eos_token_ids); they stop like config.stop_token_ids.
    cached:        the ids the backend's cache holds now (a previous result's cached_ids): the
                   common prefix is kept and only the rest is prefilled. None resets the cache.
    mask:          constrains every sampled token (see LogitsMask).
    interrupt:     asked after every token; True ends the generation there as max_new_tokens would
                   (finish_reason "length", the cache still valid): a deadline, a client gone.
    Raises GenerationError at once for an empty prompt or one the cache cannot hold.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise GenerationError("the prompt is empty: give at least one token")
    if len(prompt) > backend.max_positions:
        raise GenerationError(
            f"the prompt has {len(prompt)} tokens but the KV cache holds {backend.max_positions}; shorten it "
            "or raise max_positions"
        )
    for t in prompt:
        if not 0 <= t < backend.vocab_size:
            raise GenerationError(f"token id {t} is outside the vocabulary (0..{backend.vocab_size - 1})")
    stops = frozenset(config.stop_token_ids) | frozenset(int(t) for t in eos_token_ids)
    return Generation(_run(backend, tokenizer, prompt, config, stops, cached, mask, interrupt or (lambda: False)))


def _run(backend: Backend, tokenizer: Any, prompt: list[int], config: SamplingConfig, stop_ids: frozenset[int],
         cached: Sequence[int] | None, mask: LogitsMask | None,
         interrupt: Callable[[], bool]) -> Generator[str, None, GenerationResult]:
    started = time.perf_counter()
    keep = 0
    if cached is not None and backend.position == len(cached):
        keep = min(common_prefix_length(cached, prompt), len(prompt) - 1)  # forward at least one token
    if keep > 0:
        backend.truncate(keep)
    else:
        backend.reset()
    logits = backend.forward(prompt[keep:])
    prefill_seconds = time.perf_counter() - started
    decode_started = time.perf_counter()

    generator = None
    if not config.greedy:
        generator = torch.Generator()
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
    history = list(prompt)  # prompt + output, for the repetition penalty
    output: list[int] = []
    pieces: list[str] = []
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    stop_filter = StopStringFilter(config.stop)
    finish: FinishReason = "length"
    while True:
        if mask is not None:
            mask.mask(logits)
        token = sample_next(logits, history, config, generator)
        output.append(token)
        if token in stop_ids:
            finish = "stop"
            break
        if mask is not None:
            mask.accept(token)
        piece = stop_filter.push(detokenizer.add(token))
        if piece:
            pieces.append(piece)
            yield piece
        if stop_filter.stopped:
            finish = "stop"
            break
        if len(output) >= config.max_new_tokens or backend.position >= backend.max_positions or interrupt():
            break
        history.append(token)
        logits = backend.forward((token,))
    if not stop_filter.stopped:
        tail = stop_filter.push(detokenizer.flush())
        tail += "" if stop_filter.stopped else stop_filter.flush()
        if stop_filter.stopped:
            finish = "stop"
        if tail:
            pieces.append(tail)
            yield tail
    return GenerationResult(
        token_ids=tuple(output), text="".join(pieces), finish_reason=finish, prompt_tokens=len(prompt),
        completion_tokens=len(output), reused_tokens=keep, prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - decode_started, cached_ids=tuple(prompt + output[:-1]),
    )

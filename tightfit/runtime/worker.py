"""The server's worker: one thread that owns the backend and runs requests one at a time.

Requests wait in arrival order in a queue of at most `max_queue`; a request that finds it full is
refused at once (`submit` returns False). The worker keeps the KV cache of the previous request
and reuses its common prefix (a chat client resending the conversation prefills only the new turn).

Every job carries a deadline and a cancelled flag. A job still waiting can be withdrawn (its client
left, or its deadline passed before it started); a running one is asked after every token and ends
there, like max_tokens, when its client has left or its deadline has passed (finish_reason
"length"). Either way the cache stays valid for the next request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tightfit.errors import GenerationError
from tightfit.runtime.backend import Backend
from tightfit.runtime.generate import generate
from tightfit.runtime.requests import ApiError, CompletionRequest
from tightfit.runtime.text import chat_prompt_ids, text_prompt_ids

QUEUE_TIMEOUT = ApiError(503, "the request's deadline (the server's request timeout) passed while it waited in the queue; "
                              "retry shortly", code="timeout", kind="server_error")
SHUTTING_DOWN = ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")


@dataclass(frozen=True)
class ServedModel:
    """What the server runs: a backend, its tokenizer and end ids, under a public name."""

    name: str
    backend: Backend
    tokenizer: Any
    eos_token_ids: tuple[int, ...]


@dataclass(eq=False)  # a job is itself: the queue finds it by identity
class Job:
    """One request on its way through the worker.

    deadline:  time.monotonic() by which its last token must be out
    events:    ("piece", str)..., then ("done", GenerationResult) or ("error", ApiError)
    cancelled: set by the handler whose client left; the worker stops at the next token
    """

    request: CompletionRequest
    deadline: float
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def interrupted(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() >= self.deadline


class Worker:
    """Owns the backend; runs queued jobs one at a time on its own thread."""

    def __init__(self, model: ServedModel, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model, self.max_queue = model, max_queue
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="tightfit-worker", daemon=True)
        self._cached: tuple[int, ...] | None = None  # ids in the backend's cache, None = unknown
        self._grammars: Any = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the running job at its next token, answer the waiting ones 503, end the thread."""
        with self._changed:
            self._stopping = True
            for job in self._waiting:
                job.events.put(("error", SHUTTING_DOWN))
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when max_queue jobs are already waiting."""
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                return False
            self._waiting.append(job)
            self._changed.notify()
        return True

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue before it starts; False when the worker already has it."""
        with self._changed:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
        return True

    def _next(self) -> Job | None:
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            self._running = None if self._stopping else self._waiting.popleft()
            return self._running

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if job.cancelled.is_set():
                continue
            if time.monotonic() >= job.deadline:  # passed since its handler last looked
                job.events.put(("error", QUEUE_TIMEOUT))
                continue
            try:
                self._serve(job)
            except ApiError as e:
                job.events.put(("error", e))
            except GenerationError as e:
                job.events.put(("error", ApiError(400, str(e))))
            except Exception as e:  # a bug: answer 500, keep serving with a fresh cache
                self._cached = None
                job.events.put(("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")))

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        tokenizer, backend = self.model.tokenizer, self.model.backend
        if request.chat:
            ids = chat_prompt_ids(tokenizer, request.prompt)
        elif isinstance(request.prompt, str):
            ids = text_prompt_ids(tokenizer, request.prompt)
        else:
            ids = list(request.prompt)
            bad = [t for t in ids if not 0 <= t < backend.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{backend.vocab_size - 1})", "prompt")
        if len(ids) > backend.max_positions:
            raise ApiError(400, f"This model's maximum context length is {backend.max_positions} tokens, but the prompt has "
                                f"{len(ids)} tokens; shorten the prompt", "messages" if request.chat else "prompt",
                           "context_length_exceeded")
        return ids

    def _mask(self, request: CompletionRequest) -> Any:
        if request.response_format is None:
            return None
        from tightfit.runtime.grammar import JsonGrammars

        if self._grammars is None:
            self._grammars = JsonGrammars(self.model.tokenizer, self.model.backend.vocab_size, self.model.eos_token_ids)
        if request.response_format["type"] == "json_object":
            return self._grammars.any_json()
        return self._grammars.schema(request.response_format["schema"])

    def _serve(self, job: Job) -> None:
        request = job.request
        ids = self._prompt_ids(request)
        try:
            mask = self._mask(request)
        except GenerationError as e:
            raise ApiError(400, str(e), "response_format") from None
        stream = generate(self.model.backend, self.model.tokenizer, ids, request.sampling,
                          eos_token_ids=self.model.eos_token_ids, cached=self._cached, mask=mask,
                          interrupt=job.interrupted)
        self._cached = None  # until the generation finishes, the cache holds an unknown prefix
        for piece in stream:
            job.events.put(("piece", piece))
        self._cached = stream.result.cached_ids
        job.events.put(("done", stream.result))

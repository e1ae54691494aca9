"""An OpenAI-compatible HTTP server over one Backend (standard library only).

    GET  /v1/models
    POST /v1/completions          {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", ...}
    POST /v1/chat/completions     {"model", "messages", "max_tokens", "response_format", "stream", ...}

One worker thread owns the backend and serves requests one at a time, in arrival order, from a
queue of at most `max_queue` waiting requests; a request that finds the queue full is answered
503 at once. Handler threads only parse, validate and write; all tokenizer and model work runs on
the worker, which also keeps the KV cache of the previous request and reuses its common prefix
(a chat client resending the conversation prefills only the new turn).

Streaming uses Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`. What a
request may hold, and the error shape, are in `requests.py`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from tightfit.errors import GenerationError
from tightfit.runtime.backend import Backend
from tightfit.runtime.generate import Generation, GenerationResult, generate
from tightfit.runtime.requests import ApiError, CompletionRequest, parse_request
from tightfit.runtime.text import chat_prompt_ids, text_prompt_ids

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    """What the server runs: a backend, its tokenizer and end ids, under a public name."""

    name: str
    backend: Backend
    tokenizer: Any
    eos_token_ids: tuple[int, ...]


# ---- the worker --------------------------------------------------------------------------------


@dataclass
class Job:
    """One request on its way through the worker. events carries ("piece", str), then ("done",
    GenerationResult) or ("error", ApiError); cancelled is set by a handler whose client left."""

    request: CompletionRequest
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Owns the backend; runs queued jobs one at a time on its own thread."""

    def __init__(self, model: ServedModel, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model = model
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="tightfit-worker", daemon=True)
        self._cached: tuple[int, ...] | None = None  # ids in the backend's cache, None = unknown
        self._grammars: Any = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.jobs.put(None)  # blocks only while the queue is full, until the worker takes one
            self._thread.join()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
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
        stream: Generation = generate(self.model.backend, self.model.tokenizer, ids, request.sampling,
                                      eos_token_ids=self.model.eos_token_ids, cached=self._cached, mask=mask)
        self._cached = None  # until the generation finishes, the cache holds an unknown prefix
        for piece in stream:
            if job.cancelled.is_set():
                stream.close()
                return
            job.events.put(("piece", piece))
        self._cached = stream.result.cached_ids
        job.events.put(("done", stream.result))


# ---- HTTP --------------------------------------------------------------------------------------


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes
    timeout = 120  # seconds a silent client may hold a handler thread

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    # -- writing

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        self._send_json(error.status, error.body(), headers)

    def _sse(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # -- routes

    def do_GET(self) -> None:
        name = self.server.model.name
        card = {"id": name, "object": "model", "created": self.server.created, "owned_by": "tightfit"}
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif self.path == f"/v1/models/{name}":
            self._send_json(200, card)
        elif self.path == "/health":
            self._send_json(200, {"status": "ok", "queued": self.server.worker.jobs.qsize()})
        else:
            self._send_error(ApiError(404, f"no route GET {self.path}; try GET /v1/models", code="not_found"))

    def do_POST(self) -> None:
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        try:
            if self.path not in routes:
                raise ApiError(404, f"no route POST {self.path}; use /v1/completions or /v1/chat/completions", code="not_found")
            request = parse_request(self._read_json(), self.server.model.name, chat=routes[self.path])
            job = Job(request)
            if not self.server.worker.submit(job):
                raise ApiError(503, f"the server is busy: {self.server.worker.jobs.maxsize} requests are already waiting; "
                                    "retry shortly", code="overloaded", kind="server_error")
        except ApiError as e:
            self._try(lambda: self._send_error(e))
            return
        self._try(lambda: self._answer(job), job)

    def _try(self, write: Callable[[], None], job: Job | None = None) -> None:
        """Write a response; a client that went away cancels its job instead of raising."""
        try:
            write()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            if job is not None:
                job.cancelled.set()
            self.close_connection = True

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _answer(self, job: Job) -> None:
        request = job.request
        kind, value = job.events.get()
        if kind == "error":
            self._send_error(value)
            return
        ident = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": self.server.model.name}
        if request.stream:
            self._stream(job, head, kind, value)
            return
        pieces = []
        while kind == "piece":
            pieces.append(value)
            kind, value = job.events.get()
        if kind == "error":
            self._send_error(value)
            return
        result: GenerationResult = value
        text = "".join(pieces)
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
            body = head | {"object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
            body = head | {"object": "text_completion", "choices": [choice]}
        self._send_json(200, body | {"usage": _usage(result)})

    def _stream(self, job: Job, head: dict, kind: str, value: Any) -> None:
        chat = job.request.chat
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return head | {"choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if chat:
            self._sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]})
        while kind == "piece":
            self._sse(chunk(value, None))
            kind, value = job.events.get()
        if kind == "error":  # headers are out: report in the stream, as OpenAI does
            self._sse(value.body())
        else:
            self._sse(chunk(None, value.finish_reason))
            if job.request.include_usage:
                self._sse(head | {"choices": [], "usage": _usage(value)})
        self._sse("[DONE]")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: ServedModel, worker: Worker, log: Callable[[str], None]) -> None:
        self.model, self.worker, self.log = model, worker, log
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # a client that went away is not the server's problem
        self.log(f"error serving {client_address}: {type(error).__name__}: {error}")


class OpenAIServer:
    """The HTTP server and its worker. `serve_forever()` blocks; `start()` serves on a thread."""

    def __init__(self, model: ServedModel, *, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 8,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.worker = Worker(model, max_queue)
        self.httpd = _HTTPServer((host, port), model, self.worker, log)
        self._serving = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        self.worker.start()
        self._serving.set()
        self.httpd.serve_forever()

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="tightfit-http", daemon=True).start()

    def close(self) -> None:
        if self._serving.is_set():
            self.httpd.shutdown()
        self.httpd.server_close()
        self.worker.stop()

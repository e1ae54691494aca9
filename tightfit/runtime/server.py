"""An OpenAI-compatible HTTP server over one Backend (standard library only).

    GET  /v1/models
    GET  /health                  {"status", "waiting", "connections", "requests": {outcome: count}}
    POST /v1/completions          {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", ...}
    POST /v1/chat/completions     {"model", "messages", "max_tokens", "response_format", "stream", ...}

One worker thread owns the backend and serves requests one at a time (worker.py); handler threads
only parse, validate and write. Under load (ServerLimits):
  - at most `max_connections` connections are open; one more is answered 429 with Retry-After by
    the accepting thread, with no thread of its own;
  - at most `max_queue` requests wait; one more is answered 503 with Retry-After;
  - a request has `request_timeout` seconds from arrival to its last token: one still waiting then
    is answered 503 (code "timeout"), one running ends where it is, as max_tokens would
    (finish_reason "length");
  - a client that closes its connection cancels its request, streaming or not: its handler polls the
    socket for EOF while it waits for the worker, and the worker stops at the next token.

Streaming uses Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`. What a
request may hold, and the error shape, are in `requests.py`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from tightfit.runtime.connections import Closer, client_left
from tightfit.runtime.generate import GenerationResult
from tightfit.runtime.requests import ApiError, body_length, decode_body, parse_request
from tightfit.runtime.worker import QUEUE_TIMEOUT, Job, ServedModel, Worker

__all__ = ["OpenAIServer", "ServedModel", "ServerLimits"]

POLL_SECONDS = 0.1  # how often a waiting handler looks for a client that left


@dataclass(frozen=True)
class ServerLimits:
    """How much the server takes on at once; the one home of these defaults.

    max_queue:       requests that may wait while one runs; one more gets 503
    max_connections: open connections; one more gets 429 at once
    request_timeout: seconds from a request's arrival to its last token (see the module docstring)
    read_timeout:    seconds a client may stay silent while it sends its request or reads the answer
    """

    max_queue: int = 8
    max_connections: int = 32
    request_timeout: float = 600.0
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _outcome(error: ApiError) -> str:
    """The /health counter an error answer adds to."""
    if error.code == "timeout":
        return "timed_out"
    if error.status in (429, 503):
        return "rejected"
    return "failed" if error.status >= 500 else "invalid"


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes
    _looked = 0.0  # when _next_event last looked at the client and the deadline

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

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
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        self._send_json(error.status, error.body(), headers)
        self.server.count(_outcome(error))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method), in OpenAI's shape."""
        self.close_connection = True
        self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())
        self.server.count("invalid")

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
            self._send_json(200, self.server.health())
        else:
            self._send_error(ApiError(404, f"no route GET {self.path}; try GET /v1/models", code="not_found"))

    def do_POST(self) -> None:
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        server = self.server
        try:
            if self.path not in routes:
                raise ApiError(404, f"no route POST {self.path}; use /v1/completions or /v1/chat/completions", code="not_found")
            body = decode_body(self.rfile.read(body_length(self.headers.get("Content-Length"))))
            request = parse_request(body, server.model.name, chat=routes[self.path], context=server.model.backend.max_positions)
            job = Job(request, deadline=time.monotonic() + server.limits.request_timeout)
            if not server.worker.submit(job):
                raise ApiError(503, f"the server is busy: {server.limits.max_queue} requests are already waiting; "
                                    "retry shortly", code="overloaded", kind="server_error")
        except ApiError as e:
            self._try(lambda: self._send_error(e))
            return
        except OSError:  # the body never came whole (the client left or stalled): nobody to answer
            server.count("cancelled")
            raise
        except Exception as e:  # a bug: still an answer, in OpenAI's shape
            server.log(f"error parsing a request: {type(e).__name__}: {e}")
            self._try(lambda: self._send_error(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")))
            return
        self._try(lambda: self._answer(job), job)

    def _try(self, write: Callable[[], None], job: Job | None = None) -> None:
        """Write a response; a client that went away cancels its job instead of raising."""
        try:
            write()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            if job is not None:
                job.cancelled.set()
                self.server.worker.withdraw(job)
            self.server.count("cancelled")
            self.close_connection = True

    # -- waiting for the worker

    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The worker's next event for job. Every POLL_SECONDS, events flowing or not, it looks for a client
        that left (raises ConnectionAbortedError) and a deadline passed in the queue (answers 503). A handler
        waits at most twice the request timeout."""
        timeout = self.server.limits.request_timeout
        while True:
            now = time.monotonic()
            if now >= self._looked + POLL_SECONDS:
                self._looked = now
                if client_left(self.connection):
                    raise ConnectionAbortedError("the client closed the connection")
                if now >= job.deadline and self.server.worker.withdraw(job):
                    return "error", QUEUE_TIMEOUT
                if now >= job.deadline + timeout:  # the worker is stuck inside one token
                    job.cancelled.set()
                    return "error", ApiError(503, f"the request did not finish within twice the server's request "
                                                  f"timeout ({timeout:g} s)", code="timeout", kind="server_error")
            try:
                return job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                pass

    # -- answers

    def _answer(self, job: Job) -> None:
        request = job.request
        kind, value = self._next_event(job)
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
            kind, value = self._next_event(job)
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
        self.server.count("completed")

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
            kind, value = self._next_event(job)
        if kind == "error":  # headers are out: report in the stream, as OpenAI does
            self._sse(value.body())
            outcome = _outcome(value)
        else:
            self._sse(chunk(None, value.finish_reason))
            if job.request.include_usage:
                self._sse(head | {"choices": [], "usage": _usage(value)})
            outcome = "completed"
        self._sse("[DONE]")
        self.server.count(outcome)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: ServedModel, worker: Worker, limits: ServerLimits,
                 log: Callable[[str], None]) -> None:
        self.model, self.worker, self.limits, self.log = model, worker, limits, log
        self.created = int(time.time())
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._open = 0
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        too_many = ApiError(429, f"the server has {limits.max_connections} connections open, its limit; retry shortly",
                            code="too_many_connections", kind="server_error")
        data = json.dumps(too_many.body()).encode()
        self._too_many = (f"HTTP/1.0 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                          "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode() + data
        self._closer = Closer(limit=8 * limits.max_connections)
        super().__init__(address, _Handler)

    def count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def health(self) -> dict:
        with self._lock:
            counts, connections = dict(self._counts), self._open
        return {"status": "ok", "waiting": self.worker.waiting, "connections": connections, "requests": counts}

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accepting thread: a handler thread while a connection slot is free, else 429 at once."""
        if not self._slots.acquire(blocking=False):
            self.count("rejected")
            self._closer.close(request, self._too_many)
            return
        with self._lock:
            self._open += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._open -= 1
        self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        self._closer.close(request)

    def server_close(self) -> None:
        super().server_close()
        self._closer.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # a client that went away is not the server's problem
        self.log(f"error serving {client_address}: {type(error).__name__}: {error}")


class OpenAIServer:
    """The HTTP server and its worker. `serve_forever()` blocks; `start()` serves on a thread."""

    def __init__(self, model: ServedModel, *, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits = ServerLimits(), log: Callable[[str], None] = lambda message: None) -> None:
        self.worker = Worker(model, limits.max_queue)
        self.httpd = _HTTPServer((host, port), model, self.worker, limits, log)
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

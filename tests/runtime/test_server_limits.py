"""The server under pressure, each fault of the review as a case: connections beyond the cap get 429
at once with no thread, a request past its deadline ends (running) or gets 503 (still waiting), a
client that leaves cancels its generation whether it streams or not, malformed bodies get 400 in
OpenAI's shape, and both backends answer a KV cache overflow the same way (400, not 500)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest
from http_helpers import NAME, GatedBackend, request

from tightfit.cli import main
from tightfit.errors import GenerationError
from tightfit.runtime.engine import open_backend
from tightfit.runtime.generate import SamplingConfig, generate
from tightfit.runtime.server import OpenAIServer, ServedModel, ServerLimits
from tightfit.runtime.text import text_prompt_ids
from tightfit.runtime.torch_backend import TorchBackend

LONG = 50  # tokens a request asks for: far more than a test lets it produce
PROMPT = "The cat sees"


@pytest.fixture
def serve(served: ServedModel) -> Iterator[Callable[..., tuple[OpenAIServer, GatedBackend]]]:
    """`serve(limits, **wrapper) -> (server, backend)`: a server on port 0 over a GatedBackend of the tiny model."""
    started: list[OpenAIServer] = []

    def make(limits: ServerLimits = ServerLimits(), **wrapper) -> tuple[OpenAIServer, GatedBackend]:
        backend = GatedBackend(wrapper.pop("inner", None) or TorchBackend(served.backend.model, 64), **wrapper)
        srv = OpenAIServer(ServedModel(NAME, backend, served.tokenizer, served.eos_token_ids), port=0, limits=limits)
        srv.start()
        started.append(srv)
        return srv, backend

    yield make
    for srv in started:
        srv.worker.model.backend.gate.set()
        srv.close()


def health(srv: OpenAIServer) -> dict:
    return srv.httpd.health()


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def completion(max_tokens: int = LONG, **extra) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0} | extra


def raw_post(address: tuple[str, int], body: dict) -> socket.socket:
    """A connection that sent one POST /v1/completions and has not read anything yet."""
    data = json.dumps(body).encode()
    s = socket.create_connection(address, timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_the_tiny_model_runs_past_the_tokens_these_tests_allow(served: ServedModel) -> None:
    """Precondition of the deadline and cancellation cases: greedy from PROMPT meets no end token before LONG."""
    ids = text_prompt_ids(served.tokenizer, PROMPT)
    stream = generate(TorchBackend(served.backend.model, 64), served.tokenizer, ids,
                      SamplingConfig(max_new_tokens=LONG, temperature=0), eos_token_ids=served.eos_token_ids)
    stream.text()
    assert stream.result.finish_reason == "length" and stream.result.completion_tokens == LONG


def test_connections_beyond_the_cap_get_429_at_once_without_a_thread(serve) -> None:
    srv, _ = serve(ServerLimits(max_connections=2), open_gate=True)
    idle = [socket.create_connection(srv.address, timeout=10) for _ in range(2)]  # each holds a handler thread
    try:
        wait_for(lambda: health(srv)["connections"] == 2)
        threads = threading.active_count()
        started = time.monotonic()
        for _ in range(5):
            status, headers, body = request(srv, "POST", "/v1/completions", completion(1))
            assert status == 429 and headers["Retry-After"] == "1"
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and "2 connections open" in error["message"]
        assert time.monotonic() - started < 5
        assert threading.active_count() <= threads
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: health(srv)["connections"] == 0)
    status, _, _ = request(srv, "POST", "/v1/completions", completion(1))
    assert status == 200
    assert health(srv)["requests"] == {"rejected": 5, "completed": 1}


def test_a_running_request_ends_at_its_deadline(serve) -> None:
    srv, backend = serve(ServerLimits(request_timeout=0.5), open_gate=True, delay=0.05)
    started = time.monotonic()
    status, _, body = request(srv, "POST", "/v1/completions", completion())
    seconds = time.monotonic() - started
    answer = json.loads(body)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    assert 1 <= answer["usage"]["completion_tokens"] < LONG and seconds < 0.5 + 10 * 0.05
    status, _, body = request(srv, "POST", "/v1/completions", completion(3))  # the cache is still usable
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3


def test_a_request_whose_deadline_passes_in_the_queue_gets_503(serve) -> None:
    srv, backend = serve(ServerLimits(request_timeout=0.5))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(request, srv, "POST", "/v1/completions", completion())
        assert backend.entered.wait(10)
        started = time.monotonic()
        status, headers, body = request(srv, "POST", "/v1/completions", completion())
        assert status == 503 and headers["Retry-After"] == "1" and time.monotonic() - started < 5
        error = json.loads(body)["error"]
        assert error["code"] == "timeout" and "waited in the queue" in error["message"]
        assert srv.worker.waiting == 0  # withdrawn, not left for the worker
        backend.gate.set()
        status, _, body = running.result()
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"
    assert health(srv)["requests"] == {"timed_out": 1, "completed": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_cancels_its_generation(serve, stream: bool) -> None:
    srv, backend = serve(open_gate=True, delay=0.02)
    conn = raw_post(srv.address, completion(stream=stream))
    wait_for(lambda: backend.forwards >= 3)
    conn.close()
    wait_for(lambda: health(srv)["requests"].get("cancelled") == 1, seconds=5)
    stopped = backend.forwards
    time.sleep(0.3)
    assert backend.forwards <= stopped + 1 < LONG  # at most the token under way when the flag was seen
    status, _, body = request(srv, "POST", "/v1/completions", completion(2))
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def test_a_client_that_leaves_while_queued_frees_its_place(serve) -> None:
    srv, backend = serve(ServerLimits(max_queue=1))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(request, srv, "POST", "/v1/completions", completion(2))
        assert backend.entered.wait(10)
        conn = raw_post(srv.address, completion(2))
        wait_for(lambda: srv.worker.waiting == 1)
        conn.close()
        wait_for(lambda: srv.worker.waiting == 0, seconds=5)
        waiting = pool.submit(request, srv, "POST", "/v1/completions", completion(2))  # the place is free again
        wait_for(lambda: srv.worker.waiting == 1)
        backend.gate.set()
        assert running.result()[0] == 200 and waiting.result()[0] == 200
    assert health(srv)["requests"] == {"cancelled": 1, "completed": 2}


MALFORMED = [
    (b'{"model": "tiny", "prompt": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "deep"),  # was no answer at all
    (b'{"model": "tiny", "prompt": "hi", "seed": ' + b"7" * 5000 + b"}", "digits"),  # was a ValueError
    (b'{"model": "tiny", "prompt": "hi", "repetition_penalty": 1' + b"0" * 400 + b"}", "digits"),  # was an OverflowError
    (b'{"model": "tiny", "prompt": "hi", "repetition_penalty": 1e300}', "'repetition_penalty' must lie in"),
    (b'{"model": "tiny", "prompt": "hi", "seed": 100000000000000000000}', "'seed' must be at most"),  # was a 500
    (b'{"model": "tiny", "prompt": "hi", "top_k": 1e3}', "'top_k' must be an integer"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 65}', "'max_tokens' must be at most 64"),
]


@pytest.mark.parametrize("raw, message", MALFORMED, ids=["nesting", "digits", "penalty", "penalty_float", "seed", "top_k", "max_tokens"])
def test_malformed_bodies_get_400_in_openai_shape(serve, raw: bytes, message: str) -> None:
    srv, _ = serve(open_gate=True)
    status, _, body = request(srv, "POST", "/v1/completions", raw=raw)
    error = json.loads(body)["error"]
    assert status == 400 and message in error["message"] and error["type"] == "invalid_request_error"
    assert request(srv, "POST", "/v1/completions", completion(1))[0] == 200


@pytest.mark.parametrize("head, status, message", [
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400, "Content-Length header must be a decimal"),
    (b"POST /v1/completions HTTP/1.1\r\n\r\n", 411, "Content-Length header is required"),
    # http.server's own refusals, in OpenAI's shape too
    (b"PUT /v1/models HTTP/1.1\r\n\r\n", 501, "Unsupported method ('PUT')"),
    (b"POST /v1/completions HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
], ids=["content_length", "no_content_length", "method", "header"])
def test_bad_http_framing_gets_a_json_error(serve, head: bytes, status: int, message: str) -> None:
    srv, _ = serve(open_gate=True)
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(head)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(1 << 16), b""))
    status_line, _, body = answer.partition(b"\r\n")
    assert int(status_line.split()[1]) == status
    assert message in json.loads(body.partition(b"\r\n\r\n")[2])["error"]["message"]


@pytest.mark.parametrize("engine", ["torch", "fast"])
def test_both_backends_answer_a_cache_overflow_alike(serve, packed_llama: Path, engine: str) -> None:
    backend = open_backend(packed_llama, engine=engine, max_positions=16)
    assert type(backend).__name__ == {"torch": "TorchBackend", "fast": "FastBackend"}[engine]
    with pytest.raises(GenerationError, match=r"KV cache overflow: 0 cached \+ 17 new tokens > max_positions 16"):
        backend.forward(list(range(17)))
    backend.reset()
    # a backend that claims more room than it has: the overflow happens inside a request
    srv, _ = serve(inner=backend, open_gate=True, max_positions=64)
    status, _, body = request(srv, "POST", "/v1/completions", {"model": NAME, "prompt": list(range(5, 25)), "max_tokens": 2})
    error = json.loads(body)["error"]
    assert status == 400 and "KV cache overflow" in error["message"] and error["type"] == "invalid_request_error"
    assert request(srv, "POST", "/v1/completions", completion(2))[0] == 200


def test_closing_the_server_answers_the_waiting_and_ends_the_running(serve) -> None:
    srv, backend = serve()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(request, srv, "POST", "/v1/completions", completion())
        assert backend.entered.wait(10)
        waiting = pool.submit(request, srv, "POST", "/v1/completions", completion())
        wait_for(lambda: srv.worker.waiting == 1)
        closing = pool.submit(srv.close)
        status, _, body = waiting.result(timeout=10)
        assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
        backend.gate.set()
        status, _, body = running.result(timeout=10)
        closing.result(timeout=10)
    answer = json.loads(body)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] < LONG


@pytest.mark.parametrize("flag, value, message", [
    ("--request-timeout", "0", "expected a positive number of seconds, got 0"),
    ("--request-timeout", "nan", "expected a positive number of seconds, got nan"),
    ("--request-timeout", "soon", "expected a number of seconds, got 'soon'"),
    ("--max-connections", "0", "expected a number >= 1, got 0"),
])
def test_serve_refuses_bad_limits_in_one_line(flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "somewhere", flag, value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"argument {flag}: {message}" in err.splitlines()[-1]

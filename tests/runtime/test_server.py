"""The OpenAI-compatible server, over real HTTP (http.client) against a server on port 0:
answers equal generate() run directly, streams join to the plain answer, bad requests get 4xx
in OpenAI's error shape while the server keeps serving, and a full queue answers 503 at once."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import pytest
from http_helpers import NAME, GatedBackend, request, sse_events

from tightfit.runtime.generate import SamplingConfig, generate
from tightfit.runtime.server import OpenAIServer, ServedModel, ServerLimits
from tightfit.runtime.text import chat_prompt_ids, text_prompt_ids
from tightfit.runtime.torch_backend import TorchBackend

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[OpenAIServer]:
    srv = OpenAIServer(served, port=0)
    srv.start()
    yield srv
    srv.close()


def direct(served: ServedModel, ids: Sequence[int], **sampling: Any) -> Any:
    """generate() on a private cache over the same weights (the server's cache is left alone)."""
    backend = TorchBackend(served.backend.model, served.backend.max_positions)
    config = SamplingConfig(**{"max_new_tokens": MAX_TOKENS, "temperature": 0, **sampling})
    stream = generate(backend, served.tokenizer, ids, config, eos_token_ids=served.eos_token_ids)
    stream.text()
    return stream.result


PROMPTS = ("The cat sees", "A small dog likes", "The river follows", "Every student writes about")


def test_models(server: OpenAIServer) -> None:
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [NAME]


def test_concurrent_completions_match_generate(server: OpenAIServer, served: ServedModel) -> None:
    expected = {p: direct(served, text_prompt_ids(served.tokenizer, p)) for p in PROMPTS}
    assert len({r.text for r in expected.values()}) == len(PROMPTS), "prompts too alike to tell answers apart"

    def ask(prompt: str) -> tuple[int, dict]:
        status, _, body = request(server, "POST", "/v1/completions",
                                  {"model": NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        return status, json.loads(body)

    with ThreadPoolExecutor(4) as pool:
        answers = dict(zip(PROMPTS, pool.map(ask, PROMPTS * 2)))  # 8 requests, 4 at a time
    for prompt, (status, body) in answers.items():
        want = expected[prompt]
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == NAME
        assert body["choices"][0]["text"] == want.text
        assert body["choices"][0]["finish_reason"] == want.finish_reason
        assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.completion_tokens,
                                 "total_tokens": want.prompt_tokens + want.completion_tokens}


def test_chat_completion_matches_generate(server: OpenAIServer, served: ServedModel) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    want = direct(served, chat_prompt_ids(served.tokenizer, messages))
    status, _, body = request(server, "POST", "/v1/chat/completions",
                              {"model": NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert answer["usage"]["completion_tokens"] == want.completion_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_stream_joins_to_the_plain_answer(server: OpenAIServer, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": NAME, "max_tokens": 12, "temperature": 0.9, "seed": 5}
    body |= {"messages": [{"role": "user", "content": "tell me"}]} if chat else {"prompt": "The farmer builds"}
    status, _, plain = request(server, "POST", path, body)
    assert status == 200
    plain = json.loads(plain)
    status, headers, streamed = request(server, "POST", path, body | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    if chat:
        assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        want = plain["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        want = plain["choices"][0]["text"]
    assert text == want and want
    assert len(chunks) > 2, "the answer arrived in one piece: not streamed"
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("/v1/completions", {"model": NAME}, 400, "'prompt' is required", "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "'model' is required", "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "The model 'gpt-4' does not exist; this server serves 'tiny'", "model"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number", "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 3}, 400, r"'temperature' must lie in [0, 2.0]", "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "'top_p' must lie in (0, 1]", "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be at least 1", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false", "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "'n' = 2 is not supported", "n"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ["a"] * 5}, 400, "'stop' must be", "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "frobnicate": 1}, 400, "Unrecognized request argument supplied: frobnicate", "frobnicate"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "token id 99999 is outside the vocabulary", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "cat " * 80}, 400, "maximum context length is 64 tokens", "prompt"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "'messages' is required", "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "'role' is one of", "messages[0]"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "content must be a string", "messages[0].content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
     400, "'response_format.type' must be", "response_format"),
    ("/v1/embeddings", {"model": NAME}, 404, "no route POST /v1/embeddings", None),
]


@pytest.mark.parametrize("path, body, status, message, param", BAD_REQUESTS)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: OpenAIServer, path: str, body: Any, status: int,
                                                           message: str, param: str | None) -> None:
    raw = body if isinstance(body, bytes) else None
    got, headers, answer = request(server, "POST", path, None if raw else body, raw=raw)
    error = json.loads(answer)["error"]
    assert got == status, error
    assert message in error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    status, _, _ = request(server, "POST", "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 1})
    assert status == 200


def test_client_that_leaves_mid_stream(server: OpenAIServer) -> None:
    body = json.dumps({"model": NAME, "prompt": "The cat", "max_tokens": 50, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert s.recv(12) == b"HTTP/1.0 200"
    status, _, answer = request(server, "POST", "/v1/completions", {"model": NAME, "prompt": "still there?", "max_tokens": 2})
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] >= 1


def test_json_schema_response_format(server: OpenAIServer) -> None:
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    status, _, body = request(server, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": "answer in JSON"}], "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}})
    assert status == 200, body
    answer = json.loads(body)
    value = json.loads(answer["choices"][0]["message"]["content"])
    assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3) and set(value) == {"ok", "n"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    status, _, body = request(server, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}})
    assert status == 400 and "JSON schema cannot be used" in json.loads(body)["error"]["message"]


def test_full_queue_answers_503_at_once(served: ServedModel) -> None:
    gated = GatedBackend(TorchBackend(served.backend.model, 64))
    srv = OpenAIServer(ServedModel(NAME, gated, served.tokenizer, served.eos_token_ids), port=0, limits=ServerLimits(max_queue=1))
    srv.start()
    body = {"model": NAME, "prompt": "The cat", "max_tokens": 2, "temperature": 0}
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(request, srv, "POST", "/v1/completions", body)
            assert gated.entered.wait(10)
            waiting = pool.submit(request, srv, "POST", "/v1/completions", body)
            deadline = time.monotonic() + 10
            while srv.worker.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            status, headers, answer = request(srv, "POST", "/v1/completions", body)
            assert time.monotonic() - started < 2
            assert status == 503 and headers["Retry-After"] == "1"
            error = json.loads(answer)["error"]
            assert error["code"] == "overloaded" and "1 requests are already waiting" in error["message"]
            gated.gate.set()
            assert running.result()[0] == 200 and waiting.result()[0] == 200
    finally:
        gated.gate.set()
        srv.close()

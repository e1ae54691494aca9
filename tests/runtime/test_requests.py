"""Request bodies (runtime/requests.py) without a server: every malformed body or out-of-bounds field
is a 4xx ApiError in OpenAI's shape, never another exception; the faults found in review each have
a case here, and seeded random bodies and byte mutations check the rest."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from tightfit.runtime.generate import SamplingConfig
from tightfit.runtime.requests import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MAX_BODY_BYTES,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOP_K,
    ApiError,
    CompletionRequest,
    body_length,
    decode_body,
    parse_request,
)

NAME = "tiny"
CONTEXT = 64


def parse(body: Any, chat: bool = False) -> CompletionRequest:
    return parse_request(body, NAME, chat=chat, context=CONTEXT)


def refused(body: Any, chat: bool = False) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body, chat)
    assert 400 <= caught.value.status < 500
    return caught.value


@pytest.mark.parametrize("header, status, message", [
    (None, 411, "Content-Length header is required"),
    ("²", 400, "must be a decimal byte count, got '²'"),  # str.isdigit() says yes; int() says no
    ("-5", 400, "must be a decimal byte count"),
    ("1e3", 400, "must be a decimal byte count"),
    ("9" * 40, 400, "must be a decimal byte count"),
    (str(MAX_BODY_BYTES + 1), 413, f"the limit is {MAX_BODY_BYTES}"),
])
def test_bad_content_length(header: str | None, status: int, message: str) -> None:
    with pytest.raises(ApiError, match=re.escape(message)) as caught:
        body_length(header)
    assert caught.value.status == status
    assert body_length(" 17 ") == 17 and body_length(str(MAX_BODY_BYTES)) == MAX_BODY_BYTES


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, f"more than {MAX_JSON_DEPTH} deep"),  # RecursionError inside json
    (b'{"a": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", f"more than {MAX_JSON_DEPTH} deep"),
    (b'{"seed": ' + b"9" * 5000 + b"}", f"digits (at most {MAX_INT_DIGITS})"),  # int() refuses > 4300 digits
    (b'{"seed": -' + b"9" * (MAX_INT_DIGITS + 1) + b"}", f"digits (at most {MAX_INT_DIGITS})"),
    (b'{"temperature": 1e400}', "out of range"),
    (b'{"temperature": NaN}', "NaN is not a JSON number"),
    (b'{"top_p": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "\xff\xfe"}', "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_malformed_bodies_are_400(raw: bytes, message: str) -> None:
    with pytest.raises(ApiError, match=re.escape(message)) as caught:
        decode_body(raw)
    assert caught.value.status == 400 and caught.value.body()["error"]["type"] == "invalid_request_error"


def test_bodies_within_the_limits_decode() -> None:
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert decode_body(f'{{"a": 1.5, "b": {nested[1:-1]}}}'.encode())["a"] == 1.5
    assert decode_body(b'{"seed": ' + b"9" * MAX_INT_DIGITS + b"}")["seed"] == int("9" * MAX_INT_DIGITS)


BASE = {"model": NAME, "prompt": "hi"}


@pytest.mark.parametrize("field, value, message", [
    ("repetition_penalty", 10**400, f"'repetition_penalty' must lie in (0, {MAX_REPETITION_PENALTY}]"),  # was OverflowError
    ("repetition_penalty", MAX_REPETITION_PENALTY * 2, "must lie in"),
    ("repetition_penalty", 0, "must lie in"),
    ("temperature", float("nan"), "'temperature' must be a number"),
    ("temperature", float("inf"), "'temperature' must be a number"),
    ("temperature", 10**400, "'temperature' must lie in [0, 2.0]"),
    ("top_p", -(10**400), "'top_p' must lie in (0, 1]"),
    ("seed", MAX_SEED + 1, f"'seed' must be at most {MAX_SEED}"),  # was a 500 from torch's manual_seed
    ("seed", 10**30, "'seed' must be at most"),
    ("seed", -1, "'seed' must be at least 0"),
    ("seed", 1.5, "'seed' must be an integer"),
    ("max_tokens", CONTEXT + 1, f"'max_tokens' must be at most {CONTEXT}"),
    ("max_tokens", 10**30, "'max_tokens' must be at most"),
    ("top_k", MAX_TOP_K + 1, f"'top_k' must be at most {MAX_TOP_K}"),
    ("top_k", -1, "'top_k' must be at least 0"),
    ("top_k", "5", "'top_k' must be an integer"),
    ("temperature", [1], "'temperature' must be a number"),
    ("stream", 1, "'stream' must be true or false"),
    ("user", {"a": 1}, "'user' must be a string"),
    ("n", "x" * 500, "'n' = \"xxxx"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "-")
def test_every_numeric_field_is_bounded_and_typed(field: str, value: Any, message: str) -> None:
    error = refused(BASE | {field: value})
    assert error.status == 400 and error.param == field
    assert message in error.message and len(error.message) < 200


def test_chat_max_completion_tokens_is_bounded() -> None:
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CONTEXT + 1}
    assert refused(body, chat=True).param == "max_completion_tokens"


def test_the_bounds_themselves_are_accepted() -> None:
    request = parse(BASE | {"seed": MAX_SEED, "max_tokens": CONTEXT, "top_k": MAX_TOP_K, "temperature": 2,
                            "repetition_penalty": MAX_REPETITION_PENALTY, "top_p": 1})
    assert request.sampling == SamplingConfig(max_new_tokens=CONTEXT, temperature=2.0, top_k=MAX_TOP_K, top_p=1.0,
                                              repetition_penalty=MAX_REPETITION_PENALTY, seed=MAX_SEED)


# ---- seeded random bodies ------------------------------------------------------------------------

ODD_VALUES = [None, True, False, 0, -1, 1, 2**63, -(2**63), 10**39, 0.5, -0.0, 1e308, "", "x", "\u00b2", [], {}, [1],
              [[1]], {"type": "text"}, {"type": "json_schema"}, {"include_usage": 1}, [{"role": "user"}],
              [{"role": "user", "content": [{"type": "text", "text": 1}]}], ["a", ""], [0, -5], {"a": {"b": []}}]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.6 or depth >= 4:
        return rng.choice(ODD_VALUES)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(sorted(CHAT_FIELDS | {"role", "content", "type", "text", "schema"})): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_random_bodies_are_parsed_or_refused_with_4xx() -> None:
    rng = random.Random(15)
    accepted = 0
    for i in range(3000):
        chat = bool(i % 2)
        fields = sorted(CHAT_FIELDS if chat else COMPLETION_FIELDS)
        body: Any = {"model": NAME, "messages" if chat else "prompt":
                     [{"role": "user", "content": "hi"}] if chat else "hi"}
        for name in rng.sample(fields, rng.randrange(1, 5)):
            body[name] = random_value(rng)
        if rng.random() < 0.05:
            body = random_value(rng)
        try:
            parse(body, chat)
            accepted += 1
        except ApiError as e:
            assert 400 <= e.status < 500, (body, e.message)
            json.dumps(e.body())
    assert 0 < accepted < 3000  # both paths were taken


def test_mutated_bytes_are_decoded_or_refused_with_400() -> None:
    rng = random.Random(4)
    valid = json.dumps(BASE | {"max_tokens": 8, "stop": ["\n"], "seed": 3, "temperature": 0.5}).encode()
    for _ in range(3000):
        raw = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(raw) + 1)
            choice = rng.random()
            if choice < 0.4 and raw:
                raw[min(at, len(raw) - 1)] = rng.randrange(256)
            elif choice < 0.7:
                raw[at:at] = rng.choice([b"[", b"{", b"9" * 50, b"1e999", b"NaN", b"\\u", b'"', b"\xff", b","])
            else:
                del raw[at:at + rng.randrange(1, 8)]
        try:
            body = decode_body(bytes(raw))
        except ApiError as e:
            assert e.status == 400
            continue
        try:
            parse(body)
        except ApiError as e:
            assert 400 <= e.status < 500

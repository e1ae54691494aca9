"""Requests to the OpenAI-compatible server: the body's length and bytes decoded into JSON within
limits, then checked against OpenAI's schema for /v1/completions and /v1/chat/completions and
turned into a typed CompletionRequest, or refused with an ApiError.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}. Any body that is not
well-formed is a 400 before it reaches the model: bad JSON, JSON nested deeper than MAX_JSON_DEPTH,
integers longer than MAX_INT_DIGITS, NaN or infinite numbers, wrong types, and every number
outside its bounds (below). Beyond OpenAI's fields, requests may set `top_k` and
`repetition_penalty`. A missing max_tokens means SamplingConfig's default. Fields that clients
send with their default value (n, echo, logprobs, ...) are accepted with that value only; unknown
fields are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tightfit.errors import GenerationError
from tightfit.runtime.generate import SamplingConfig

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # arrays and objects inside one another; a JSON schema rarely needs 10
MAX_INT_DIGITS = 40  # every integer a request may hold fits in 64 bits (20 digits)
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 100.0  # CTRL's paper uses 1.2; beyond 100 every seen token is already banned
MAX_TOP_K = 2**31 - 1  # any k >= the vocabulary means all tokens
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses, answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def body_length(header: str | None) -> int:
    """The body size from a Content-Length header: 411 when missing, 400 unless plain ASCII digits,
    413 beyond MAX_BODY_BYTES."""
    if header is None:
        raise ApiError(411, "a Content-Length header is required")
    if not re.fullmatch(r"[0-9]{1,19}", header.strip()):
        raise ApiError(400, f"the Content-Length header must be a decimal byte count, got {header[:40]!r}")
    length = int(header)
    if length > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    return length


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            todo.extend((x, depth + 1) for x in item if isinstance(x, (list, dict)))
    return deepest


def decode_body(raw: bytes) -> Any:
    """A request body (UTF-8 JSON) decoded, or a 400 naming what is wrong with it."""
    too_deep = ApiError(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep")
    try:
        body = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:  # deeper than the decoder's own stack
        raise too_deep from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the limits above
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    return body


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request. prompt is text, token ids, or chat messages (chat=True)."""

    chat: bool
    prompt: str | tuple[int, ...] | tuple[dict, ...]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    response_format: dict | None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}


def _shown(value: Any) -> str:
    """A request value as JSON, cut short for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise ApiError(400, f"'{name}' must be a number, got {_shown(value)}", name)
    if value < low or value > high or (low_open and value == low):  # exact for ints of any size
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must lie in {bound}, got {_shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {_shown(value)}", name)
    if value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {_shown(value)}", name)
    if value > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {_shown(value)}", name)
    return value


def _only_default(body: dict, name: str, allowed: tuple) -> None:
    """Fields that clients send with their default value; any other value is not supported."""
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"'{name}' = {_shown(body[name])} is not supported by this server "
                            f"(allowed: {', '.join(json.dumps(a) for a in allowed)})", name)


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(items)


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"{where} must be an object whose 'role' is one of {', '.join(CHAT_ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}.content parts must all be {{\"type\": \"text\", \"text\": ...}}", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return tuple(out)


def _response_format(body: dict) -> dict | None:
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON Schema object", "response_format")
        return {"type": "json_schema", "schema": schema}
    raise ApiError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "stream",
                 "stream_options", "n", "frequency_penalty", "presence_penalty", "user", "logit_bias", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "logprobs", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


def parse_request(body: Any, model_name: str, *, chat: bool, context: int) -> CompletionRequest:
    """Validate a decoded JSON body of /v1/completions (chat=False) or /v1/chat/completions.

    context: the model's KV cache capacity in tokens, the most max_tokens may ask for."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a string (see GET /v1/models)", "model")
    if model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model", "model_not_found")
    for name, allowed in (("n", (1, None)), ("frequency_penalty", (0, None)), ("presence_penalty", (0, None)),
                          ("echo", (False, None)), ("best_of", (1, None)), ("logprobs", (None, False)),
                          ("top_logprobs", (None, 0)), ("logit_bias", (None, {})), ("suffix", (None, ""))):
        _only_default(body, name, allowed)
    if "user" in body and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", "user")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' is only allowed with stream: true and must be {\"include_usage\": bool}", "stream_options")

    if chat:
        prompt: Any = _messages(body)
        max_tokens = _integer(body, "max_completion_tokens", 1, context)
        max_tokens = _integer(body, "max_tokens", 1, context) if max_tokens is None else max_tokens
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = tuple(prompt)
        elif not isinstance(prompt, str):
            raise ApiError(400, "'prompt' is required: a string or a non-empty list of token ids (one prompt per request)", "prompt")
        max_tokens = _integer(body, "max_tokens", 1, context)

    defaults = SamplingConfig()
    fields = {
        "max_new_tokens": max_tokens, "temperature": _number(body, "temperature", 0, MAX_TEMPERATURE),
        "top_p": _number(body, "top_p", 0, 1, low_open=True), "top_k": _integer(body, "top_k", 0, MAX_TOP_K),
        "repetition_penalty": _number(body, "repetition_penalty", 0, MAX_REPETITION_PENALTY, low_open=True),
        "seed": _integer(body, "seed", 0, MAX_SEED), "stop": _stop(body),
    }
    try:
        sampling = dataclasses.replace(defaults, **{k: v for k, v in fields.items() if v is not None})
    except GenerationError as e:
        raise ApiError(400, str(e)) from None
    return CompletionRequest(chat=chat, prompt=prompt, sampling=sampling, stream=stream,
                             include_usage=bool(options and options.get("include_usage")),
                             response_format=_response_format(body))

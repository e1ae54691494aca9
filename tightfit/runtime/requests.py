"""Requests to the OpenAI-compatible server: a decoded JSON body checked against OpenAI's schema
for /v1/completions and /v1/chat/completions and turned into a typed CompletionRequest, or refused
with an ApiError.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}. Beyond OpenAI's fields,
requests may set `top_k` and `repetition_penalty`. A missing max_tokens means SamplingConfig's
default. Fields that clients send with their default value (n, echo, logprobs, ...) are accepted
with that value only; unknown fields are refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tightfit.errors import GenerationError
from tightfit.runtime.generate import SamplingConfig

MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses, answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request. prompt is text, token ids, or chat messages (chat=True)."""

    chat: bool
    prompt: str | tuple[int, ...] | tuple[dict, ...]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    response_format: dict | None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must lie in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", name)
    return value


def _only_default(body: dict, name: str, allowed: tuple) -> None:
    """Fields that clients send with their default value; any other value is not supported."""
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"'{name}' = {json.dumps(body[name])} is not supported by this server "
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


def parse_request(body: Any, model_name: str, *, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body of /v1/completions (chat=False) or /v1/chat/completions."""
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
        max_tokens = _integer(body, "max_completion_tokens", 1)
        max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = tuple(prompt)
        elif not isinstance(prompt, str):
            raise ApiError(400, "'prompt' is required: a string or a non-empty list of token ids (one prompt per request)", "prompt")
        max_tokens = _integer(body, "max_tokens", 1)

    defaults = SamplingConfig()
    fields = {
        "max_new_tokens": max_tokens, "temperature": _number(body, "temperature", 0, MAX_TEMPERATURE),
        "top_p": _number(body, "top_p", 0, 1, low_open=True), "top_k": _integer(body, "top_k", 0),
        "repetition_penalty": _number(body, "repetition_penalty", 0, float("inf"), low_open=True),
        "seed": _integer(body, "seed", 0), "stop": _stop(body),
    }
    try:
        sampling = dataclasses.replace(defaults, **{k: v for k, v in fields.items() if v is not None})
    except GenerationError as e:
        raise ApiError(400, str(e)) from None
    return CompletionRequest(chat=chat, prompt=prompt, sampling=sampling, stream=stream,
                             include_usage=bool(options and options.get("include_usage")),
                             response_format=_response_format(body))

"""Shared by the server tests: an HTTP client call, the SSE parser, and a backend wrapper that holds,
slows and counts forwards so requests pile up on cue."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Sequence

import torch

from tightfit.runtime.server import OpenAIServer

NAME = "tiny"


def request(server: OpenAIServer | tuple[str, int], method: str, path: str, body: Any = None, raw: bytes | None = None,
            timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    address = server.address if isinstance(server, OpenAIServer) else server
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} | (headers or {}))
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def sse_events(payload: bytes) -> list[Any]:
    events = []
    for block in payload.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class GatedBackend:
    """Wraps a backend: every forward waits for `gate` (so requests pile up), signals `entered`, sleeps
    `delay` seconds and is counted in `forwards`. `max_positions` may overstate the inner capacity."""

    def __init__(self, inner: Any, *, delay: float = 0.0, open_gate: bool = False, max_positions: int | None = None) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size
        self.max_positions = max_positions or inner.max_positions
        self.gate, self.entered = threading.Event(), threading.Event()
        self.delay, self.forwards = delay, 0
        if open_gate:
            self.gate.set()

    @property
    def position(self) -> int:
        return self.inner.position

    def reset(self) -> None:
        self.inner.reset()

    def truncate(self, n: int) -> None:
        self.inner.truncate(n)

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        time.sleep(self.delay)
        self.forwards += 1
        return self.inner.forward(ids)

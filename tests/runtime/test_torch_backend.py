"""TorchBackend: prefill then token by token gives the logits of one full-sequence forward,
truncate + re-forward equals a fresh cache, and the cache refuses to overflow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL_TYPES, TINY_VOCAB_SIZE
from tightfit.errors import GenerationError
from tightfit.runtime.backend import Backend
from tightfit.runtime.torch_backend import TorchBackend, load_torch_backend

TOL = 1e-4
LENGTH = 24  # longer than gemma3_text's sliding window (16), so the window is crossed


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, TINY_VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _full_logits(backend: TorchBackend, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return backend.model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def backend(request: pytest.FixtureRequest, make_packed: Callable[[str], Path]) -> TorchBackend:
    return load_torch_backend(make_packed(request.param), max_positions=64)


def test_is_a_backend(backend: TorchBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.vocab_size == TINY_VOCAB_SIZE and backend.max_positions == 64


def test_incremental_equals_full_forward(backend: TorchBackend) -> None:
    ids = _ids(LENGTH, seed=0)
    full = _full_logits(backend, ids)
    backend.reset()
    got = [backend.forward(ids[:8])]
    for t in ids[8:]:
        got.append(backend.forward([t]))
    assert backend.position == LENGTH
    incremental = torch.stack(got)  # [T - 7, V]
    assert incremental.shape == (LENGTH - 7, TINY_VOCAB_SIZE) and incremental.dtype == torch.float32
    assert (incremental - full[7:]).abs().max() < TOL
    assert full[7:].std() > 0.01, "logits are flat: the comparison would be vacuous"


def test_truncate_then_forward_equals_fresh(backend: TorchBackend) -> None:
    first, other = _ids(LENGTH, seed=1), _ids(LENGTH, seed=2)
    backend.reset()
    backend.forward(first)
    backend.truncate(10)
    assert backend.position == 10
    resumed = backend.forward(other[10:])
    fresh = _full_logits(backend, first[:10] + other[10:])[-1]
    assert (resumed - fresh).abs().max() < TOL
    assert (resumed - _full_logits(backend, first)[-1]).abs().max() > 1e-2, "continuations do not differ"
    backend.truncate(0)
    assert backend.position == 0
    assert (backend.forward(first) - _full_logits(backend, first)[-1]).abs().max() < TOL


def test_cache_bounds(backend: TorchBackend) -> None:
    backend.reset()
    backend.forward(_ids(60, seed=3))
    with pytest.raises(GenerationError, match=r"KV cache overflow: 60 cached \+ 5 new tokens > max_positions 64"):
        backend.forward(_ids(5, seed=4))
    assert backend.position == 60
    with pytest.raises(ValueError, match=r"truncate\(n\) needs 0 <= n <= position \(60\)"):
        backend.truncate(61)
    assert TorchBackend(backend.model, 10_000).max_positions == TorchBackend(backend.model).max_positions == 512
    with pytest.raises(GenerationError, match=r"max_positions must be a positive number of tokens, got 0"):
        TorchBackend(backend.model, 0)

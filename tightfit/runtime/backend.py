"""The contract between a runnable model and everything that drives it (generation, chat, server, bench).

A backend owns the weights and a KV cache of fixed capacity. Callers feed it token ids and get
the next-token logits back; it never samples, tokenizes or prints.

Two implementations:
    TorchBackend (runtime/torch_backend.py): the transformers model with QuantLinear layers,
        i.e. the dequantized reference; every architecture in the table.
    FastBackend (runtime/engine.py): tightfit's compiled CPU engine (low-bit kernels, one C++
        decode step per token); every architecture in the table too (runtime/engine_config.py),
        within the limits it states (e.g. Phi-3 longrope within its original context).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """A causal LM with its own KV cache.

    vocab_size:    length of the logits vector
    max_positions: capacity of the KV cache in tokens (prompt + generated)
    position:      tokens currently in the cache
    """

    vocab_size: int
    max_positions: int

    @property
    def position(self) -> int: ...

    def reset(self) -> None:
        """Empty the KV cache (position -> 0)."""

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (0 <= n <= position), dropping the rest (prefix reuse)."""

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` (len >= 1) at positions position .. position+len-1 and return the logits
        of the last one: [vocab_size] fp32. Raises GenerationError when the cache would overflow."""

"""TorchBackend: the Backend protocol over the transformers model that `build_model` returns.

The fp32 reference every faster backend is tested against. The KV cache is a transformers
`DynamicCache` of full-attention layers only: sliding-window layers are masked by the model from
its config, but their keys are kept whole, so `truncate` can go back to any position (a
sliding-window cache forgets what it would need to be cropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from tightfit.errors import GenerationError
from tightfit.runtime.model import load_runtime


class TorchBackend:
    """A transformers causal LM (batch 1) with a KV cache of at most `max_positions` tokens.

    model:         from `build_model` (fp32, eval mode); any model whose forward accepts
                   input_ids, position_ids, past_key_values, use_cache and logits_to_keep
    max_positions: cache capacity in tokens; None or more than the model's max_position_embeddings
                   gives max_position_embeddings
    """

    def __init__(self, model: nn.Module, max_positions: int | None = None) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_positions is None or (limit is not None and max_positions > limit):
            max_positions = limit  # positions past the trained context are not offered (FastBackend does the same)
        if max_positions is None or max_positions < 1:
            raise GenerationError(f"max_positions must be a positive number of tokens, got {max_positions}")
        self.model = model
        self.vocab_size: int = model.config.vocab_size
        self.max_positions = max_positions
        self._cache = DynamicCache()
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._cache = DynamicCache()
        self._position = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._position:
            raise ValueError(f"truncate(n) needs 0 <= n <= position ({self._position}), got {n}")
        if n == 0:
            self.reset()
        elif n < self._position:
            self._cache.crop(n - self._position)  # a negative count removes that many tokens
            self._position = n

    @torch.inference_mode()
    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        n = len(ids)
        if n < 1:
            raise ValueError("forward needs at least one token id")
        if self._position + n > self.max_positions:
            raise GenerationError(
                f"KV cache overflow: {self._position} cached + {n} new tokens > max_positions {self.max_positions}"
            )
        input_ids = torch.tensor([list(ids)], dtype=torch.long)  # [1, T]
        position_ids = torch.arange(self._position, self._position + n).unsqueeze(0)  # [1, T]
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self._cache,
                         use_cache=True, logits_to_keep=1)
        self._position += n
        return out.logits[0, -1].float()  # [V]


def load_torch_backend(path: Path, max_positions: int | None = None) -> TorchBackend:
    """TorchBackend over the packed model at `path` (see TorchBackend for max_positions).
    Raises PackedModelError for a missing or damaged folder."""
    model, _ = load_runtime(Path(path))
    return TorchBackend(model, max_positions)

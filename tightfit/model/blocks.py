"""Run a model one decoder block at a time, as sequential quantization needs.

`capture_block_inputs` records, for every block, the keyword arguments the model passes it
(attention masks and position embeddings differ per block in some architectures, e.g. Gemma3's
sliding-window layers) and the hidden states entering the first block. The blocks are replaced
by pass-through recorders for that one call, so nothing but the embeddings is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tightfit.model.architectures import Architecture, get_module

_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


class _StandIn(nn.Module):
    """Takes a block's place in the model; attributes it lacks are read from the block
    (e.g. `attention_type`, which some models read from their layers)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Recorder(_StandIn):
    """Records the block's inputs and passes the hidden states through."""

    def __init__(self, block: nn.Module, calls: list) -> None:
        super().__init__(block)
        self.calls = calls

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class BlockInputs:
    """Inputs of every block for a list of calibration batches.

    hidden: per batch [B, T, C], entering the block about to be processed.
    extra: extra[block][batch] = (args, kwargs) passed to that block besides the hidden states.
    """

    hidden: list[torch.Tensor]
    extra: list[list[tuple[tuple, dict]]]


def block_list(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    blocks = get_module(model, arch.blocks)
    assert isinstance(blocks, nn.ModuleList), type(blocks)
    return blocks


def block_index(arch: Architecture, name: str) -> int:
    """The decoder block a layer belongs to: `model.layers.7.mlp.up_proj` -> 7."""
    return int(name[len(arch.blocks) + 1 :].split(".", 1)[0])


def linear_layer_names(model: nn.Module, arch: Architecture) -> list[str]:
    """Full names of the linear layers of the decoder blocks, block by block: `model.layers.0.self_attn.q_proj`, ..."""
    return [f"{arch.blocks}.{i}.{n}" for i in range(len(block_list(model, arch))) for n in arch.linear_names]


def embedding_layers(model: nn.Module, arch: Architecture) -> list[str]:
    """The token embeddings, and the output head unless it shares the embeddings' weight (tied)."""
    emb, head = get_module(model, arch.embeddings), get_module(model, arch.head)
    return [arch.embeddings] + ([] if head.weight.data_ptr() == emb.weight.data_ptr() else [arch.head])


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Architecture, tokens: torch.Tensor, batch_size: int) -> BlockInputs:
    """tokens [S, T] int64 -> hidden states entering block 0 and the extra inputs of every block."""
    blocks = block_list(model, arch)
    base = get_module(model, arch.blocks.rsplit(".", 1)[0])  # the model without its LM head
    originals = list(blocks)
    calls: list[list] = [[] for _ in originals]
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, calls[i])
    try:
        for start in range(0, tokens.shape[0], batch_size):
            base(input_ids=tokens[start : start + batch_size], use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    hidden = [h for h, _, _ in calls[0]]
    extra = [[(args, kwargs) for _, args, kwargs in per_block] for per_block in calls]
    return BlockInputs(hidden=hidden, extra=extra)


@torch.no_grad()
def last_block_outputs(model: nn.Module, arch: Architecture, tokens: torch.Tensor, batch_size: int,
                       resident: Callable[[int], ContextManager[nn.Module]]) -> list[torch.Tensor]:
    """tokens [S, T] -> the hidden states leaving the last block, per batch of `batch_size`, computed
    block by block: every batch through block 0, then block 1, ... `resident(i)` gives block i with
    its weights in memory (`tightfit.model.resident_block`), so a streamed model reads each once."""
    inputs = capture_block_inputs(model, arch, tokens, batch_size)
    for i in range(len(block_list(model, arch))):
        with resident(i) as block:
            inputs.hidden = [run_block(block, h, inputs.extra[i][b]) for b, h in enumerate(inputs.hidden)]
    return inputs.hidden


def run_block(block: nn.Module, hidden: torch.Tensor, extra: tuple[tuple, dict]) -> torch.Tensor:
    """One block on one batch: [B, T, C] -> [B, T, C]."""
    args, kwargs = extra
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Replay(_StandIn):
    """For a block whose output is already known: returns the cached hidden states."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor) -> None:
        super().__init__(block)
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        assert hidden_states.shape == self.hidden.shape, (hidden_states.shape, self.hidden.shape)
        return self.hidden


@contextmanager
def replay_blocks(model: nn.Module, arch: Architecture, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the context, a forward of `model` skips blocks [0, start) and feeds `hidden`
    ([B, T, C], the cached input of block `start` for the same token ids) to block `start`."""
    blocks = block_list(model, arch)
    originals = list(blocks)
    for i in range(start):
        blocks[i] = _Replay(originals[i], hidden)
    try:
        yield
    finally:
        for i in range(start):
            blocks[i] = originals[i]

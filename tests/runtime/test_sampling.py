"""sample_next and SamplingConfig: greedy is argmax, top-k/top-p keep exactly the right tokens,
the repetition penalty follows CTRL, seeds reproduce, bad settings say what is right."""

from __future__ import annotations

import math

import pytest
import torch

from tightfit.errors import GenerationError
from tightfit.runtime.generate import SamplingConfig, candidates, penalize_repetition, sample_next


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    config = SamplingConfig(temperature=0)
    for _ in range(20):
        logits = torch.randn(384, generator=g)
        assert sample_next(logits, [], config, None) == int(logits.argmax())


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = torch.randn(384, generator=torch.Generator().manual_seed(1))
    config = SamplingConfig(temperature=1.0, top_k=5)
    weights, ids = candidates(logits, config)
    assert set(ids[weights > 0].tolist()) == set(logits.topk(5).indices.tolist())
    g = torch.Generator().manual_seed(2)
    drawn = {sample_next(logits, [], config, g) for _ in range(300)}
    assert drawn <= set(logits.topk(5).indices.tolist()) and len(drawn) > 1


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    logits = _logits([0.5, 0.3, 0.15, 0.05])[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 hold 0.5, 0.3, 0.15, 0.05
    order = [1, 3, 0, 2]
    expected = {order[i] for i in kept}
    config = SamplingConfig(temperature=1.0, top_p=top_p)
    weights, ids = candidates(logits, config)
    got = set(range(4)) if ids is None else set(ids[weights > 0].tolist())
    assert got == expected
    g = torch.Generator().manual_seed(3)
    drawn = {sample_next(logits, [], config, g) for _ in range(400)}
    assert drawn == expected


def test_top_k_then_top_p_renormalizes_within_k() -> None:
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    # within the top 2 the probabilities are 4/7 and 3/7: top_p 0.5 keeps only the first
    weights, ids = candidates(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.5))
    assert ids[weights > 0].tolist() == [0]


def test_temperature_sharpens() -> None:
    logits = _logits([0.6, 0.4])
    hot, _ = candidates(logits, SamplingConfig(temperature=2.0))
    cold, _ = candidates(logits, SamplingConfig(temperature=0.5))
    assert cold[0] > 0.6 > hot[0] > 0.5


def test_repetition_penalty_ctrl() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0])
    out = penalize_repetition(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 3.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, 3.0], "the input was modified"
    # greedy would pick 0 without the penalty, 3 with it
    assert sample_next(torch.tensor([5.0, 0.0, 0.0, 3.0]), [0], SamplingConfig(temperature=0, repetition_penalty=2.0), None) == 3


def test_seeded_sampling_reproduces() -> None:
    logits = torch.randn(384, generator=torch.Generator().manual_seed(4))
    config = SamplingConfig(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, [], config, g) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, r"temperature must be 0 \(greedy\) or more"),
    ("top_p", 0.0, r"top_p must lie in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must lie in \(0, 1\]"),
    ("top_k", -1, r"top_k must be 0 \(off\) or a positive"),
    ("max_new_tokens", 0, r"max_new_tokens must be at least 1"),
    ("repetition_penalty", 0.0, r"repetition_penalty must be positive \(1 = off\)"),
    ("temperature", float("nan"), r"temperature must be a finite number"),
    ("stop", ("",), r"stop must be a tuple of non-empty strings"),
    ("stop", "abc", r"stop must be a tuple"),
    ("stop_token_ids", (-1,), r"stop_token_ids must be a tuple of token ids"),
    ("seed", 1.5, r"seed must be a whole number"),
])
def test_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingConfig(**{field: value})


def test_config_round_trips_json() -> None:
    config = SamplingConfig(max_new_tokens=9, temperature=0.5, top_k=3, top_p=0.9, stop=("\n",), stop_token_ids=(7,), seed=1)
    assert SamplingConfig.from_json(config.to_json()) == config

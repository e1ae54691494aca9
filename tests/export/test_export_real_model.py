"""GGUF export of the real SmolLM2-135M: llama.cpp scores the evaluation windows like tightfit does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tightfit.artifacts import QuantizeConfig
from tightfit.evaluate import EvalConfig, eval_windows, evaluate
from tightfit.export import export_gguf
from tightfit.formats import QuantFormat
from tightfit.formats.packed import load_packed
from tightfit.model import DEFAULT_MODEL
from tightfit.pipeline import CompressRequest, compress
from tightfit.runtime import build_model

N_WINDOWS, CTX = 4, 512


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_tightfit(tmp_path):
    """w4g32-sym maps to Q4_0 exactly, so the two runtimes hold the same weights; what differs is
    arithmetic (llama.cpp quantizes activations to 8 bits per 32 for its Q4_0 matmuls, fp16 KV
    cache). Over 4 x 511 scored tokens that must move perplexity by less than 1 %."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from transformers import AutoTokenizer

    packed_dir = tmp_path / "smollm2-w4g32-sym"
    quantize = QuantizeConfig(fmt=QuantFormat.parse("w4g32-sym"), method="rtn", clip_search=False)
    compress(CompressRequest(model=DEFAULT_MODEL, out=packed_dir, quantize=quantize, evaluation=None, progress=False))
    report = export_gguf(packed_dir, tmp_path / "m.gguf")
    assert {t.target_type for t in report.tensors if t.source_format == "w4g32-sym"} == {"Q4_0"}
    assert not report.approximate

    windows = eval_windows(AutoTokenizer.from_pretrained(packed_dir), EvalConfig(n_windows=N_WINDOWS, ctx=CTX))
    ours = evaluate(build_model(load_packed(packed_dir)), windows, progress=False).ppl

    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=CTX, n_batch=CTX, logits_all=True,
                          n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: CTX - 1], dtype=np.float32))  # [T-1, V]
        nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        n += CTX - 1
    theirs = math.exp(nll / n)
    print(f"perplexity on {N_WINDOWS} x {CTX}: tightfit {ours:.4f}, llama.cpp {theirs:.4f}")
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)

"""Evaluation through the engine that runs a model (tightfit/evaluate.py): the compiled engine
against the torch reference on a tiny packed model, the cached-reference path, `tightfit eval --engine`.

The fast engine quantizes activations to int8 in blocks of 32, so its KL to the original differs
a little from the dequantized torch model's; in its exact mode (fp32 activations) only the fp16 KV
cache and fp32 summation order separate them, so the KL agrees to rounding (10^-4 relative here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tightfit.cli import main
from tightfit.evaluate import (
    EvalConfig,
    backend_scorer,
    eval_windows,
    evaluate,
    evaluate_many,
    packed_candidate,
    reference_log_probs,
)
from tightfit.formats.packed import load_packed
from tightfit.model import load_model
from tightfit.runtime import build_model
from tightfit.runtime.engine import FastBackend


@pytest.fixture(scope="module")
def packed_w3(make_tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(source folder, packed folder): the tiny llama in w3g32 RTN, far enough from the source for a clear KL."""
    root = tmp_path_factory.mktemp("evaluate")
    src = make_tiny_model("llama", root)
    rc = main(["compress", str(src), "--format", "w3g32", "--method", "rtn", "--no-eval", "--out", str(root / "packed")])
    assert rc == 0
    return src, root / "packed"


@pytest.fixture(scope="module")
def scored(packed_w3, tiny_text_file):
    """(reference module, windows [4, 64], packed model) for the comparisons below."""
    src, packed_dir = packed_w3
    loaded = load_model(str(src))
    windows = eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=4, ctx=64))
    return loaded.model, windows, load_packed(packed_dir)


def test_fast_engine_kl_close_to_torch(scored):
    reference, windows, packed = scored
    models = {engine: packed_candidate(packed, engine, ctx=windows.shape[1]) for engine in ("torch", "fast")}
    got = evaluate_many(models, windows, reference=reference, progress=False)
    torch_kl, fast_kl = got["torch"].kl, got["fast"].kl
    assert torch_kl > 1e-3  # w3 is far enough from the source to measure
    # int8 activations: 1e-4 relative on this tiny random model, a few percent on real ones
    assert abs(fast_kl - torch_kl) < 0.05 * torch_kl, (fast_kl, torch_kl)
    assert got["fast"].top1 > 0.9 * got["torch"].top1
    assert got["fast"].reference_ppl == got["torch"].reference_ppl


def test_exact_engine_kl_equals_torch(scored):
    reference, windows, packed = scored
    exact = packed_candidate(packed, "fast", ctx=windows.shape[1], exact=True)
    got = evaluate_many({"torch": build_model(packed), "exact": exact}, windows, reference=reference, progress=False)
    assert got["exact"].kl == pytest.approx(got["torch"].kl, rel=1e-3)
    assert got["exact"].ppl == pytest.approx(got["torch"].ppl, rel=1e-4)
    assert got["exact"].top1 == pytest.approx(got["torch"].top1, abs=0.01)  # a near tie may flip one position


def test_backend_scorer_empties_the_cache_per_window(scored):
    _, windows, packed = scored
    backend = FastBackend(packed, max_positions=windows.shape[1])
    score = backend_scorer(backend)
    first = score(windows[0])
    score(windows[1])
    assert first.shape == (windows.shape[1], backend.vocab_size)
    assert torch.equal(score(windows[0]), first)


def test_cached_reference_log_probs_give_the_same_result(scored):
    reference, windows, packed = scored
    model = build_model(packed)
    direct = evaluate(model, windows, reference=reference, progress=False)
    cached = evaluate(model, windows, reference=reference_log_probs(reference, windows, batch_size=3), progress=False)
    assert cached.kl == pytest.approx(direct.kl, rel=1e-6)
    assert (cached.ppl, cached.top1, cached.reference_ppl) == pytest.approx((direct.ppl, direct.top1, direct.reference_ppl), rel=1e-6)


def test_unknown_engine_is_refused(scored):
    with pytest.raises(ValueError, match="engine must be one of torch, fast"):
        packed_candidate(scored[2], "llama.cpp", ctx=64)


def test_cli_eval_engine_flag(packed_w3, tiny_text_file, tmp_path, capsys):
    src, packed_dir = packed_w3
    kl = {}
    for engine in ("torch", "fast"):
        out = tmp_path / f"{engine}.json"
        rc = main(["eval", str(packed_dir), "--against", str(src), "--text", str(tiny_text_file), "--windows", "2",
                   "--ctx", "64", "--engine", engine, "--json", str(out)])
        assert rc == 0
        assert f"scored by the {engine} engine" in capsys.readouterr().out
        d = json.loads(out.read_text())
        assert d["engine"] == engine
        assert json.loads((packed_dir / "eval.json").read_text())["engine"] == engine
        kl[engine] = d["result"]["kl"]
    assert kl["fast"] == pytest.approx(kl["torch"], rel=0.1)


def test_cli_eval_fast_engine_needs_a_packed_model(packed_w3, tiny_text_file, capsys):
    src, _ = packed_w3
    rc = main(["eval", str(src), "--text", str(tiny_text_file), "--windows", "1", "--ctx", "32", "--engine", "fast"])
    assert rc == 2
    assert "the fast engine scores packed models only" in capsys.readouterr().err

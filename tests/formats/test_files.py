"""Durable atomic writes: files and their folder reach the disk (fsync) before and after the rename,
a folder is published in one step, debris of killed writers is cleared, and checked files refuse
any change to their contents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tightfit.errors import CorruptCacheError
from tightfit.formats import files
from tightfit.formats.files import (
    CHECKSUM_KEY,
    atomic_save_tensors,
    atomic_write_json,
    load_checked_json,
    load_checked_tensors,
    publish_folder,
    temp_dir_for,
)

DEAD_PID = 99_999_999  # above Linux's largest pid_max (2^22): never a live process


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths flushed by os.fsync, in order (resolved through /proc/self/fd)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int32),
            "c": torch.randn(4, generator=g).to(torch.bfloat16)}


@pytest.mark.parametrize("write", ["json", "tensors"])
def test_a_file_and_then_its_folder_are_flushed(tmp_path, fsynced, write):
    path = tmp_path / "sub" / "x.bin"
    if write == "json":
        atomic_write_json(path, {"k": 1})
    else:
        atomic_save_tensors(path, _tensors())
    assert len(fsynced) == 2, fsynced
    temp, folder = map(Path, fsynced)
    assert temp.parent == path.parent and temp.name.startswith(f".x.bin.{os.getpid()}.")  # the data, before the rename
    assert folder == path.parent  # the rename, after it
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files._umask())


def test_debris_of_a_killed_writer_is_removed_and_a_live_writers_is_kept(tmp_path):
    dead_file = tmp_path / f".x.json.{DEAD_PID}.abc.tmp"
    dead_dir = tmp_path / f".out.{DEAD_PID}.def.tmp"
    live = tmp_path / f".x.json.{os.getpid()}.ghi.tmp"
    other = tmp_path / f".x.json.notapid.tmp"
    for p in (dead_file, live, other):
        p.write_text("partial")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_text("partial")
    atomic_write_json(tmp_path / "x.json", [1])
    assert not dead_file.exists() and live.exists() and other.exists()
    tmp = temp_dir_for(tmp_path / "out")
    assert not dead_dir.exists() and tmp.is_dir() and tmp.name.startswith(f".out.{os.getpid()}.")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_publish_folder_replaces_the_old_one_flushed_and_leaves_nothing_beside_it(tmp_path, fsynced, monkeypatch, exchange):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    exchanged = []
    real = files._exchange

    def exchange_or_refuse(a: Path, b: Path) -> bool:
        if exchange:
            exchanged.append(real(a, b))
        return exchange and exchanged[-1]

    monkeypatch.setattr(files, "_exchange", exchange_or_refuse)
    tmp = temp_dir_for(out)
    (tmp / "inner").mkdir()
    (tmp / "inner" / "a.txt").write_text("new")
    (tmp / "b.txt").write_text("new")
    publish_folder(tmp, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["b.txt", "inner", "inner/a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    flushed = [Path(p) for p in fsynced]
    # every file and folder of the new tree before the publish, the parent folder after it
    assert {p.name for p in flushed[:-1]} == {"a.txt", "inner", "b.txt", tmp.name}
    assert flushed[-1] == tmp_path
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~files._umask())
    if exchange and exchanged != [True]:
        pytest.skip("this filesystem cannot exchange two folders in one step (renameat2); the two-rename path is tested")


def test_publish_folder_into_a_new_place(tmp_path):
    tmp = temp_dir_for(tmp_path / "new")
    (tmp / "a").write_text("x")
    publish_folder(tmp, tmp_path / "new")
    assert (tmp_path / "new" / "a").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_checked_tensors_round_trip_exactly(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic_save_tensors(path, _tensors(), metadata={"note": "hi"}, checksum=True)
    tensors, meta = load_checked_tensors(path)
    assert meta["note"] == "hi" and len(meta[CHECKSUM_KEY]) == 64
    assert tensors.keys() == _tensors().keys() and all(torch.equal(tensors[k], v) for k, v in _tensors().items())


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("damage", ["flip a data byte", "flip a metadata byte", "truncate", "garbage", "no checksum", "missing"])
def test_a_damaged_checked_tensor_file_is_refused(tmp_path, damage):
    path = tmp_path / "t.safetensors"
    atomic_save_tensors(path, _tensors(), metadata={"note": "hi"}, checksum=damage != "no checksum")
    data = bytearray(path.read_bytes())
    if damage == "flip a data byte":
        data[_header_end(path) + 5] ^= 0x10
    elif damage == "flip a metadata byte":
        i = data.index(b'"hi"')
        data[i + 1] = ord("H")
    elif damage == "truncate":
        data = data[: len(data) - 3]
    elif damage == "garbage":
        data = bytearray(b"\xff" * 64)
    path.write_bytes(bytes(data))
    if damage == "missing":
        path.unlink()
    expected = {"flip a data byte": "do not match their sha256", "flip a metadata byte": "do not match their sha256",
                "truncate": "unreadable", "garbage": "unreadable", "no checksum": "has no checksum",
                "missing": "is missing"}[damage]
    with pytest.raises(CorruptCacheError, match=expected):
        load_checked_tensors(path)


def test_checked_json_round_trips_and_refuses_a_changed_value(tmp_path):
    path = tmp_path / "c.json"
    atomic_write_json(path, {"entries": [{"x": 0.1 + 0.2, "y": [1, 2]}]}, checksum=True)
    assert load_checked_json(path) == {"entries": [{"x": 0.1 + 0.2, "y": [1, 2]}]}
    data = json.loads(path.read_text())
    data["entries"][0]["y"][1] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCacheError, match="do not match their sha256"):
        load_checked_json(path)
    path.write_text(path.read_text()[:-10])
    with pytest.raises(CorruptCacheError, match="unreadable"):
        load_checked_json(path)
    path.write_text(json.dumps({"entries": []}))
    with pytest.raises(CorruptCacheError, match="has no checksum"):
        load_checked_json(path)


def test_read_safetensors_equals_the_library_and_refuses_damage(tmp_path):
    """read_safetensors (no memory map) gives what safetensors' load_file gives, every dtype and a
    0-element tensor included; a truncated file or a header pointing past the data is a ValueError."""
    from safetensors.torch import load_file, save_file

    from tightfit.formats.files import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "u8": torch.randint(0, 255, (10,), dtype=torch.uint8, generator=g),
               "f16": torch.randn(5, generator=g).half(), "bf16": torch.randn(2, 2, generator=g).bfloat16(),
               "i64": torch.arange(4), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.0)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    data = path.read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError):
        read_safetensors(tmp_path / "short")
    (tmp_path / "head").write_bytes(data[:6])
    with pytest.raises(ValueError):
        read_safetensors(tmp_path / "head")

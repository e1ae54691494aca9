"""The packed folder's checksums cover every file: the tensors, config.json (the engine sizes its
buffers from it), the tokenizer files and the manifest itself. Any edit, extra file or missing
file is a one-line error naming it; a version 1 folder (tensors covered only) asks to be repacked."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fuzz_runner import judge
from tightfit.cli import main
from tightfit.formats.packed import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    load_packed,
    manifest_sha256,
    read_manifest,
    sha256_file,
)


@pytest.fixture(scope="module")
def packed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "packed"
    assert main(["compress", str(tiny_model_dir), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "copy"))


def _info_error(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    rc = main(["info", str(folder)])
    captured = capsys.readouterr()
    result = judge(rc, captured.out, captured.err, None)
    assert result.outcome == "error", result
    return result.line


def test_manifest_lists_every_file_and_seals_itself(packed: Path) -> None:
    manifest = read_manifest(packed)
    others = sorted(p.name for p in packed.iterdir() if p.name not in (MANIFEST_FILE, TENSORS_FILE))
    assert sorted(manifest["files"]) == others and {"config.json", "tokenizer.json"} <= set(others)
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(packed / name), "bytes": (packed / name).stat().st_size}
    assert manifest["tensors_sha256"] == sha256_file(packed / TENSORS_FILE)
    assert manifest["manifest_sha256"] == manifest_sha256(manifest) and manifest["format_version"] == FORMAT_VERSION
    assert load_packed(packed).info.keys().isdisjoint({"files", "manifest_sha256"})  # not carried into a repack


@pytest.mark.parametrize("name, edit", [
    ("config.json", lambda t: t.replace('"vocab_size": 384', '"vocab_size": 1000')),
    ("config.json", lambda t: t + " "),
    ("tokenizer.json", lambda t: t.replace('"<unk>"', '"<unK>"', 1)),
    ("tokenizer_config.json", lambda t: t.replace("<s>", "</s>", 1)),
])
def test_an_edited_file_is_refused(name: str, edit, copy: Path, capsys) -> None:
    text = (copy / name).read_text()
    assert edit(text) != text
    (copy / name).write_text(edit(text))

    line = _info_error(copy, capsys)

    assert re.fullmatch(rf".*{re.escape(name)} is corrupted or was edited: its size or sha256 does not match the "
                        r"manifest \(re-run compress\)", line), line


def test_an_edited_manifest_is_refused(copy: Path, capsys) -> None:
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    name = sorted(manifest["layers"])[0]
    manifest["layers"][name]["shape"] = [1, 1]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))

    line = _info_error(copy, capsys)

    assert re.search(r"manifest\.json is corrupted or was edited: its sha256 does not match its contents", line), line


def test_a_missing_file_is_refused(copy: Path, capsys) -> None:
    (copy / "tokenizer.json").unlink()
    assert re.search(r"is incomplete: tokenizer\.json is missing$", _info_error(copy, capsys))


@pytest.mark.parametrize("name", ["added_tokens.json", "special_tokens_map.json", "generation_config.json", "vocab.json"])
def test_an_unlisted_file_a_loader_reads_is_refused_others_ignored(name: str, copy: Path, capsys) -> None:
    """An eval.json beside the model is not part of it; an added_tokens.json would change its tokenizer unseen."""
    (copy / "eval.json").write_text("{}")
    (copy / ".DS_Store").write_bytes(b"\0")
    assert main(["info", str(copy)]) == 0
    (copy / name).write_text('{"<new>": 384}')

    line = _info_error(copy, capsys)

    assert re.search(rf"holds {re.escape(name)}, which its manifest does not list and a loader would read \(move it out, "
                     r"or re-run compress\)$", line), line


def test_a_version_1_folder_asks_to_be_repacked(copy: Path, capsys) -> None:
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    for key in ("files", "manifest_sha256"):
        del manifest[key]
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))

    line = _info_error(copy, capsys)

    assert re.search(rf"packed format version 1; this tightfit reads version {FORMAT_VERSION} \(it predates checksums "
                     r"over config\.json and the tokenizer: re-run compress to repack it\)", line), line

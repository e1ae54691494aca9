"""The `tightfit` command on bad input: one line `tightfit: error: ...` on stderr, exit code 2,
never a traceback, and no half-written output folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tightfit.cli import main
from tightfit.formats.packed import FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE

SUPPORTED = "gemma3_text, llama, mistral, phi3, qwen2"


def _error_line(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """Check the CLI's error contract and return the one error line (without the prefix)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tightfit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last, got {lines}"
    # anything before it is a one-line stage message ("tightfit: loading ..."), nothing else
    assert all(line.startswith("tightfit: ") for line in lines), lines
    return errors[0].removeprefix("tightfit: error: ")


def _assert_no_output_left(out: Path) -> None:
    """A failed compress publishes nothing at `out` and leaves no temporary sibling of it."""
    assert not out.exists(), f"failed compress left {out}"
    if out.parent.exists():
        debris = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        assert debris == [], debris


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real packed model (tiny llama, w4g32, RTN: no calibration text needed). Do not modify it."""
    out = tmp_path_factory.mktemp("packed") / "tiny-w4g32"
    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])
    assert rc == 0
    assert (out / MANIFEST_FILE).is_file() and (out / TENSORS_FILE).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "work or temp folders left behind"
    return out


@pytest.fixture
def packed_copy(packed_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the packed model, free to damage."""
    return Path(shutil.copytree(packed_dir, tmp_path / "damaged"))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(changes)
    path.write_text(json.dumps(manifest), encoding="utf-8")


# ---- missing paths -----------------------------------------------------------------------------


def test_compress_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing, out = tmp_path / "no-such-model", tmp_path / "out"

    rc = main(["compress", str(missing), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert re.search(r"no such file or folder '.*no-such-model'.*built-in name \(smollm2-135m, qwen2\.5-coder-1\.5b\)", msg), msg
    _assert_no_output_left(out)


def test_eval_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", str(tmp_path / "nothing-here"), "--windows", "1", "--ctx", "16"])

    msg = _error_line(capsys, rc)
    assert re.search(r"no such file or folder '.*nothing-here'", msg), msg


def test_info_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["info", str(tmp_path / "nothing-here")])

    msg = _error_line(capsys, rc)
    assert re.search(r"no packed model at .*nothing-here: path does not exist", msg), msg


def test_info_on_a_model_folder_that_is_not_packed(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["info", str(tiny_model_dir)])

    msg = _error_line(capsys, rc)
    assert re.search(r"is not a tightfit packed model: no manifest\.json", msg), msg


def test_missing_path_exit_code_in_a_real_process(tmp_path: Path) -> None:
    """The in-process return code becomes the process exit code; stderr is one line, no traceback."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "tightfit.cli", "info", str(tmp_path / "nothing-here")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )

    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"tightfit: error: no packed model at .*nothing-here: path does not exist", lines[0]), lines[0]


# ---- flags -------------------------------------------------------------------------------------


def test_unknown_format_lists_the_grammar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"

    rc = main(["compress", "smollm2-135m", "--format", "w7g64", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert "'w7g64'" in msg
    assert re.search(r"bits 7 is not in the format table; choose one of 2, 3, 4, 5, 6, 8", msg), msg
    assert "expected w{bits}g{group} or w{bits}pc" in msg
    assert "bits in {2, 3, 4, 5, 6, 8}" in msg and "group in {16, 32, 64, 128}" in msg
    _assert_no_output_left(out)


def test_unparsable_format_lists_the_grammar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compress", "smollm2-135m", "--format", "int4", "--out", str(tmp_path / "out")])

    msg = _error_line(capsys, rc)
    assert re.search(r"cannot parse quantization format 'int4': expected w\{bits\}g\{group\}", msg), msg


def test_bad_flag_exits_2_via_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["info", "somewhere", "--no-such-flag"])

    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"(?m)^tightfit: error: unrecognized arguments: --no-such-flag$", err), err


def test_non_numeric_flag_value_exits_2_via_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["eval", "somewhere", "--windows", "many"])

    assert excinfo.value.code == 2
    assert re.search(r"argument --windows: expected a whole number, got 'many'", capsys.readouterr().err)


def test_damp_outside_0_1(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"

    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--damp", "5", "--no-eval", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert msg == "--damp must lie between 0 and 1, got 5.0"
    _assert_no_output_left(out)


# ---- models and text ---------------------------------------------------------------------------


def test_unsupported_architecture(tiny_tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    config = GPT2Config(
        n_embd=64, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=128,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    out = tmp_path / "out"
    capsys.readouterr()  # drop save_pretrained's progress bar; only the CLI's output is under test

    rc = main(["compress", str(folder), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert msg == f"unsupported architecture 'gpt2'; supported: {SUPPORTED}"
    _assert_no_output_left(out)


def test_calibration_text_too_short(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "short.txt"
    text.write_text("The cat sees a boat.\n\nA small dog walks.\n\nThe river opens once again.\n", encoding="utf-8")
    out = tmp_path / "out"

    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--calib-text", str(text),
               "--calib-samples", "8", "--calib-len", "64", "--no-eval", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert re.search(r"calibration text too short: \d+ tokens available, 504 needed", msg), msg
    _assert_no_output_left(out)


def test_calibration_text_missing(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"

    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--calib-text", str(tmp_path / "gone.txt"),
               "--no-eval", "--out", str(out)])

    msg = _error_line(capsys, rc)
    assert re.search(r"text source not found: .*gone\.txt", msg), msg
    _assert_no_output_left(out)


# ---- packed models -----------------------------------------------------------------------------


def test_info_on_a_good_packed_model(packed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["info", str(packed_dir)])

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    assert f"format v{FORMAT_VERSION}" in captured.out
    # w4g32 with fp16 scales and 4-bit zeros: 4 + 16/32 + 4/32 = 4.625 bits per weight.
    assert re.search(r"-> 4\.6250 bits/weight", captured.out), captured.out
    assert "architecture llama" in captured.out and "method         rtn" in captured.out


def test_info_truncated_tensors(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = packed_copy / TENSORS_FILE
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(rf"model\.safetensors is truncated or corrupted: {len(data) // 2} bytes, manifest says {len(data)}",
                     msg), msg


def test_eval_truncated_tensors(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = packed_copy / TENSORS_FILE
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])

    rc = main(["eval", str(packed_copy), "--windows", "1", "--ctx", "16"])

    msg = _error_line(capsys, rc)
    assert re.search(r"model\.safetensors is truncated", msg), msg


def test_info_flipped_byte(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = packed_copy / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x01
    tensors.write_bytes(bytes(data))

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(r"model\.safetensors is corrupted: sha256 does not match the manifest", msg), msg


def test_info_unknown_format_version(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_manifest(packed_copy, format_version=99)

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(rf"packed format version 99; this tightfit reads version {FORMAT_VERSION}\b", msg), msg


def test_info_manifest_deleted(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (packed_copy / MANIFEST_FILE).unlink()

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(r"is not a tightfit packed model: no manifest\.json", msg), msg


def test_info_manifest_not_json(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (packed_copy / MANIFEST_FILE).write_text('{"format": "tightfit-packed", "format_ver', encoding="utf-8")

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(r"manifest\.json is corrupted: not valid JSON", msg), msg


def test_info_manifest_of_another_format(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_manifest(packed_copy, format="gguf")

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert re.search(r"manifest\.json is not a tightfit manifest \(format != 'tightfit-packed'\)", msg), msg


def test_info_manifest_missing_tensors_bytes(packed_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = packed_copy / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    del manifest["tensors_bytes"]
    path.write_text(json.dumps(manifest), encoding="utf-8")

    rc = main(["info", str(packed_copy)])

    msg = _error_line(capsys, rc)
    assert "tensors_bytes" in msg


def test_published_files_are_readable_by_others(packed_copy: Path) -> None:
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for p in [packed_copy, *packed_copy.iterdir()]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & (0o044 & ~mask) == (0o044 & ~mask), (p, oct(mode))


@pytest.mark.parametrize("fmt", ["spqr-w3g16-s3-o1.0", "w3g64"])
def test_info_bits_per_weight_equals_file_bytes(fmt: str, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """`tightfit info` prints bits/weight = bytes the file holds for the quantized layers x 8 / their weights,
    read here independently from the safetensors header."""
    import struct

    out = tmp_path / "packed"
    assert main(["compress", str(tiny_model_dir), "--format", fmt, "--method", "rtn", "--no-eval", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    shown = float(re.search(r"-> ([0-9.]+) bits/weight", printed).group(1))

    manifest = json.loads((out / "manifest.json").read_text())
    raw = (out / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    layer_bytes = sum(
        end - start
        for key, entry in header.items()
        if key != "__metadata__" and key.rsplit(".", 1)[0] in manifest["layers"]
        for start, end in [entry["data_offsets"]]
    )
    weights = sum(a * b for a, b in (e["shape"] for e in manifest["layers"].values()))
    assert shown == pytest.approx(8 * layer_bytes / weights, abs=5e-5)

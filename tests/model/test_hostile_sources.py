"""Model sources that lie: a config.json that does not fit the tensors, a block count in the millions
(which once meant building a model that large), a tokenizer.json that makes the Rust tokenizer
panic. Each is one `tightfit: error:` line from compress (and generate), found by tests/test_fuzz.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fuzz_inputs import reseal
from fuzz_runner import judge
from tightfit.cli import main

from .tiny_gguf import write_tiny_gguf


def _compress_error(source: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "out"
    rc = main(["compress", str(source), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])
    captured = capfd.readouterr()
    result = judge(rc, captured.out, captured.err, out)
    assert result.outcome == "error", result
    return result.line


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _panicking_tokenizer(folder: Path) -> None:
    """The tokenizer.json edit that tests/test_fuzz.py found (seed 1473): with the merge result 'Ġwithout'
    dropped from the vocabulary, the Rust `tokenizers` panics (pyo3's PanicException, a BaseException,
    and a panic message written straight to file descriptor 2) instead of raising."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert ["Ġwit", "hout"] in tokenizer["model"]["merges"], "the tiny tokenizer changed: find another panicking edit"
    del tokenizer["model"]["vocab"]["Ġwithout"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("change, pattern", [
    ({"num_hidden_layers": 1024}, r"the config says 1024 decoder blocks, the tensors hold 2$"),
    ({"intermediate_size": 512}, r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[256, 128\], config\.json implies \[512, 128\]$"),
    ({"num_key_value_heads": 0}, r"cannot read the .* of .*: .*division"),
])
def test_a_config_that_does_not_fit_the_weights(change, pattern, make_tiny_model, tmp_path, capfd) -> None:
    folder = make_tiny_model("llama", tmp_path)
    _edit_config(folder, **change)
    line = _compress_error(folder, tmp_path, capfd)
    assert re.search(pattern, line), line


def test_a_gguf_block_count_in_the_billions(make_tiny_model, tmp_path, capfd) -> None:
    from gguf import GGUFReader

    path = write_tiny_gguf(make_tiny_model("llama", tmp_path), tmp_path / "tiny.gguf")
    reader = GGUFReader(path, "r+")
    field = reader.fields["llama.block_count"]
    field.parts[field.data[0]][...] = 2**32 - 1
    reader.data.flush()
    del reader

    line = _compress_error(path, tmp_path, capfd)

    assert re.search(r"the config says 4294967295 decoder blocks, the tensors hold 2$", line), line


def test_a_tokenizer_that_panics_is_one_line_from_compress(make_tiny_model, tmp_path, capfd) -> None:
    folder = make_tiny_model("llama", tmp_path)
    _panicking_tokenizer(folder)
    line = _compress_error(folder, tmp_path, capfd)
    assert re.search(r"cannot read the tokenizer of .*: range end index \d+ out of range", line), line


def test_a_token_id_in_the_billions_is_refused_before_the_tokenizer_is_saved(make_tiny_model, tmp_path, capfd) -> None:
    """Found by tests/test_fuzz.py (seed 5878): saving such a tokenizer made `tokenizers` count up to the id."""
    folder = make_tiny_model("llama", tmp_path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["p"] = 2**31
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))

    line = _compress_error(folder, tmp_path, capfd)

    assert re.search(r"tokenizer of .* has token id 2147483648, past its 384 tokens and the model's vocabulary of 384$", line), line


def test_a_tokenizer_that_panics_is_one_line_from_generate(tiny_model_dir, tmp_path, capfd) -> None:
    """In a packed folder whose checksums were recomputed after the edit (else the checksum answers)."""
    packed = tmp_path / "packed"
    assert main(["compress", str(tiny_model_dir), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(packed)]) == 0
    _panicking_tokenizer(packed)
    reseal(packed)
    capfd.readouterr()

    rc = main(["generate", str(packed), "the cat", "--max-tokens", "2"])

    captured = capfd.readouterr()
    result = judge(rc, captured.out, captured.err, None)
    assert result.outcome == "error" and "panicked" not in captured.err, captured.err
    assert re.search(r"has no usable tokenizer \(range end index \d+ out of range", result.line), result.line


def test_held_native_output_comes_back_on_success(capfd) -> None:
    import os

    from tightfit.errors import native_stderr_held

    with native_stderr_held():
        os.write(2, b"native line\n")
    assert capfd.readouterr().err == "native line\n"
    with pytest.raises(ValueError), native_stderr_held():
        os.write(2, b"panicked at ...\n")
        raise ValueError("x")
    assert capfd.readouterr().err == ""

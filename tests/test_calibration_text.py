"""The second text and calibration mixes: the built-in `code` selection (fixed, split by file,
fingerprinted), the --calib-text parser (good specs, one-line errors for bad ones), windows of a
mix (apportioned, interleaved, held-back), text sampled from the model (`self`, cached), and what
the manifest, eval.json and the plan report record about them."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tightfit.artifacts import CalibrationConfig
from tightfit.cli import main
from tightfit.data import apportion, interleave, load_text, parse_mix, split_groups, token_windows
from tightfit.data.code import CODE_MODULES, CODE_PYTHON, CODE_SHA256, EXCLUDED_DIRS, code_origin, stdlib_files
from tightfit.data.text import EVAL_SHARE_PERCENT
from tightfit.errors import TextSourceError
from tightfit.model import load_model
from tightfit.stages import calibrate as calibrate_stage

from tiny_models import tiny_corpus


@pytest.fixture(scope="module")
def second_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another .txt of tiny-corpus documents (other sentences than tiny_text_file)."""
    path = tmp_path_factory.mktemp("second") / "second.txt"
    lines = tiny_corpus(2000, seed=7)
    path.write_text("\n\n".join(" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)))
    return path


# ---- the built-in `code` text --------------------------------------------------------------------


def test_code_selection_is_fixed_sorted_and_leaves_tests_out() -> None:
    files = stdlib_files()

    assert list(files) == sorted(files) and files == stdlib_files()  # the same selection twice
    assert not any(EXCLUDED_DIRS & set(Path(p).parts) for p in files)
    tops = {Path(p).parts[0].removesuffix(".py") for p in files}
    assert tops == set(CODE_MODULES), "every module of the selection gives files, and nothing else does"


@pytest.mark.skipif(sys.version_info[:2] != CODE_PYTHON, reason="the reference selection is CPython 3.11's")
def test_code_text_is_the_reference_selection() -> None:
    corpus = load_text("code")

    assert corpus.sha256() == CODE_SHA256
    assert corpus.record()["sha256"] == CODE_SHA256 and "(the reference selection)" in corpus.origin
    assert "differs" in code_origin(len(stdlib_files()), "0" * 64)


def test_code_parts_are_disjoint_by_file_and_hold_out_a_tenth_of_the_text() -> None:
    files = stdlib_files()
    from tightfit.data.code import file_documents

    groups = {path: file_documents(text) for path, text in files.items()}
    corpus = split_groups("code", groups)
    shuffled = dict(random.Random(3).sample(list(groups.items()), len(groups)))

    assert split_groups("code", shuffled) == corpus and corpus == load_text("code")  # independent of order
    assert corpus.sha256() == load_text("code").sha256()
    assert not set(corpus.calibration) & set(corpus.evaluation)
    docs = {path: {d.rstrip().lstrip("\r\n") for d in ds if d.strip()} for path, ds in groups.items()}
    held = {path for path, ds in docs.items() if ds <= set(corpus.evaluation)}  # files held out whole
    assert set(corpus.evaluation) == set().union(*(docs[p] for p in held)), "evaluation holds whole files only"
    assert not set().union(*(docs[p] for p in held)) & set(corpus.calibration)
    share = 100 * sum(map(len, corpus.evaluation)) / sum(map(len, corpus.calibration + corpus.evaluation))
    largest = 100 * max(len(t) for t in files.values()) / sum(len(t) for t in files.values())
    assert EVAL_SHARE_PERCENT - 1 <= share <= EVAL_SHARE_PERCENT + largest + 1, share
    assert all(d and not d.startswith("\n") and d == d.rstrip() for d in corpus.calibration + corpus.evaluation)


def test_split_groups_keeps_a_shared_document_in_evaluation_only() -> None:
    groups = {f"file{i}.py": [f"def f{i}():\n    return {i}", "if __name__ == '__main__':\n    main()"] for i in range(200)}

    corpus = split_groups("synthetic", groups)

    shared = "if __name__ == '__main__':\n    main()"
    assert shared in corpus.evaluation and shared not in corpus.calibration
    assert len(corpus.calibration) + len(corpus.evaluation) == 201


def test_code_windows_of_both_parts(tiny_tokenizer: Any) -> None:
    corpus = load_text("code")
    for part in ("calibration", "evaluation"):
        windows = token_windows(tiny_tokenizer, corpus, part, 4, 64)
        assert windows.shape == (4, 64) and torch.all(windows[:, 0] == tiny_tokenizer.bos_token_id)


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("x = 1\n")
    with pytest.raises(TextSourceError, match=r"needs the standard library modules _collections_abc, .*not found under"):
        stdlib_files(tmp_path)


def test_self_and_unknown_names_are_not_evaluation_texts(tmp_path: Path) -> None:
    with pytest.raises(TextSourceError, match="'self' is text sampled from the model: a calibration source only"):
        load_text("self")
    with pytest.raises(TextSourceError, match="text source not found: nope .*'wiki', 'code'"):
        load_text("nope")


# ---- the --calib-text parser --------------------------------------------------------------------


@pytest.mark.parametrize("spec, canonical, n, seq_len, windows", [
    ("wiki", "wiki", 64, 512, {"wiki": 64}),
    (" wiki , code ", "wiki,code", 64, 512, {"wiki": 32, "code": 32}),
    ("wiki:0.5,code:0.5", "wiki:0.5,code:0.5", 64, 512, {"wiki": 32, "code": 32}),
    ("wiki:.25,code", "wiki:0.25,code", 8, 512, {"wiki": 2, "code": 6}),
    ("wiki,self:2048", "wiki,self:2048", 64, 512, {"wiki": 60, "self": 4}),
    ("wiki:0.75,code,self:1024", "wiki:0.75,code,self:1024", 64, 512, {"wiki": 47, "code": 15, "self": 2}),
    ("self:2048", "self:2048", 16, 128, {"self": 16}),
    ("code,wiki,self", "code,wiki,self", 10, 64, {"code": 4, "wiki": 3, "self": 3}),
])
def test_good_specs(spec: str, canonical: str, n: int, seq_len: int, windows: dict) -> None:
    mix = parse_mix(spec)

    assert str(mix) == canonical and parse_mix(str(mix)) == mix
    assert mix.windows(n, seq_len) == windows and sum(windows.values()) == n


def test_file_paths_with_commas_and_colons(tmp_path: Path) -> None:
    path, colon = tmp_path / "a,b:0.5.txt", tmp_path / "c:1.txt"
    for p in (path, colon):
        p.write_text("one document\n\nanother")
    assert parse_mix(str(path)).names == (str(path),)  # alone, whatever it holds
    assert parse_mix(f"wiki,{colon}").names == ("wiki", str(colon))  # in a mix, a colon not followed by a number
    assert parse_mix(f"wiki,{colon}:0.5").parts[1].share == 0.5


@pytest.mark.parametrize("spec, message", [
    ("", "the calibration text is empty"),
    ("wiki,,code", "has an empty entry"),
    ("wiki:abc", "bad amount in 'wiki:abc'"),
    ("wiki:0.0,code", r"a share must lie in \(0, 1\], got 0.0"),
    ("wiki:1.5", r"a share must lie in \(0, 1\]"),
    ("wiki:0,code", "a token count must be 1 or more"),
    ("wiki:0.5,code:0.3", "add up to 0.8: they must add up to 1"),
    ("wiki:1.0,code", "add up to 1, leaving nothing for the sources without a share"),
    ("wiki,code,wiki", "names wiki more than once"),
    ("wiki,gone.txt", "text source not found: gone.txt"),
    (":0.5", "names no text source"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(TextSourceError, match=message):
        parse_mix(spec)


@pytest.mark.parametrize("spec, n, seq_len, message", [
    ("wiki,self:100", 64, 512, "self:100 is less than one calibration window of 512 tokens"),
    ("wiki,self:40000", 64, 512, "take 78 windows of 512 tokens, more than the 64 calibration windows"),
    ("self:2048", 64, 512, "fill 4 of 64 calibration windows: add a source without a count"),
    ("wiki:0.001,code", 64, 512, "wiki:0.001 of the 64 calibration windows .* is less than one window"),
    ("wiki,self:32768", 64, 512, "is less than one window"),
])
def test_specs_that_do_not_fit_the_windows(spec: str, n: int, seq_len: int, message: str) -> None:
    with pytest.raises(TextSourceError, match=message):
        parse_mix(spec).windows(n, seq_len)


def test_apportion_and_interleave() -> None:
    assert apportion([1.0, 1.0, 1.0], 10) == [4, 3, 3] and apportion([3.0, 1.0], 0) == [0, 0]
    order = interleave({"wiki": 6, "code": 2})
    assert sorted(order) == [("code", 0), ("code", 1)] + [("wiki", j) for j in range(6)]
    for k in range(1, 9):  # every prefix holds the sources about in their shares
        assert abs(sum(name == "code" for name, _ in order[:k]) - k * 2 / 8) <= 1
    assert [j for name, j in order if name == "wiki"] == list(range(6))


def test_cli_refuses_a_bad_mix_in_one_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spec, message in (("wiki:0.5,code:0.3", "add up to 0.8"), ("wiki,self:100", "less than one calibration window")):
        rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--calib-text", spec, "--no-eval",
                   "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("tightfit: error: ") and message in lines[0], lines
        assert not (tmp_path / "out").exists()


# ---- calibration sets of a mix -------------------------------------------------------------------


def test_a_mix_interleaves_each_sources_own_windows(tiny_model_dir: Path, tiny_text_file: Path, second_text: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    config = CalibrationConfig(text=f"{tiny_text_file}:0.75,{second_text}", n_samples=8, seq_len=32)

    calibration, held = calibrate_stage.calibrate_with_held_back(tok, config, 4, progress=False)

    first = token_windows(tok, load_text(str(tiny_text_file)), "calibration", 9, 32)
    second = token_windows(tok, load_text(str(second_text)), "calibration", 3, 32)
    assert [(s.name, s.windows, s.held_back) for s in calibration.sources] == [(str(tiny_text_file), 6, 3), (str(second_text), 2, 1)]
    assert calibration.sources[0].sha256 == load_text(str(tiny_text_file)).sha256()
    order = interleave({"a": 6, "b": 2})
    expected = torch.stack([first[j] if name == "a" else second[j] for name, j in order])  # [8, 32]
    torch.testing.assert_close(calibration.tokens, expected, rtol=0, atol=0)
    held_order = interleave({"a": 3, "b": 1})
    torch.testing.assert_close(held, torch.stack([first[6 + j] if n == "a" else second[2 + j] for n, j in held_order]), rtol=0, atol=0)
    alone = calibrate_stage.calibrate(tok, config, progress=False)  # held-back windows never change the set
    torch.testing.assert_close(alone.tokens, calibration.tokens, rtol=0, atol=0)
    assert calibration.describe() == f"8 windows x 32 tokens: {tiny_text_file} 6, {second_text} 2"


def test_self_text_is_sampled_once_deterministically_and_cached(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(str(tiny_model_dir))
    fresh = calibrate_stage.sample_self_text(loaded, 300, None, progress=False)
    work = tmp_path / "work"
    cached = calibrate_stage.sample_self_text(loaded, 300, work, progress=False)

    assert fresh.dtype == torch.int64 and fresh.shape == (300,)
    torch.testing.assert_close(fresh, cached, rtol=0, atol=0)
    grown = tmp_path / "grown"  # a short request cuts its last sample; a longer one extends the same stream
    short = calibrate_stage.sample_self_text(loaded, 40, grown, progress=False)
    assert json.loads((grown / calibrate_stage.SELF_FILE).read_text())["partial"] is True
    torch.testing.assert_close(short, fresh[:40], rtol=0, atol=0)
    torch.testing.assert_close(calibrate_stage.sample_self_text(loaded, 300, grown, progress=False), fresh, rtol=0, atol=0)
    assert int(fresh.max()) < len(loaded.tokenizer) and len(set(fresh.tolist())) > 20
    saved = json.loads((work / calibrate_stage.SELF_FILE).read_text())
    assert saved["key"]["source_sha256"] == loaded.source.sha256() and sum(map(len, saved["samples"])) >= 300

    def refuse(*args, **kwargs):
        raise AssertionError("the cached samples must be used")

    monkeypatch.setattr("tightfit.runtime.generate.generate", refuse)
    torch.testing.assert_close(calibrate_stage.sample_self_text(loaded, 200, work, progress=False), fresh[:200], rtol=0, atol=0)
    config = CalibrationConfig(text="self:128", n_samples=4, seq_len=32)
    windows = calibrate_stage.calibrate(loaded.tokenizer, config, loaded=loaded, work=work, progress=False)
    torch.testing.assert_close(windows.tokens[:, 1:].reshape(-1), fresh[: 4 * 31], rtol=0, atol=0)
    assert windows.sources[0].name == "self" and "temperature 1" in windows.sources[0].origin
    with pytest.raises(ValueError, match="needs it"):
        calibrate_stage.calibrate(loaded.tokenizer, config)


# ---- what the manifest, eval.json and the plan report record -----------------------------------------


def test_manifest_records_the_mix_and_eval_json_the_text(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "packed"
    spec = f" {tiny_text_file}:0.50, code:0.5 "
    assert main(["compress", str(tiny_model_dir), "--format", "w4g32", "--calib-text", spec, "--calib-samples", "4",
                 "--calib-len", "32", "--eval-text", "code", "--windows", "1", "--ctx", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"tokens of code \(CPython .* standard library, \d+ files", printed), printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["text"] == f"{tiny_text_file}:0.5,code:0.5"
    sources = manifest["calibration_sources"]
    assert [(s["name"], s["windows"]) for s in sources] == [(str(tiny_text_file), 2), ("code", 2)]
    assert sources[1]["sha256"] == load_text("code").sha256() and "standard library" in sources[1]["origin"]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["evaluation"]["text"] == "code" and evaluation["text"] == load_text("code").record()

    assert main(["eval", str(out), "--text", "code", "--windows", "1", "--ctx", "32", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["text"]["sha256"] == load_text("code").sha256()


def test_plan_report_says_what_it_was_calibrated_on(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_model_dir), "--bpw", "4.0", "--out", str(tmp_path / "plan.json"), "--sensitivity", "proxy",
                 "--candidates", "w2g32,w4g64", "--calib-text", f"{tiny_text_file},self:64", "--calib-samples", "4",
                 "--calib-len", "32", "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert f"calibrated on {tiny_text_file},self:64 (4 windows x 32 tokens: {tiny_text_file} 2, self 2)" in printed
    assert (tmp_path / "work" / calibrate_stage.SELF_FILE).is_file()


def test_calib_dtype_auto_is_bf16_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import warnings

    from tightfit.cli import common

    args = argparse.Namespace(calib_text="wiki", calib_samples=None, calib_len=None, calib_dtype="auto")
    assert common._calibration_config(args).forward_dtype == ("bf16" if common.native_bf16() else "fp32")
    for native, dtype in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(common, "native_bf16", lambda native=native: native)
        assert common._calibration_config(args).forward_dtype == dtype
        for explicit in ("fp32", "bf16"):  # an explicit choice stands either way, with a warning where bf16 is emulated
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = common._calibration_config(argparse.Namespace(**{**vars(args), "calib_dtype": explicit}))
            assert config.forward_dtype == explicit
            slow = [w for w in caught if "without native bf16" in str(w.message)]
            assert len(slow) == (1 if explicit == "bf16" and not native else 0)

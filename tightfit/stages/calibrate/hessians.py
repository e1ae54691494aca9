"""Hessians H = 2/T X^T X of every linear layer's inputs: one forward pass of the original model
over the calibration set, block by block.

Sequential quantization (the default) recomputes Hessians inside the quantize stage from inputs
that pass through already-quantized layers. Hessians of the original model are what measuring
many formats needs (sensitivity, benchmarks): collected once, they let every format be quantized
without another forward pass. They are cached in the work folder (one file, or one file per
block for a streamed model), keyed by the source model and the calibration, with the sha256 of
their contents; a corrupt cache is collected again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator
from tightfit.artifacts import CalibrationConfig, CalibrationSet, HessianSet, config_to_json
from tightfit.errors import CorruptCacheError
from tightfit.formats.files import atomic_save_tensors, atomic_write_json, load_checked_json, load_checked_tensors, warn_recomputed
from tightfit.model import LoadedModel, get_module, resident_block
from tightfit.model.blocks import block_list, capture_block_inputs, run_block
from tightfit.stages.calibrate.cache import load_cached


@torch.no_grad()
def collect_hessians(loaded: LoadedModel, calibration: CalibrationSet, *, store: Path | None = None,
                     progress: bool = True) -> HessianSet:
    """One pass of the original model over the calibration set, block by block.

    Returns, for every linear layer of every block, the Hessian [K, K] of its inputs; layers of
    one group (same input) share one tensor. With `store` (a folder), each block's Hessians are
    saved there as soon as they exist and the set reads them back on access (`HessianFiles`):
    a 1.5B model's take 9 GB, more than the model, so a streamed model keeps them on disk. Each
    block file carries the sha256 of its contents; the folder's HESSIAN_FILES_META, removed first
    and written last, marks it finished.
    """
    arch = loaded.arch
    if store is not None:
        (Path(store) / HESSIAN_FILES_META).unlink(missing_ok=True)  # unfinished until written again
    n_blocks = len(block_list(loaded.model, arch))
    inputs = capture_block_inputs(loaded.model, arch, calibration.tokens, calibration.config.batch_size)
    hessians: dict[str, torch.Tensor] = {}
    stored: dict[str, tuple[Path, str]] = {}
    for i in tqdm(range(n_blocks), desc="hessians", unit="block", disable=not progress):
        with resident_block(loaded, i) as block:
            accs = {names: HessianAccumulator(get_module(block, names[0]).in_features) for names in arch.linear_groups}
            handles = [
                get_module(block, names[0]).register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0]))
                for names, acc in accs.items()
            ]
            try:
                with calibration.config.forward_precision():
                    inputs.hidden = [run_block(block, h, inputs.extra[i][b]).float() for b, h in enumerate(inputs.hidden)]
            finally:
                for h in handles:
                    h.remove()
        block_hessians = {}
        for names, acc in accs.items():
            h = acc.hessian()
            for name in names:
                block_hessians[f"{arch.blocks}.{i}.{name}"] = h
        if store is None:
            hessians.update(block_hessians)
            continue
        path = _block_file(store, i)
        unique, aliases = _unique_tensors(block_hessians)
        atomic_save_tensors(path, unique, metadata={"aliases": json.dumps(aliases)}, checksum=True)
        stored.update({name: (path, aliases.get(name, name)) for name in block_hessians})
    if store is not None:
        meta = {**_hessian_key(loaded, calibration.config), "blocks": n_blocks}
        atomic_write_json(Path(store) / HESSIAN_FILES_META, meta, checksum=True)
        return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=HessianFiles(stored))
    return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=hessians)


HESSIAN_FILES_META = "hessians.json"  # written last: its presence marks a finished folder


def _block_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"block_{index:03d}.safetensors"


class HessianFiles(Mapping[str, torch.Tensor]):
    """Hessians kept in files, one per block: name -> (file, stored name); read on every access."""

    def __init__(self, where: dict[str, tuple[Path, str]]) -> None:
        self.where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        path, stored = self.where[name]
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(stored)
        except (SafetensorError, OSError, ValueError) as e:  # checked when loaded: changed since
            raise CorruptCacheError(f"{path} is unreadable ({' '.join(str(e).split())}); remove {path.parent} "
                                    "to collect the Hessians again") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _hessian_key(loaded: LoadedModel, config: CalibrationConfig) -> dict[str, str]:
    return {"source_sha256": loaded.source.sha256(), "calibration": json.dumps(config_to_json(config))}


def load_hessian_files(folder: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The Hessians `collect_hessians(store=folder)` saved, if made from this model and calibration,
    else None. Every block file is read once and checked against its sha256 here; a missing or
    corrupt one (or folder file) is None too, with a CorruptCacheWarning."""
    meta_path = Path(folder) / HESSIAN_FILES_META
    if not meta_path.is_file():
        return None
    key = _hessian_key(loaded, config)
    where: dict[str, tuple[Path, str]] = {}
    try:
        meta = load_checked_json(meta_path)
        if {k: meta.get(k) for k in key} != key:
            return None
        blocks = meta.get("blocks")
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise CorruptCacheError(f"{meta_path} gives no block count ({blocks!r})")
        for i in range(blocks):
            path = _block_file(folder, i)
            tensors, block_meta = load_checked_tensors(path)
            aliases = json.loads(block_meta.get("aliases", "{}"))
            where.update({name: (path, name) for name in tensors})
            where.update({alias: (path, name) for alias, name in aliases.items()})
    except CorruptCacheError as e:
        warn_recomputed(e)
        return None
    return HessianSet(config=config, source_sha256=loaded.source.sha256(), hessians=HessianFiles(where))


def _unique_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors shared under several names, stored once: (unique name -> tensor, alias -> stored name)."""
    unique: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, h in tensors.items():
        if h.data_ptr() in seen:
            aliases[name] = seen[h.data_ptr()]
        else:
            seen[h.data_ptr()] = name
            unique[name] = h
    return unique, aliases


def save_hessians(hessians: HessianSet, path: Path) -> None:
    unique, aliases = _unique_tensors(hessians.hessians)
    meta = {"calibration": json.dumps(config_to_json(hessians.config)), "source_sha256": hessians.source_sha256,
            "aliases": json.dumps(aliases)}
    atomic_save_tensors(path, unique, metadata=meta, checksum=True)


def load_hessians(path: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The cached Hessians at path if they were made from this model and calibration, else None."""
    cached = load_cached(path, loaded, config)
    if cached is None:
        return None
    tensors, meta = cached
    for alias, name in json.loads(meta["aliases"]).items():
        tensors[alias] = tensors[name]
    return HessianSet(config=config, source_sha256=meta["source_sha256"], hessians=tensors)

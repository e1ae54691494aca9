"""The calibrate stage's tensor caches (Hessians, Fisher statistics): one checksummed safetensors
file each, keyed in its metadata by the source model and the calibration."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tightfit.artifacts import CalibrationConfig, config_to_json
from tightfit.errors import CorruptCacheError
from tightfit.formats.files import load_checked_tensors, read_tensor_metadata, warn_recomputed
from tightfit.model import LoadedModel


def load_cached(path: Path, loaded: LoadedModel, config: CalibrationConfig,
                **key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the cache file at path if it was made from this model and calibration
    (and carries every `key` value), else None; a corrupt one is None too, with a CorruptCacheWarning."""
    if not Path(path).is_file():
        return None
    wanted = {"source_sha256": loaded.source.sha256(), "calibration": json.dumps(config_to_json(config)), **key}
    try:
        meta = read_tensor_metadata(path)
        if not all(meta.get(k) == v for k, v in wanted.items()):
            return None
        return load_checked_tensors(path)
    except CorruptCacheError as e:
        warn_recomputed(e)
        return None

"""The profile stage's cache: timings on disk, entry by entry, and the architecture key of the
whole-model timings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tightfit.errors import CorruptCacheError
from tightfit.formats.files import atomic_write_json, warn_recomputed

CACHE_VERSION = 1


class LatencyCache:
    """Timings on disk, one JSON file, entry by entry: key -> value. Keys name everything a
    timing depends on (machine, threads, kernel source, shape, kernel, rows), so entries from
    other machines, thread counts or kernel versions stay, unused, beside the current ones."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.values: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                warn_recomputed(CorruptCacheError(f"{self.path} is unreadable ({e})"))
                data = None  # re-measure, and overwrite it on save
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("values"), dict):
                self.values = data["values"]

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value
        if self.path is not None:
            atomic_write_json(self.path, {"version": CACHE_VERSION, "values": self.values})


def architecture_key(hf_config: Mapping[str, Any]) -> str:
    """Hash of a model's configuration: the fixed part depends on the architecture, not on weights."""
    text = json.dumps(dict(hf_config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

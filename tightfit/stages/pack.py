"""Pack stage: a QuantizedModel plus what the source model carries -> PackedModel on disk."""

from __future__ import annotations

from pathlib import Path

from tightfit.artifacts import CalibrationConfig, QuantizedModel, config_to_json
from tightfit.formats.packed import PackedModel, save_packed
from tightfit.model import LoadedModel


def tied_names(loaded: LoadedModel, stored: list[str]) -> dict[str, str]:
    """State-dict names whose tensor shares storage with a stored one: name -> stored name (the
    blocks of a streamed model, on the meta device, share nothing)."""
    by_ptr = {}
    tied = {}
    state = {name: t for name, t in loaded.model.state_dict().items() if not t.is_meta}
    for name in stored:
        if name in state:
            by_ptr.setdefault(state[name].data_ptr(), name)
    for name, t in state.items():
        owner = by_ptr.get(t.data_ptr())
        if owner is not None and owner != name:
            tied[name] = owner
    return tied


def pack(qmodel: QuantizedModel, loaded: LoadedModel, calibration: CalibrationConfig | None) -> PackedModel:
    source = loaded.source
    info = {
        "source": {"name": source.name, "kind": source.kind, "sha256": source.sha256()},
        "quantize": config_to_json(qmodel.config),
        "calibration": None if calibration is None else config_to_json(calibration),
        "architecture": loaded.arch.name,
    }
    return PackedModel(
        layers=dict(qmodel.layers),
        kept=dict(qmodel.kept),
        hf_config=loaded.model.config.to_dict(),
        tied=tied_names(loaded, list(qmodel.kept) + [f"{name}.weight" for name in qmodel.layers]),
        info=info,
    )


def write(packed: PackedModel, tokenizer, out_dir: Path) -> Path:
    """Atomically write the packed model with its tokenizer to out_dir."""
    return save_packed(packed, out_dir, extra_files=lambda folder: tokenizer.save_pretrained(str(folder)))

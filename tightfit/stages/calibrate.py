"""Calibrate stage: fixed calibration windows from the calibration part of a text source, and
(optionally) the Hessian H = 2/T X^T X of every linear layer's inputs in the original model.

Sequential quantization (the default) recomputes Hessians inside the quantize stage from inputs
that pass through already-quantized layers. Hessians of the original model are what measuring
many formats needs (sensitivity, benchmarks): collected once, they let every format be quantized
without another forward pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator
from tightfit.artifacts import CalibrationConfig, CalibrationSet, HessianSet, config_to_json
from tightfit.data import load_text, token_windows
from tightfit.formats.files import atomic_save_tensors
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import block_list, capture_block_inputs, run_block


def calibrate(tokenizer, config: CalibrationConfig) -> CalibrationSet:
    """config.n_samples windows of config.seq_len tokens -> CalibrationSet (tokens [S, T])."""
    corpus = load_text(config.text)
    tokens = token_windows(tokenizer, corpus, "calibration", config.n_samples, config.seq_len)
    return CalibrationSet(config=config, tokens=tokens)


def calibrate_with_held_back(tokenizer, config: CalibrationConfig, held_back: int) -> tuple[CalibrationSet, torch.Tensor]:
    """The calibration set, and the next `held_back` windows of the same text, never calibrated on
    -> (CalibrationSet, tokens [held_back, seq_len]); windows come in a fixed order, so the
    calibration set is the same whatever held_back is."""
    extended = calibrate(tokenizer, dataclasses.replace(config, n_samples=config.n_samples + held_back))
    return CalibrationSet(config=config, tokens=extended.tokens[: config.n_samples]), extended.tokens[config.n_samples :]


@torch.no_grad()
def collect_hessians(loaded: LoadedModel, calibration: CalibrationSet, *, progress: bool = True) -> HessianSet:
    """One pass of the original model over the calibration set, block by block.

    Returns, for every linear layer of every block, the Hessian [K, K] of its inputs; layers of
    one group (same input) share one tensor.
    """
    arch = loaded.arch
    blocks = block_list(loaded.model, arch)
    inputs = capture_block_inputs(loaded.model, arch, calibration.tokens, calibration.config.batch_size)
    hessians: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(blocks)), desc="hessians", unit="block", disable=not progress):
        block = blocks[i]
        accs = {names: HessianAccumulator(get_module(block, names[0]).in_features) for names in arch.linear_groups}
        handles = [
            get_module(block, names[0]).register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0]))
            for names, acc in accs.items()
        ]
        try:
            inputs.hidden = [run_block(block, h, inputs.extra[i][b]) for b, h in enumerate(inputs.hidden)]
        finally:
            for h in handles:
                h.remove()
        for names, acc in accs.items():
            h = acc.hessian()
            for name in names:
                hessians[f"{arch.blocks}.{i}.{name}"] = h
    return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=hessians)


def save_hessians(hessians: HessianSet, path: Path) -> None:
    unique: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, h in hessians.hessians.items():
        if h.data_ptr() in seen:
            aliases[name] = seen[h.data_ptr()]
        else:
            seen[h.data_ptr()] = name
            unique[name] = h
    import json

    meta = {"calibration": json.dumps(config_to_json(hessians.config)), "source_sha256": hessians.source_sha256,
            "aliases": json.dumps(aliases)}
    atomic_save_tensors(path, unique, metadata=meta)


def load_hessians(path: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The cached Hessians at path if they were made from this model and calibration, else None."""
    import json

    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("source_sha256") != loaded.source.sha256() or meta.get("calibration") != json.dumps(config_to_json(config)):
        return None
    tensors = load_file(str(path))
    for alias, name in json.loads(meta["aliases"]).items():
        tensors[alias] = tensors[name]
    return HessianSet(config=config, source_sha256=meta["source_sha256"], hessians=tensors)

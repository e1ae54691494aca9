"""Quantize stage: every linear layer of every decoder block, block by block.

Sequential calibration: the inputs of block i+1 are the outputs of block i with its weights
already quantized, so each layer compensates the errors made before it. Inside a block the
linear groups are visited in execution order (q/k/v, then o, then gate/up, then down); each
group's Hessian is collected from inputs that already pass through the quantized groups before
it. A forward is stopped as soon as the group's layers have seen their input.

The token embeddings and an untied output head, when the config gives them a format (a plan's
choice or `embed_format`), are rounded to nearest first: a lookup table has no input Hessian.

After each block its quantized layers are saved to the checkpoint folder; a rerun with the same
job resumes after the last finished block. A streamed model (`LoadedModel.streamed`) is read one
block at a time, and only that block's weights are in memory while it is quantized.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator, gptq_quantize
from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.algorithms.smooth_attention import AttentionShape, fold_key_scales, key_scales
from tightfit.artifacts import (KEEP_DTYPES, CalibrationSet, HessianSet, LayerReport, QuantizeConfig, QuantizedModel, ReadyLayers,
                                config_to_json)
from tightfit.errors import UnsupportedArchitecture
from tightfit.formats.registry import AnyQuantizedTensor, Format, StoredTensor, error_rows
from tightfit.model import Architecture, LoadedModel, get_module, resident_block
from tightfit.model.blocks import BlockInputs, block_list, capture_block_inputs, embedding_layers, linear_layer_names, run_block
from tightfit.stages.checkpoint import BlockCheckpoint, BlockResults
from tightfit.stages.workers import fork_map, worker_count


class _StopForward(Exception):
    """Raised by a hook once every layer of the group has seen its input."""


def kept_tensors(model: nn.Module, quantized_weights: set[str], keep_dtype: str) -> dict[str, torch.Tensor]:
    """State-dict tensors that stay unquantized, in storage dtype; tied duplicates (also of a
    quantized weight, e.g. a head tied to quantized embeddings) dropped, and tensors on the meta
    device (the blocks of a streamed model, not read yet) skipped."""
    dtype = KEEP_DTYPES[keep_dtype]
    state = model.state_dict()
    seen: set[int] = {state[name].data_ptr() for name in quantized_weights if not state[name].is_meta}
    kept = {}
    for name, t in state.items():
        if name in quantized_weights or t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        kept[name] = t.detach().to(dtype if t.dim() >= 2 and t.is_floating_point() else t.dtype).clone()
    return kept


def kept_nbytes(model: nn.Module, quantized_weights: set[str], keep_dtype: str) -> int:
    """Bytes of `kept_tensors(model, ...)`, counting the blocks a streamed model has not read yet
    (each meta tensor is its own: blocks tie nothing)."""
    dtype = KEEP_DTYPES[keep_dtype]
    unread = sum(t.numel() * (dtype.itemsize if t.dim() >= 2 and t.is_floating_point() else t.element_size())
                 for name, t in model.state_dict().items() if t.is_meta and name not in quantized_weights)
    return unread + sum(t.numel() * t.element_size() for t in kept_tensors(model, quantized_weights, keep_dtype).values())


def _install(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    linear = get_module(model, name)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == weight.shape, (name, weight.shape)
    linear.weight.data.copy_(weight)


def _quantize_layer(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: QuantizeConfig, fmt: Format
) -> tuple[AnyQuantizedTensor, LayerReport]:
    start = time.perf_counter()
    if config.method == "gptq":
        assert hessian is not None
        result = gptq_quantize(
            weight, hessian, fmt, damp=config.damp, block_size=config.block_size,
            act_order=config.act_order, clip_search=config.clip_search,
        )
        quantized, loss = result.quantized, result.loss
    else:
        quantized = quantize_rtn_any(weight, fmt, clip_search=config.clip_search)
        loss = sum(float(e.square().sum()) for _, e in error_rows(weight, quantized))
    return quantized, LayerReport(loss=loss, seconds=time.perf_counter() - start)


@torch.no_grad()
def _group_hessian(block: nn.Module, names: tuple[str, ...], inputs: BlockInputs, index: int) -> torch.Tensor:
    """Hessian of the common input of the linear layers `names` of one block."""
    first = get_module(block, names[0])
    acc = HessianAccumulator(first.in_features)
    pending: set[str] = set()

    def hook_for(name: str):
        def hook(module, args):
            if name == names[0]:
                acc.add_batch(args[0])
            pending.discard(name)
            if not pending:
                raise _StopForward

        return hook

    handles = [get_module(block, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for b, hidden in enumerate(inputs.hidden):
            pending.update(names)
            try:
                run_block(block, hidden, inputs.extra[index][b])
            except _StopForward:
                pass
            if pending:
                raise RuntimeError(f"layers {sorted(pending)} of block {index} were not called by its forward")
    finally:
        for h in handles:
            h.remove()
    return acc.hessian()


def _as_stored(module: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Load the kept tensors (storage dtype) back into `module` as fp32: calibration must see every
    tensor as it will be stored."""
    module.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in kept.items()},
                           strict=False)


@torch.no_grad()
def quantize_model(
    loaded: LoadedModel,
    calibration: CalibrationSet | None,
    config: QuantizeConfig,
    *,
    hessians: HessianSet | None = None,
    ready: ReadyLayers | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize every linear layer of every block of `loaded.model` (left untouched).

    GPTQ takes its Hessians sequentially from `calibration` (inputs pass through the layers
    already quantized), or, when `hessians` is given, from the original model without any
    forward pass; with `ready` (GPTQ results made from those `hessians` with this config's settings,
    e.g. the sensitivity sweep's), the layers it holds are taken from it. Returns the quantized layers (a streamed model's as StoredTensor: packed as they
    finish), the kept tensors in storage dtype, and (in `.module`, not for a streamed model) the
    fp32 model with the dequantized weights installed, exactly as a packed copy will compute.
    """
    if config.method == "gptq" and calibration is None and hessians is None:
        raise ValueError("GPTQ needs a calibration set or precomputed Hessians")
    if ready is not None and (hessians is None or not ready.usable_with(config)):
        raise ValueError("ready GPTQ results need the Hessians they came from and a config with their settings")
    arch = loaded.arch
    if config.smooth_attention is not None:
        check_smooth_attention(arch)
        if calibration is None:
            raise ValueError("SmoothAttention takes its key scales from calibration windows; none were given")
    # A streamed model is worked on in place: its blocks come from the files and go back to them, and
    # its embeddings take their stored values only while the calibration inputs are captured (no
    # second copy of a 151k-token vocabulary). A model in memory is copied and left untouched.
    working = loaded if loaded.streamed else dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    model = working.model
    prefix = arch.blocks
    n_blocks = len(block_list(model, arch))
    outer = {name: fmt for name in embedding_layers(model, arch) if (fmt := config.embedding_format(name)) is not None}
    quantized_weights = {f"{name}.weight" for name in [*linear_layer_names(model, arch), *outer]}
    kept = kept_tensors(model, quantized_weights, config.keep_dtype)
    layers: dict[str, AnyQuantizedTensor] = {}
    reports: dict[str, LayerReport] = {}
    for name, fmt in outer.items():
        layers[name], reports[name] = _quantize_layer(get_module(model, name).weight.detach().float(), None,
                                                      dataclasses.replace(config, method="rtn"), fmt)
        if working.streamed:
            layers[name] = StoredTensor.of(layers[name])
    # calibration inputs run through the model: for GPTQ's sequential Hessians, or SmoothAttention's keys
    capture = (config.method == "gptq" and hessians is None) or config.smooth_attention is not None
    # what the forward computes with: every kept tensor in fp32; a streamed model's capture reaches only
    # its embeddings (a second fp32 copy of a 151k-token head would cost 0.9 GB for nothing), and
    # without a capture it needs none of them
    stored_outside = {**{k: v.to(torch.float32) if v.is_floating_point() else v for k, v in kept.items()
                         if not working.streamed or (capture and k.startswith(f"{arch.embeddings}."))},
                      **{f"{name}.weight": layers[name].dequantize() for name in outer
                         if not working.streamed or (capture and name == arch.embeddings)}}
    if not working.streamed:
        model.load_state_dict(stored_outside, strict=False)

    job = {
        "source_sha256": loaded.source.sha256(),
        "quantize": config_to_json(config),
        "calibration": None if calibration is None else config_to_json(calibration.config),
        "hessians": None if hessians is None else config_to_json(hessians.config),
    }
    checkpoint = BlockCheckpoint(checkpoint_dir, job) if checkpoint_dir is not None else None
    inputs = None
    if capture:
        with _stored(model, stored_outside if working.streamed else {}):
            inputs = capture_block_inputs(model, arch, calibration.tokens, calibration.config.batch_size)
    del stored_outside

    precision = calibration.config.forward_precision if calibration is not None else contextlib.nullcontext
    attention = AttentionShape.of(model.config) if config.smooth_attention is not None else None
    desc = f"quantize {config.method} {config.fmt.name}"
    finished: dict[int, BlockResults] = {}
    if inputs is None and config.smooth_attention is None:
        # no block needs another's outputs: the unfinished ones in forked workers, checkpointed as they come
        def quantize_alone(i: int) -> BlockResults:
            with resident_block(working, i) as block:
                results = _quantize_block(block, i, arch, config, hessians, None, precision, ready)
            # a streamed (big) model's come back packed: half the bytes through the pipe and in `finished`
            return {n: (StoredTensor.of(q), r) for n, (q, r) in results.items()} if working.streamed else results

        todo = [i for i in range(n_blocks) if checkpoint is None or not checkpoint.done(i)]
        for i, results in fork_map(quantize_alone, todo, workers=worker_count(), desc=desc, progress=progress):
            if checkpoint is not None:
                checkpoint.save(i, results)
            finished[i] = results
        desc = "installing"
    bar = tqdm(range(n_blocks), desc=desc, unit="block", disable=not progress)
    for i in bar:
        results = finished.pop(i, None)
        if results is None and checkpoint is not None:
            results = checkpoint.load(i, config)
        if results is not None and inputs is None and working.streamed:
            _block_kept(working, i, kept, config)  # nothing else to do with this block
        else:
            with resident_block(working, i) as block:
                if working.streamed:
                    _block_kept(working, i, kept, config, block)
                if config.smooth_attention is not None:  # before GPTQ sees the weights, or resumed ones are installed
                    _smooth_attention_block(block, i, arch, attention, config.smooth_attention, inputs, kept, precision)
                if results is not None:
                    for name, (q, _) in results.items():
                        _install(block, name, q.dequantize())
                else:
                    results = _quantize_block(block, i, arch, config, hessians, inputs, precision, ready)
                    if checkpoint is not None:
                        checkpoint.save(i, results)
                if inputs is not None:
                    with precision():
                        inputs.hidden = [run_block(block, h, inputs.extra[i][b]).float() for b, h in enumerate(inputs.hidden)]
        for name, (q, report) in results.items():
            layers[f"{prefix}.{i}.{name}"] = StoredTensor.of(q) if working.streamed else q  # a big model's: packed
            reports[f"{prefix}.{i}.{name}"] = report
    bar.close()
    return QuantizedModel(config=config, layers=layers, kept=kept, reports=reports,
                          module=None if working.streamed else model.eval())


@contextlib.contextmanager
def _stored(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Within the context, `model`'s parameters named in `tensors` hold those values (the originals,
    ties included, come back on exit)."""
    originals = {}
    for name, t in tensors.items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        if param in module._parameters:
            originals[name] = (module, param, module._parameters[param])
            module._parameters[param] = nn.Parameter(t, requires_grad=False)
    try:
        yield
    finally:
        for module, param, original in originals.values():
            module._parameters[param] = original


def _block_kept(working: LoadedModel, i: int, kept: dict[str, torch.Tensor], config: QuantizeConfig,
                block: nn.Module | None = None) -> None:
    """Streamed model: add block i's kept tensors (norms, biases) to `kept`, and set them in `block`
    as stored; without `block`, the block is read for them alone."""
    if block is None:
        with resident_block(working, i) as resident:
            return _block_kept(working, i, kept, config, resident)
    prefix = f"{working.arch.blocks}.{i}."
    own = kept_tensors(block, {f"{n}.weight" for n in working.arch.linear_names}, config.keep_dtype)
    _as_stored(block, own)
    kept.update({prefix + name: t for name, t in own.items()})


def smooth_attention_obstacle(arch: Architecture) -> str | None:
    """Why key scales cannot be folded into this architecture's projections; None where they can."""
    if arch.query_key is None:
        return f"architecture '{arch.name}' fuses its query and key projections"
    if arch.qk_norm:
        return (f"architecture '{arch.name}' normalizes queries and keys after their projections (q/k norms), "
                "which would undo the folded key scales")
    return None


def check_smooth_attention(arch: Architecture) -> None:
    """Raises UnsupportedArchitecture (with the reason) where SmoothAttention cannot be folded."""
    reason = smooth_attention_obstacle(arch)
    if reason is not None:
        raise UnsupportedArchitecture(f"SmoothAttention is not possible: {reason}")


@torch.no_grad()
def key_channel_max(block: nn.Module, key_name: str, hidden: list[torch.Tensor], extra: list[tuple],
                    precision: Callable[[], ContextManager]) -> torch.Tensor:
    """max_t |K_t| per output channel [n_kv_heads * head_dim] of the block's key projection over
    every token of the batches `hidden` ([B, T, C] each, with their block arguments `extra`)."""
    key = get_module(block, key_name)
    out = torch.zeros(key.out_features)

    def hook(module, args, output):
        out.copy_(torch.maximum(out, output.detach().float().abs().reshape(-1, key.out_features).amax(0)))
        raise _StopForward

    handle = key.register_forward_hook(hook)
    try:
        for h, e in zip(hidden, extra, strict=True):
            try:
                with precision():
                    run_block(block, h, e)
            except _StopForward:
                continue
            raise RuntimeError(f"'{key_name}' was not called by its block's forward")
    finally:
        handle.remove()
    return out


def smooth_block(block: nn.Module, arch: Architecture, shape: AttentionShape, key_max: torch.Tensor,
                 alpha: float) -> torch.Tensor:
    """SmoothAttention on one block: the scales of `key_max` (algorithms.smooth_attention.key_scales)
    folded into its query and key projections; returns the scales [n_kv_heads, head_dim]."""
    check_smooth_attention(arch)
    q_name, k_name = arch.query_key
    scales = key_scales(key_max, shape, alpha)
    fold_key_scales(get_module(block, q_name), get_module(block, k_name), scales, shape)
    return scales


def _smooth_attention_block(block: nn.Module, i: int, arch: Architecture, shape: AttentionShape, alpha: float,
                            inputs: BlockInputs, kept: dict[str, torch.Tensor], precision: Callable[[], ContextManager]) -> None:
    """SmoothAttention on block i: key scales from its keys on `inputs` folded into its query and key
    projections (see algorithms.smooth_attention); their folded biases replace the kept ones."""
    extra = [inputs.extra[i][b] for b in range(len(inputs.hidden))]
    key_max = key_channel_max(block, arch.query_key[1], inputs.hidden, extra, precision)
    smooth_block(block, arch, shape, key_max, alpha)
    for name in arch.query_key:
        bias = get_module(block, name).bias
        if bias is not None:
            kept[f"{arch.blocks}.{i}.{name}.bias"] = bias.detach().clone()


def _quantize_block(block: nn.Module, i: int, arch, config: QuantizeConfig, hessians: HessianSet | None,
                    inputs: BlockInputs | None, precision: Callable[[], ContextManager], ready: ReadyLayers | None = None,
                    ) -> dict[str, tuple[AnyQuantizedTensor | StoredTensor, LayerReport]]:
    """Every linear layer of block i, group by group in execution order, each group's Hessian from
    `hessians` (the original model's) or from `inputs` through the groups already quantized (block
    forwards in `precision()`), a layer in `ready` taken from it; the dequantized weights are
    installed in `block` as they come."""
    results = {}
    made = ready.layers if ready is not None else {}
    for names in arch.linear_groups:
        todo = [name for name in names if (full := f"{arch.blocks}.{i}.{name}") not in made
                or made[full][0].fmt != config.format_of(full)]
        hessian = None
        if todo and hessians is not None:
            hessian = hessians.hessians[f"{arch.blocks}.{i}.{names[0]}"]
        elif todo and inputs is not None:
            with precision():
                hessian = _group_hessian(block, names, inputs, i)
        for name in names:
            if name in todo:
                fmt = config.format_of(f"{arch.blocks}.{i}.{name}")
                q, report = _quantize_layer(get_module(block, name).weight, hessian, config, fmt)
            else:
                q, loss = made[f"{arch.blocks}.{i}.{name}"]
                report = LayerReport(loss=loss, seconds=0.0)
            _install(block, name, q.dequantize())
            results[name] = (q, report)
    return results

"""Load a model and its tokenizer as fp32 on CPU: stage 1 of the pipeline.

A GGUF file is read by tightfit (`tightfit.model.gguf`): the model is built empty from the config in
the metadata and each parameter is dequantized straight into place, so the load takes about the fp32
model's memory and no more. A Hugging Face folder loads through transformers' `from_pretrained`.
Before anything is read, the fp32 size is checked against the memory this process may still use.

A model whose fp32 weights exceed STREAM_ABOVE_BYTES (or that would not fit whole) is loaded
*streamed*: its decoder blocks stay on the meta device (shapes, no memory) and are read from the
files one at a time when a stage needs them (`resident_block`); only the embeddings, the final norm
and the head live in memory. Every stage walks the blocks in order, so a 1.5B model compresses in
a few GB.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightfit.errors import InsufficientMemory, ModelSourceError, QuantizedSourceWarning, native_stderr_held
from tightfit.model.architectures import Architecture, check_layout, get_module
from tightfit.model.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel
from tightfit.model.gguf import quantized_type_counts
from tightfit.model.memory import MemoryBudget, memory_budget
from tightfit.model.reading import quiet_transformers, reading
from tightfit.model.sources import GGUF, ModelSource, resolve_source
from tightfit.model.weights import CheckpointWeights, keep_first_blocks, open_weights

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "BuiltinModel", "LoadedModel", "ModelSource", "check_memory",
           "load_model", "resident_block", "resolve_source", "streams_by_default"]

# A whole-model load needs the fp32 weights plus the tokenizer, Python and the temporaries of one
# tensor being dequantized (or transformers' own for safetensors): 10% more covers them.
LOAD_HEADROOM = 1.1
# fp32 weights above this are read one decoder block at a time: at 2 GB (a 0.5B model) the stages'
# own copies of a whole model would already take most of a laptop's memory.
STREAM_ABOVE_BYTES = 2 * 10**9


@dataclass
class LoadedModel:
    """A model ready for calibration.

    Fields:
        model: the transformers `*ForCausalLM`, fp32, on CPU, in eval mode, every parameter with
            requires_grad False. Tied embeddings stay tied as transformers ties them.
        tokenizer: the transformers tokenizer stored with the model.
        arch: the architecture table entry for `model.config.model_type`.
        source: where the weights came from.
        weights: for a streamed model, the files its blocks are read from (`resident_block`); the
            blocks of `model` are then on the meta device. None when every block is in memory.
    """

    model: nn.Module
    tokenizer: Any
    arch: Architecture
    source: ModelSource
    weights: CheckpointWeights | None = None

    @property
    def streamed(self) -> bool:
        return self.weights is not None


def streamed_nbytes(weights: CheckpointWeights) -> int:
    """fp32 bytes a streamed model holds at once: everything outside the blocks, plus the largest block."""
    outside = [n for n in weights.shapes if not n.startswith(f"{weights.arch.blocks}.")]
    return weights.nbytes(outside) + max(weights.nbytes(weights.block_names(i)) for i in range(weights.n_blocks))


def check_memory(weights: CheckpointWeights, budget: MemoryBudget | None = None, *, streamed: bool = False) -> None:
    """Refuse, with what would fit, a load that would not fit in the memory left.

    Raises:
        InsufficientMemory: fp32 weights (whole, or for `streamed` the parts held at once) x
            LOAD_HEADROOM exceed `budget` (default: `memory_budget()`).
    """
    budget = budget or memory_budget()
    need = (streamed_nbytes(weights) if streamed else weights.nbytes()) * LOAD_HEADROOM
    if budget.available is None or need <= budget.available:
        return
    if streamed:
        raise InsufficientMemory(
            f"{weights.source.name} read one decoder block at a time still needs about {need / 1e9:.2f} GB (embeddings, "
            f"head and the largest block in fp32 + {LOAD_HEADROOM - 1:.0%}), {budget.available / 1e9:.1f} GB is "
            f"available ({budget.detail}); use a smaller model or free memory")
    part = streamed_nbytes(weights) * LOAD_HEADROOM
    per_part = (f"reading it one decoder block at a time needs about {part / 1e9:.2f} GB"
                + ("" if part <= budget.available else ", which does not fit either"))
    raise InsufficientMemory(
        f"loading {weights.source.name} whole needs about {need / 1e9:.1f} GB (fp32 weights + "
        f"{LOAD_HEADROOM - 1:.0%}), {budget.available / 1e9:.1f} GB is available ({budget.detail}); "
        f"{per_part}; or use a smaller model")


def _warn_if_quantized(weights: CheckpointWeights) -> None:
    """One-line warning when a GGUF source is already quantized: its rounding error and ours add up."""
    if weights.gguf is None:
        return
    quantized = quantized_type_counts(weights.gguf.header)
    if quantized:
        types = ", ".join(f"{n} tensors {name}" for name, n in quantized.items())
        warnings.warn(QuantizedSourceWarning(
            f"{weights.source.path.name} is already quantized ({types}); it is dequantized and quantized again, so "
            "both rounding errors count: start from fp16/bf16 weights where you have them"
        ), stacklevel=3)


@contextmanager
def _gguf_config_already_read(weights: CheckpointWeights) -> Iterator[None]:
    """Hand transformers' tokenizer loader the GGUF config already read.

    `AutoTokenizer.from_pretrained(gguf_file=...)` picks the tokenizer class from the config, which it
    gets from `load_gguf_checkpoint` (a full GGUFReader parse: 34 s for a 151k-token vocabulary). For
    the duration, that function returns the same config dict (`gguf_config_dict`) for this file.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.load_gguf_checkpoint
    path, config = weights.source.path, weights.gguf.config_dict

    def already_read(gguf_checkpoint_path: Any, return_tensors: bool = False, **kwargs: Any) -> dict:
        if not return_tensors and Path(gguf_checkpoint_path) == path:
            return {"config": dict(config)}
        return original(gguf_checkpoint_path, return_tensors=return_tensors, **kwargs)

    gguf_utils.load_gguf_checkpoint = already_read
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint = original


def _tokenizer(weights: CheckpointWeights) -> Any:
    from transformers import AutoTokenizer

    source = weights.source
    with reading(source.path, "tokenizer", any_exception=True), native_stderr_held():
        if source.kind != GGUF:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        else:
            with _gguf_config_already_read(weights):
                tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        largest = max(tokenizer.get_vocab().values(), default=0)
    # an id past both the token count and the model's vocabulary is no token of this model (and saving
    # the tokenizer would take `tokenizers` as long as counting up to it)
    vocab = getattr(weights.config, "vocab_size", 0)
    if largest >= max(len(tokenizer), vocab if isinstance(vocab, int) else 0):
        raise ModelSourceError(f"the tokenizer of {source.path} has token id {largest}, past its {len(tokenizer)} tokens "
                               f"and the model's vocabulary of {vocab}")
    return tokenizer


def _empty_model(weights: CheckpointWeights) -> nn.Module:
    """The transformers model for `weights`, its parameters allocated but never written (no init):
    they take no memory before their replacement frees them. Buffers (e.g. RoPE's inverse
    frequencies) are computed as usual."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(copy.deepcopy(weights.config), dtype=torch.float32)


def _filled_model(weights: CheckpointWeights, *, streamed: bool) -> nn.Module:
    """The model with every parameter read from `weights` (GGUF, or safetensors when streamed);
    streamed: the decoder blocks' parameters go to the meta device instead."""
    model = _empty_model(weights)
    blocks = get_module(model, weights.arch.blocks)
    if streamed:
        blocks.to("meta")
    for name, shape in weights.shapes.items():
        module_name, _, param = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:  # a tensor name the config's model does not have
            module = nn.Module()
        current = module._parameters.get(param)
        if current is None or tuple(current.shape) != shape:
            raise ModelSourceError(f"{weights.source.path}: tensor for {name} has shape {list(shape)}, the model "
                                   f"{'has no such parameter' if current is None else f'needs {list(current.shape)}'}")
        if not (streamed and name.startswith(f"{weights.arch.blocks}.")):
            module._parameters[param] = nn.Parameter(weights.read(name), requires_grad=False)
    if weights.tied:
        model.tie_weights()
    missing = sorted({name for name, _ in model.named_parameters()} - set(weights.shapes))
    if missing:
        raise missing_tensors(weights, missing)
    return model


def missing_tensors(weights: CheckpointWeights, names: list[str]) -> ModelSourceError:
    """The error for a checkpoint that lacks tensors the model needs (`names`: the first three are named)."""
    return ModelSourceError(f"{weights.source.path} has no tensor for {len(names)} parameter(s): "
                            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")


@contextmanager
def resident_block(loaded: LoadedModel, i: int) -> Iterator[nn.Module]:
    """Decoder block `i` of `loaded.model` with its weights in memory for the duration.

    In memory already: the block itself, untouched. Streamed: its parameters are read from the files
    (fp32) on entry and returned to the meta device on exit, with whatever was written into them.
    """
    block = get_module(loaded.model, loaded.arch.blocks)[i]
    if loaded.weights is None:
        yield block
        return
    with reading(loaded.source.path, "weights"):
        block.load_state_dict(loaded.weights.block(i), strict=True, assign=True)
    block.requires_grad_(False)
    try:
        yield block
    finally:
        block.to("meta")


def _hf_model(weights: CheckpointWeights) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the shapes config.json implies, compared before anything is allocated
        shell = AutoModelForCausalLM.from_config(copy.deepcopy(weights.config))
    for name, param in shell.named_parameters():
        shape = weights.shapes.get(name)
        if shape is not None and shape != tuple(param.shape):
            raise ModelSourceError(f"{weights.source.path}: tensor {name} has shape {list(shape)}, config.json "
                                   f"implies {list(param.shape)}")
    return AutoModelForCausalLM.from_pretrained(weights.source.path, config=weights.config, dtype=torch.float32,
                                                use_safetensors=True)


def streams_by_default(weights: CheckpointWeights, budget: MemoryBudget | None = None) -> bool:
    """Whether `load_model` reads `weights` one decoder block at a time unless told: fp32 weights above
    STREAM_ABOVE_BYTES, or more (x LOAD_HEADROOM) than `budget` (default: `memory_budget()`) allows."""
    budget = budget or memory_budget()
    whole = weights.nbytes() * LOAD_HEADROOM
    return weights.nbytes() > STREAM_ABOVE_BYTES or (budget.available is not None and whole > budget.available)


def load_model(spec: str | ModelSource | CheckpointWeights, *, streamed: bool | None = None, first_blocks: int | None = None) -> LoadedModel:
    """Load a model and its tokenizer: fp32, CPU, eval mode, no gradients.

    The config is read first and checked against the architecture table, so an unsupported model
    fails before any weight is read; then the fp32 size is checked against the memory left.
    streamed: keep the decoder blocks in the files (see the module docstring); None decides by size
    (above STREAM_ABOVE_BYTES, or when the whole model would not fit).
    first_blocks: only the first decoder blocks (`open_weights`); the size decision is the whole model's.
    spec may be weights already opened (`open_weights`), e.g. to estimate a run's memory first.

    Raises:
        ModelSourceError: the source cannot be resolved, or a file in it cannot be read.
        UnsupportedArchitecture: `config.model_type` is not in the table, or the loaded modules
            do not have the layout the table says.
        InsufficientMemory: the whole model in fp32 would not fit in the memory left.
    """
    weights = spec if isinstance(spec, CheckpointWeights) else open_weights(spec)
    if streamed is None:
        streamed = streams_by_default(weights)
    if first_blocks is not None:
        weights = keep_first_blocks(weights, first_blocks)
    check_memory(weights, streamed=streamed)
    with quiet_transformers():
        _warn_if_quantized(weights)
        tokenizer = _tokenizer(weights)
        with reading(weights.source.path, "weights"):
            if streamed or weights.gguf is not None:
                model = _filled_model(weights, streamed=streamed)
            else:
                model = _hf_model(weights)
    model.eval()
    model.requires_grad_(False)
    check_layout(model, weights.arch)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=weights.arch, source=weights.source,
                       weights=weights if streamed else None)

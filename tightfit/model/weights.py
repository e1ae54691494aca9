"""A model's weights read from its files on demand: one decoder block, the embeddings, the head or the final norm.

For models larger than memory, sequential quantization can hold one block at a time: `open_weights`
reads only the config and the tensor tables, and each call below reads (and for GGUF, dequantizes)
just the tensors asked for. GGUF tensors come from a memory map (`tightfit.model.gguf`),
safetensors through `safe_open`; both are fp32 and named as in the transformers model, so a block's
tensors equal those of the fully loaded model (tests/model/test_weights.py). `load_model` builds
GGUF models from the same reader.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tightfit.errors import ModelSourceError
from tightfit.model.architectures import Architecture, architecture_for
from tightfit.model.checkpoint_files import read_gguf_header
from tightfit.model.gguf import GGUFTensors, gguf_config, open_gguf_tensors
from tightfit.model.reading import quiet_transformers, reading
from tightfit.model.sources import GGUF, ModelSource, resolve_source

_FP32_BYTES = 4


@dataclass(frozen=True)
class CheckpointWeights:
    """The parameters of a model, read from its files one tensor at a time.

    Fields:
        source: where the files are.
        config: the transformers config (for GGUF: the one transformers derives from the metadata).
        arch: the architecture table entry for `config.model_type`.
        shapes: transformers parameter name -> shape, for every parameter the files hold (a tied
            head is absent: it is the embeddings).
        gguf: for GGUF sources, the file's tensors (header, name map); None for safetensors.
        read: name -> the tensor, fp32, contiguous, owned by the caller.
    """

    source: ModelSource
    config: Any
    arch: Architecture
    shapes: dict[str, tuple[int, ...]]
    gguf: GGUFTensors | None
    read: Callable[[str], torch.Tensor]

    @property
    def n_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        """Whether the head is the embedding matrix: the files hold no head of its own."""
        return f"{self.arch.head}.weight" not in self.shapes

    def block_names(self, i: int) -> list[str]:
        """The parameter names of decoder block `i`, full (e.g. "model.layers.3.mlp.up_proj.weight")."""
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} of a model with {self.n_blocks} blocks")
        prefix = f"{self.arch.blocks}.{i}."
        return [name for name in self.shapes if name.startswith(prefix)]

    def block(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder block `i`: name relative to the block (e.g. "mlp.up_proj.weight") -> fp32 tensor."""
        prefix = f"{self.arch.blocks}.{i}."
        return {name[len(prefix):]: self.read(name) for name in self.block_names(i)}

    def embeddings(self) -> torch.Tensor:
        """The token embedding matrix, [vocab, hidden] fp32."""
        return self.read(f"{self.arch.embeddings}.weight")

    def head(self) -> torch.Tensor:
        """The output projection, [vocab, hidden] fp32 (the embeddings when tied)."""
        return self.embeddings() if self.tied else self.read(f"{self.arch.head}.weight")

    def norm(self) -> dict[str, torch.Tensor]:
        """The final norm's parameters, by name relative to it (e.g. "weight")."""
        prefix = f"{self.arch.norm}."
        return {name[len(prefix):]: self.read(name) for name in self.shapes if name.startswith(prefix)}

    def nbytes(self, names: list[str] | None = None) -> int:
        """fp32 bytes of `names` (default: every parameter, the whole model as `load_model` holds it)."""
        total = 0
        for name in self.shapes if names is None else names:
            n = 1
            for d in self.shapes[name]:
                n *= d
            total += n * _FP32_BYTES
        return total


def _parameter_names(config: Any) -> list[str]:
    """The state-dict names of the transformers model for `config`, from a model on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(model.state_dict())


def _check_block_count(source: ModelSource, config: Any, found: set[str]) -> None:
    """The config's number of decoder blocks is the number the file holds (`found`: their indices),
    checked before a model of that many blocks is built."""
    if getattr(config, "num_hidden_layers", None) != len(found):
        raise ModelSourceError(f"{source.path}: the config says {getattr(config, 'num_hidden_layers', None)!r} decoder "
                               f"blocks, the tensors hold {len(found)}")


def _gguf_weights(source: ModelSource) -> CheckpointWeights:
    header = read_gguf_header(source.path)
    with reading(source.path, "config"):
        config = gguf_config(header)
    arch = architecture_for(config)
    _check_block_count(source, config, {t.name.split(".")[1] for t in header.tensors if t.name.startswith("blk.")})
    with reading(source.path, "tensor table"):
        tensors = open_gguf_tensors(header, _parameter_names(config))
    shapes = {name: info.shape for name, info in tensors.names.items()}
    return CheckpointWeights(source, config, arch, shapes, tensors, tensors.read)


def _safetensors_weights(source: ModelSource) -> CheckpointWeights:
    from safetensors import safe_open
    from transformers import AutoConfig

    with reading(source.path, "config"):
        config = AutoConfig.from_pretrained(source.path)
    arch = architecture_for(config)
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with reading(source.path, "weights"):
        for file in sorted(source.path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    where[name], shapes[name] = file, tuple(f.get_slice(name).get_shape())
    blocks = {name[len(arch.blocks) + 1:].split(".")[0] for name in shapes if name.startswith(f"{arch.blocks}.")}
    _check_block_count(source, config, blocks)

    def read(name: str) -> torch.Tensor:
        with reading(where[name], "weights"), safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name).to(torch.float32).contiguous()

    return CheckpointWeights(source, config, arch, shapes, None, read)


def open_weights(spec: str | ModelSource, *, first_blocks: int | None = None) -> CheckpointWeights:
    """Open a model's files for reading one part at a time (headers only; no tensor is read yet).

    first_blocks: keep only the first decoder blocks, a smaller model of the same kind (the config
    says so), to try a big model's whole path in minutes.

    Raises:
        ModelSourceError: the source cannot be resolved, or its config or tensor table cannot be read.
        UnsupportedArchitecture: `config.model_type` is not in the architecture table.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    with quiet_transformers():
        weights = _gguf_weights(source) if source.kind == GGUF else _safetensors_weights(source)
    return weights if first_blocks is None else keep_first_blocks(weights, first_blocks)


def keep_first_blocks(weights: CheckpointWeights, n: int) -> CheckpointWeights:
    if not 1 <= n <= weights.n_blocks:
        raise ModelSourceError(f"{weights.source.name} has {weights.n_blocks} decoder blocks; cannot keep the first {n}")
    config = copy.deepcopy(weights.config)
    config.num_hidden_layers = n
    for per_layer in ("layer_types",):  # per-block lists of the config (sliding or full attention, ...)
        if isinstance(getattr(config, per_layer, None), list):
            setattr(config, per_layer, getattr(config, per_layer)[:n])
    prefix = f"{weights.arch.blocks}."
    shapes = {name: shape for name, shape in weights.shapes.items()
              if not name.startswith(prefix) or int(name[len(prefix):].split(".", 1)[0]) < n}
    return dataclasses.replace(weights, config=config, shapes=shapes)

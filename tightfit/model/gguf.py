"""GGUF files read for transformers, fast: the config from the header, each tensor dequantized from a memory map.

transformers' own GGUF path (`from_pretrained(gguf_file=...)`) parses the whole metadata with
gguf-py's `GGUFReader` once for the config, once for the tokenizer and once for the weights (34 s
each for a 151k-token vocabulary, which it reads string by string), dequantizes in groups of 16 rows
and copies every tensor twice on its way to the model. Here the header is read once
(`read_gguf_header`, which walks over the vocabulary), and each tensor is dequantized in large
chunks straight from a memory map into the array that becomes the parameter (`tightfit.model.dequant`).
What llama.cpp's converter did to names and values is undone with the transformers and gguf-py
tables, used as data:
    config keys        transformers' GGUF_CONFIG_MAPPING and GGUF_CONFIG_DEFAULTS_MAPPING
    tensor names       gguf-py's `get_tensor_name_map` (transformers module name -> GGUF name)
    value transforms   transformers' TENSOR_PROCESSORS (llama: q/k rows un-permuted; gemma: norms - 1)
so the config and the weights are those transformers builds, bit for bit (tests/model/test_gguf.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tightfit.errors import ModelSourceError
from tightfit.model.architectures import architecture_for
from tightfit.model.checkpoint_files import GGUFHeader, GGUFTensorInfo, StringArray
from tightfit.model.dequant import UNQUANTIZED, dequantize


def quantized_type_counts(header: GGUFHeader) -> dict[str, int]:
    """How many tensors of each quantized GGML type the file holds, most frequent first ({} when none)."""
    return dict(Counter(t.ggml_type.name for t in header.tensors if t.ggml_type not in UNQUANTIZED).most_common())


# ---------------------------------------------------------------- the config


def _architectures(header: GGUFHeader) -> tuple[str, str]:
    """(the file's `general.architecture`, the transformers architecture it stands for), as transformers decides."""
    architecture = header.metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise ModelSourceError(f"{header.path} has no general.architecture in its GGUF metadata")
    # llama.cpp writes Mistral as llama; transformers tells them apart by the exact name "mistral".
    if "llama" in architecture and header.metadata.get("general.name") == "mistral":
        return architecture, "mistral"
    return architecture, architecture


def gguf_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The config keys transformers' `load_gguf_checkpoint` derives from this header (decoder-only families).

    Raises:
        UnsupportedArchitecture: the file's architecture is not in the architecture table (checked first).
        ModelSourceError: a config value is an array of strings, which this reader leaves unread.
    """
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture, updated = _architectures(header)
    architecture_for(SimpleNamespace(model_type=_model_type(updated)))
    config: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in header.tensors)}
    for key, value in (GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture)
                       or {}).items():
        config.setdefault(key, value)
    for key, value in header.metadata.items():  # in file order, as transformers walks them
        prefix, _, config_key = key.replace(architecture, updated).partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(config_key)
        if target is None or target == -1:
            continue
        if isinstance(value, StringArray):
            raise ModelSourceError(f"{header.path}: GGUF key {key} is an array of strings, not a config value")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # transformers reads every value as a list and unwraps those of one element
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        config[target] = value
    config["model_type"] = _model_type(config.get("model_type", updated))
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, StringArray):
        config["vocab_size"] = tokens.length
    return config


def _model_type(architecture: str) -> str:
    """GGUF files of Gemma 3 hold only the text model."""
    return "gemma3_text" if architecture == "gemma3" else architecture


def gguf_config(header: GGUFHeader) -> Any:
    """The transformers config `AutoConfig.from_pretrained(folder, gguf_file=...)` returns for this file."""
    from transformers import CONFIG_MAPPING

    config = gguf_config_dict(header)
    config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    config._name_or_path = str(header.path.parent)  # the folder, as from_pretrained(folder, gguf_file=...) records
    return config


# ---------------------------------------------------------------- the tensors


@dataclass(frozen=True)
class GGUFTensors:
    """The tensors of one GGUF file under transformers parameter names, read on demand from a memory map.

    Fields:
        header: the parsed file.
        config_dict: `gguf_config_dict(header)`, which transformers' value transforms read.
        names: transformers parameter name -> the GGUF tensor it is read from. A tied head is
            absent (the file has no `output.weight`); so are GGUF tensors no parameter takes
            (e.g. llama 3's `rope_freqs`), which transformers skips too.
    """

    header: GGUFHeader
    config_dict: dict[str, Any]
    names: dict[str, GGUFTensorInfo]

    def read(self, name: str) -> torch.Tensor:
        """The parameter `name`, fp32, contiguous, owned (not a view of the file)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        info = self.names[name]
        data = np.memmap(self.header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        values = dequantize(data, info)
        processor = TENSOR_PROCESSORS.get(self.header.metadata["general.architecture"], TensorProcessor)
        values = processor(config=self.config_dict).process(weights=values, name=info.name).weights
        return torch.from_numpy(np.require(values, np.float32, ["C", "W"]))


def open_gguf_tensors(header: GGUFHeader, model_names: list[str]) -> GGUFTensors:
    """The tensors behind `model_names`, the parameter names of a model built from this file's config.

    Names are mapped with gguf-py's table for the file's own architecture, the way transformers
    maps them (it builds that table once per submodule, 370 times for a 28-block model).
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    architecture = header.metadata["general.architecture"]
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise ModelSourceError(f"{header.path}: gguf-py has no tensor names for architecture '{architecture}'")
    name_map = get_tensor_name_map(arch, int(header.metadata[f"{architecture}.block_count"]))
    tensors = {t.name: t for t in header.tensors}
    names: dict[str, GGUFTensorInfo] = {}
    for hf_name in model_names:
        module, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            module, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_module = name_map.get_name(module)
        if gguf_module is not None and gguf_module + suffix in tensors:
            names[hf_name] = tensors[gguf_module + suffix]
    return GGUFTensors(header=header, config_dict=gguf_config_dict(header), names=names)


# ---------------------------------------------------------------- the reference


def transformers_gguf_model(path: Path) -> Any:
    """The model as transformers itself loads the GGUF file `path` (fp32, dequantized): the slow path this
    module replaces, kept as the reference the tests compare against and bench/load.py times."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from tightfit.model.reading import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    # Forget that the weights came from GGUF blocks, as a model built by `load_model` never knew.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval().requires_grad_(False)

"""Export: write a packed model in formats other runtimes load (last stage of the pipeline).

    gguf                 one .gguf file for llama.cpp (`export_gguf`)
    compressed-tensors   a transformers / vLLM folder in the pack-quantized layout (`export_compressed_tensors`)

Each exporter returns an `ExportReport` saying, per tensor, which target type holds it and whether
exactly (checked by decoding what was written) or approximately (with the measured max error).
Imports only tightfit.formats, tightfit.runtime and tightfit.errors.
"""

from tightfit.export.common import ExportReport, TensorMapping
from tightfit.export.compressed_tensors import export_compressed_tensors
from tightfit.export.gguf import export_gguf

EXPORTERS = {"gguf": export_gguf, "compressed-tensors": export_compressed_tensors}

__all__ = ["EXPORTERS", "ExportReport", "TensorMapping", "export_compressed_tensors", "export_gguf"]

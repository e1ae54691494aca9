"""llama.cpp (llama-cpp-python) as the benchmarks use it: its own quantizer, the bytes of a GGUF's
tensors, its logits for scoring (bench/peers.py) and a Backend for timing (bench/speed.py, peers)."""

from __future__ import annotations

import ctypes
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# The 7 linear tensors of a Llama block, as GGUF names them.
GGUF_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def quantize(src: Path, dst: Path, type_name: str, *, imatrix: dict[str, np.ndarray] | None = None,
             f16_embeddings: bool = False, threads: int = 2) -> float:
    """llama_model_quantize(src -> dst) to `type_name` (e.g. Q4_K_M); returns seconds.

    imatrix: GGUF tensor name -> mean squared input activation per input channel [K] fp32.
    f16_embeddings: keep token embeddings and the output tensor F16 (else llama.cpp's choice).
    Raises RuntimeError when llama.cpp refuses.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.allow_requantize = True
    if f16_embeddings:
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    keep = []  # what the C structs point into, alive until the call returns
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            keep.append(name.encode())
            arr[i].name = keep[-1]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(imatrix)].name = None  # terminator
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")
    return seconds


def gguf_linear_bits(path: Path) -> tuple[float, dict[str, int]]:
    """(bits/weight of the quantized linears, GGML type -> tensor count) from the GGUF tensor table."""
    from gguf import GGUFReader

    nbytes = nweights = 0
    types: Counter = Counter()
    for t in GGUFReader(str(path)).tensors:
        if GGUF_LINEAR.match(t.name):
            nbytes += int(t.n_bytes)
            nweights += int(t.n_elements)
            types[t.tensor_type.name] += 1
    return 8 * nbytes / nweights, dict(types)


def gguf_tensor_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes of every tensor in the file, GGML type -> count of its 2-D tensors)."""
    from gguf import GGUFReader

    types: Counter = Counter()
    nbytes = 0
    for t in GGUFReader(str(path)).tensors:
        nbytes += int(t.n_bytes)
        if len(t.shape) == 2:
            types[t.tensor_type.name] += 1
    return nbytes, dict(types)


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes a decode step reads: every tensor, less the token embeddings when an output tensor of
    its own exists (then only one row of them is read per token)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


class LlamaLogits:
    """llama.cpp as an evaluate.Scorer: ids [T] -> logits [T, V] of every position (logits_all),
    its cache cleared per window."""

    def __init__(self, path: Path, ctx: int, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.dim() == 1, ids.shape
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return torch.from_numpy(np.array(self.llm.scores[: ids.numel()]))  # [T, V]

    def close(self) -> None:
        self.llm.close()


class LlamaCppBackend:
    """llama.cpp behind the Backend protocol (runtime/backend.py), for greedy timing only."""

    def __init__(self, path: Path, threads: int, max_positions: int, *, kv_type: str | None = None) -> None:
        """kv_type: the KV cache's GGML type ("F16", "Q8_0", "Q4_0"; None: llama.cpp's default, F16);
        a quantized one needs flash attention in llama.cpp, which is then on."""
        import llama_cpp

        kv = {} if kv_type is None else {"type_k": getattr(llama_cpp, f"GGML_TYPE_{kv_type}"),
                                          "type_v": getattr(llama_cpp, f"GGML_TYPE_{kv_type}"), "flash_attn": True}
        # without logits_all llama-cpp-python keeps n_batch rows of scores and writes row (position - 1): a batch
        # as long as the cache lets a decode past position 512 find its row
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=max_positions,
                                   n_batch=max(512, max_positions), n_ubatch=512, logits_all=False, verbose=False, **kv)
        self.vocab_size = self.llm.n_vocab()
        self.max_positions = max_positions

    @property
    def position(self) -> int:
        return self.llm.n_tokens

    def reset(self) -> None:
        self.llm.reset()

    def truncate(self, n: int) -> None:
        self.llm.n_tokens = n

    def forward(self, ids):
        self.llm.eval(list(ids))
        return torch.from_numpy(self.llm.scores[self.llm.n_tokens - 1])

    def close(self) -> None:
        self.llm.close()

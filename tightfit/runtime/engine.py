"""FastBackend: tightfit's compiled CPU engine behind the Backend protocol (runtime/backend.py).

One C++ call runs a whole forward step (all layers, attention with a preallocated KV cache in fp16
or in 8- or 4-bit codes (`kv_bits`, runtime/kernels/kv_cache.h), the head) with the engine's own
threads, kept across calls, that meet only where one needs rows another computed (a decode call runs
on one of them where the machine is so busy that this is faster: runtime/kernels/threads.h); quantized matrices run the AVX-512
VNNI kernels of runtime/kernels (int8 block-32 activations, like llama.cpp's Q8_0), dense ones an
fp32-activation kernel.

Supported here: every architecture of runtime/engine_config.py's table (llama, mistral, qwen2,
gemma3_text, phi3), whose differences are data in the engine's config, not code of their own; RoPE
tables come from transformers' own rotary module. Sliding-window layers keep a ring of their window
(plus one call's tokens) in the KV cache. What the engine cannot run raises KernelUnavailable;
`open_backend` with engine="auto" then falls back to the TorchBackend reference with a warning.
"""

from __future__ import annotations

import dataclasses

import ctypes
import warnings
from pathlib import Path
from typing import Sequence

import torch

from tightfit.errors import GenerationError, KernelUnavailable, PackedModelError
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.formats.spqr import SpQRTensor
from tightfit.runtime.engine_checks import MODULES, create_engine, validate_packed_for_engine
from tightfit.runtime.engine_config import (
    DEFAULT_KV_BITS, KV_BITS, LAYOUTS, EngineLayout, EngineSpec, check_kv_bits, engine_spec, layout_for,
)
from tightfit.runtime.kernels import KernelMatrix, from_dense, from_quantized
from tightfit.runtime.kernels.build import load
from tightfit.runtime.kernels.layout import TfMat, from_spqr, has_kernel, spqr_rows_fit
from tightfit.runtime.model import transformers_config

ENGINE_MODEL_TYPES = tuple(LAYOUTS)
DEFAULT_MAX_BATCH = 64  # tokens per C++ call; longer prompts are fed in chunks
RING_LOST = -3  # tf_engine_forward: a sliding-window ring no longer holds what the call reads
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
_MODULE = MODULES  # projection -> its module in a Llama-layout block
_LAYER_VECTORS = ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")  # EngineLayout's norms


class TfLayer(ctypes.Structure):
    _fields_ = [(f, ctypes.c_void_p) for f in (*_LAYER_VECTORS, "rope_cos", "rope_sin")] + [("window", ctypes.c_int32)] + [
        (p, TfMat) for p in _PROJECTIONS
    ]


class TfConfig(ctypes.Structure):
    _fields_ = [
        *[(f, ctypes.c_int32) for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "inter", "vocab",
                                         "max_pos", "max_batch", "threads", "exact", "rope_dim", "act", "kv_bits")],
        *[(f, ctypes.c_float) for f in ("eps", "attn_scale", "final_softcap", "embed_scale")],
        ("embed", TfMat),
        ("head", TfMat),
        ("final_norm", ctypes.c_void_p),
        ("layers", ctypes.POINTER(TfLayer)),
    ]


def default_threads() -> int:
    """torch's intra-op thread count (what the reference path uses), at least 1."""
    return max(1, torch.get_num_threads())


class FastBackend:
    """The compiled engine with a KV cache of `max_positions` tokens (see module docstring).

    exact: quantized matmuls multiply the fp32 activations instead of their int8 blocks (about 3x
    slower; then only fp32 summation order and the KV cache's rounding, fp16 or kv_bits codes,
    separate it from the reference).
    portable: the portable scalar build instead of the one compiled for this CPU, or build.AVX2 (tests).
    kv_bits: the KV cache's width, 16 (fp16), 8 or 4 (asymmetric codes with fp16 scales, per token but
        4-bit keys, per channel over blocks of 16 positions; KV_BITS).
    """

    def __init__(self, packed: PackedModel, *, max_positions: int = 2048, threads: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, exact: bool = False, portable: bool | str = False,
                 kv_bits: int = DEFAULT_KV_BITS) -> None:
        layout = layout_for(packed.hf_config.get("model_type"))  # an unknown architecture is refused before its config is built
        config = transformers_config(packed)
        self._lib = load(portable)
        # every size config.json gives checked against every tensor the engine reads, before engine_spec uses them
        dims = validate_packed_for_engine(packed, config, layout, self._lib.tf_max_head_dim())
        spec = engine_spec(config, dims, max_positions)
        self.kv_bits = check_kv_bits(kv_bits, dims.head_dim)
        self.vocab_size = dims.vocab
        self.max_positions = spec.max_positions
        self.max_batch = int(max_batch)
        self.threads = threads or default_threads()
        self.slow_layers: list[str] = []  # layers the engine runs as dense fp32 (no fast kernel for their format or cut)
        self._keep: list = []  # every tensor the C structs point into
        self._position = 0
        self._history: list[int] = []  # the ids in the cache (a truncation past a ring's reach runs them again)

        offset = spec.layout.norm_offset
        layers = (TfLayer * dims.n_layers)()
        for i in range(dims.n_layers):
            prefix = f"model.layers.{i}"
            for field in _LAYER_VECTORS:
                name = getattr(spec.layout, field)
                if name is not None:
                    setattr(layers[i], field, self._vector(packed, f"{prefix}.{name}.weight", offset))
            layers[i].rope_cos, layers[i].rope_sin = spec.rope_cos[i].data_ptr(), spec.rope_sin[i].data_ptr()
            layers[i].window = spec.windows[i]
            for p, m in self._projections(packed, prefix, spec).items():
                setattr(layers[i], p, m.struct())
        embed = self._matrix(packed, "model.embed_tokens", bias=False)
        head_name = packed.tied.get("lm_head.weight")
        head = embed if head_name == "model.embed_tokens.weight" else self._matrix(packed, "lm_head", bias=False)
        self.weight_bytes = sum(m.nbytes for m in self._keep if isinstance(m, KernelMatrix) and m is not embed) + (
            embed.nbytes if head is embed else 0
        )
        self._keep += [spec.rope_cos, spec.rope_sin, layers]
        self._config = TfConfig(
            **dataclasses.asdict(dims), max_pos=self.max_positions,
            max_batch=self.max_batch, threads=self.threads, exact=int(exact), rope_dim=spec.rope_dim, act=spec.act,
            kv_bits=self.kv_bits,
            eps=spec.eps, attn_scale=spec.attn_scale, final_softcap=spec.final_softcap, embed_scale=spec.embed_scale,
            embed=embed.struct(), head=head.struct(),
            final_norm=self._vector(packed, "model.norm.weight", offset), layers=layers,
        )
        self._engine = create_engine(self._lib, self._config)
        self.kv_bytes = int(self._lib.tf_engine_kv_bytes(self._engine))  # K and V of every layer, rings included
        # what one more position adds to the cache of every layer: codes (or fp16) + scales of K and V
        self.kv_bytes_per_token = int(self._lib.tf_engine_kv_bytes_per_token(self._engine))
        self._logits = torch.empty(self.max_batch, self.vocab_size, dtype=torch.float32)
        self._logits_ptr = self._logits.data_ptr()
        self._ids_c = (ctypes.c_int32 * self.max_batch)()
        self._forward_c = self._lib.tf_engine_forward

    PHASES = ("norm+quantize", "qkv", "attention", "o", "gate/up", "down", "head", "barriers")
    LINEAR_PHASES = ("qkv", "o", "gate/up", "down")  # the decoder blocks' matmuls (activation quantization included)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase of the forward steps since the last call (then reset to 0), as
        thread 0 spent them; `barriers` is its waiting for the other threads."""
        out = (ctypes.c_double * len(self.PHASES))()
        self._lib.tf_engine_profile(self._engine, out)
        return dict(zip(self.PHASES, out))

    # ---- weights -----------------------------------------------------------------------------

    def _vector(self, packed: PackedModel, name: str, offset: float = 0.0) -> int:
        """Address of a norm weight in fp32, plus `offset` (Gemma's 1 + w, folded in: the same fp32
        sum the reference computes)."""
        t = packed.kept.get(name)
        if t is None:
            raise PackedModelError(f"packed model lacks {name}")
        t = t.to(torch.float32).contiguous()
        if offset:
            t = t + offset
        self._keep.append(t)
        return t.data_ptr()

    def _projections(self, packed: PackedModel, prefix: str, spec: EngineSpec) -> dict[str, KernelMatrix]:
        """The seven projections of block `prefix`; fused ones are split by rows at load (exact:
        quantization groups run along the input dimension)."""
        layout: EngineLayout = spec.layout
        shapes = spec.dims.matrix_shapes()
        out: dict[str, KernelMatrix] = {}
        for module, parts in ((layout.qkv, ("q", "k", "v")), (layout.gate_up, ("gate", "up"))):
            start = 0
            for p in parts if module else ():
                out[p] = self._matrix(packed, f"{prefix}.{module}", rows=(start, start + shapes[p][0]))
                start += shapes[p][0]
        return {p: out[p] if p in out else self._matrix(packed, f"{prefix}.{_MODULE[p]}") for p in _PROJECTIONS}

    def _matrix(self, packed: PackedModel, module: str, *, bias: bool = True,
                rows: tuple[int, int] | None = None) -> KernelMatrix:
        """A weight (and bias) in kernel layout; `rows` [start, stop) of it only, for a fused projection."""
        cut = slice(*rows) if rows else slice(None)
        b = packed.kept.get(f"{module}.bias") if bias else None
        b = None if b is None else b[cut]
        if module in packed.layers:
            q = packed.layers[module]
            if isinstance(q, SpQRTensor) and spqr_rows_fit(rows):
                m = from_spqr(q, b, rows)
            elif has_kernel(q.fmt) and not isinstance(q, SpQRTensor):
                m = from_quantized(q.rows(cut) if rows else q, b)  # a fused projection's part: its rows (and per-row tables)
            else:  # no kernel for this format family (or an SpQR part cut inside a 16-row statistics group): exact fp32 weights
                if f"{module} ({q.fmt.name})" not in self.slow_layers:
                    self.slow_layers.append(f"{module} ({q.fmt.name})")
                m = from_dense(q.dequantize()[cut], b)
        else:
            name = packed.tied.get(f"{module}.weight", f"{module}.weight")
            w = packed.kept.get(name)
            if w is None:
                raise PackedModelError(f"packed model lacks {module}")
            m = from_dense(w[cut], b)
        self._keep.append(m)
        return m

    # ---- Backend protocol --------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0
        self._history.clear()

    def truncate(self, n: int) -> None:
        """Keep the first n tokens. Entries past n are overwritten before they are read again; where a
        sliding-window ring has already overwritten what the next call reads, that call first runs
        the n kept tokens again (the engine says so, RING_LOST)."""
        if not 0 <= n <= self._position:
            raise ValueError(f"cannot keep {n} tokens of a cache holding {self._position}")
        self._position = n
        del self._history[n:]

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ids; logits of the last one [vocab] fp32 (a view, valid until the next call)."""
        return self._run(ids, all_logits=False)[-1]

    def forward_all(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ids; logits of every one [len(ids), vocab] fp32 (a new tensor)."""
        return self._run(ids, all_logits=True)

    def _run(self, ids: Sequence[int], *, all_logits: bool) -> torch.Tensor:
        ids = list(ids)
        if not ids:
            raise ValueError("forward needs at least one token")
        if self._position + len(ids) > self.max_positions:
            raise GenerationError(f"KV cache overflow: {self._position} cached + {len(ids)} new tokens > max_positions "
                                  f"{self.max_positions}")  # as TorchBackend says it
        out = torch.empty(len(ids), self.vocab_size) if all_logits else None
        for s in range(0, len(ids), self.max_batch):
            chunk = ids[s : s + self.max_batch]
            self._step(chunk, all_logits)
            if all_logits:
                out[s : s + len(chunk)] = self._logits[: len(chunk)]
        return out if all_logits else self._logits[:1]

    def _step(self, chunk: list[int], all_logits: bool) -> None:
        """One C call: chunk (at most max_batch ids) at the current position."""
        m = len(chunk)
        self._ids_c[:m] = chunk
        rc = self._forward_c(self._engine, self._ids_c, m, self._position, self._logits_ptr, int(all_logits))
        if rc == RING_LOST:  # after a truncation: run the kept tokens again from position 0, then this chunk
            kept, self._position = self._history, 0
            self._history = []
            for s in range(0, len(kept), self.max_batch):
                self._step(kept[s : s + self.max_batch], False)
            self._ids_c[:m] = chunk
            rc = self._forward_c(self._engine, self._ids_c, m, self._position, self._logits_ptr, int(all_logits))
        if rc == -2:
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1} in {chunk}")
        if rc != 0:
            raise ValueError(f"engine refused {m} tokens at position {self._position} (code {rc})")
        self._position += m
        self._history += chunk

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine:
            self._lib.tf_engine_free(engine)
            self._engine = None


DEFAULT_FAST_POSITIONS = 4096  # fp16 KV cache of the fast engine: 30 layers x 3 heads x 64 x (k + v) x 2 bytes -> 94 MB at 4096


def open_backend(path: Path | PackedModel, *, engine: str = "auto", max_positions: int | None = None,
                 threads: int | None = None, kv_bits: int = DEFAULT_KV_BITS):
    """A Backend for a packed model: engine "fast" (compiled), "torch" (reference) or "auto"
    (fast where it supports the model and this machine can build it, else torch with a warning).
    max_positions None: the model's context length (the fast engine caps it at DEFAULT_FAST_POSITIONS).
    kv_bits 8 or 4: the fast engine's quantized KV cache; the torch engine refuses them (KernelUnavailable),
    and "auto" then does not fall back to it."""
    from tightfit.runtime.torch_backend import TorchBackend

    if engine not in ("auto", "fast", "torch"):
        raise ValueError(f"engine must be auto, fast or torch, got {engine!r}")
    if engine == "torch" and kv_bits != DEFAULT_KV_BITS:
        raise KernelUnavailable(f"a {kv_bits}-bit KV cache runs on the fast engine only; drop --engine torch or use --kv 16")
    packed = path if isinstance(path, PackedModel) else load_packed(Path(path))
    if engine != "torch":
        try:
            return FastBackend(packed, max_positions=max_positions or DEFAULT_FAST_POSITIONS, threads=threads,
                               kv_bits=kv_bits)
        except KernelUnavailable as e:
            if engine == "fast" or kv_bits != DEFAULT_KV_BITS:
                raise
            warnings.warn(f"{e}; running the torch reference engine", stacklevel=2)
    from tightfit.runtime.model import build_model

    if threads:
        torch.set_num_threads(threads)
    model = build_model(packed)
    return TorchBackend(model, max_positions=max_positions or model.config.max_position_embeddings)


__all__ = ["FastBackend", "open_backend", "default_threads", "ENGINE_MODEL_TYPES", "KV_BITS", "DEFAULT_KV_BITS"]

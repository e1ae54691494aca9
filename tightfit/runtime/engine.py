"""FastBackend: tightfit's compiled CPU engine behind the Backend protocol (runtime/backend.py).

One C++ call runs a whole forward step (all layers, attention with a preallocated fp16 KV cache,
the head) with OpenMP threads that meet only where one needs rows another computed; quantized
matrices run the AVX-512 VNNI kernels of runtime/kernels (int8 block-32 activations, like
llama.cpp's Q8_0), dense ones an fp32-activation kernel.

Supported here: the Llama-layout decoders (llama, mistral, qwen2) with SiLU MLPs and any RoPE
variant transformers implements (the cos/sin tables come from transformers' own rotary module).
Other architectures, and a KV cache beyond a sliding window, raise KernelUnavailable; `open_backend`
with engine="auto" then falls back to the TorchBackend reference.
"""

from __future__ import annotations

import ctypes
import importlib
import warnings
from pathlib import Path
from typing import Sequence

import torch

from tightfit.errors import KernelUnavailable, PackedModelError
from tightfit.formats.packed import PackedModel, load_packed
from tightfit.formats.primitives import QuantizedTensor
from tightfit.runtime.engine_checks import create_engine, validate_packed_for_engine
from tightfit.runtime.kernels import KernelMatrix, from_dense, from_quantized
from tightfit.runtime.kernels.build import load
from tightfit.runtime.kernels.layout import TfMat
from tightfit.runtime.model import transformers_config

ENGINE_MODEL_TYPES = ("llama", "mistral", "qwen2")  # Llama layout: model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
ENGINE_ACTIVATIONS = ("silu",)
DEFAULT_MAX_BATCH = 64  # tokens per C++ call; longer prompts are fed in chunks
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
_MODULE = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


class TfLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p)] + [(p, TfMat) for p in _PROJECTIONS]


class TfConfig(ctypes.Structure):
    _fields_ = [
        *[(f, ctypes.c_int32) for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "inter", "vocab",
                                         "max_pos", "max_batch", "threads", "exact")],
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("embed", TfMat),
        ("head", TfMat),
        ("final_norm", ctypes.c_void_p),
        ("layers", ctypes.POINTER(TfLayer)),
    ]


def default_threads() -> int:
    """torch's intra-op thread count (what the reference path uses), at least 1."""
    return max(1, torch.get_num_threads())


def _hf_config(packed: PackedModel):
    """The packed model's transformers config, when the engine runs its architecture."""
    model_type = packed.hf_config.get("model_type")
    if model_type not in ENGINE_MODEL_TYPES:
        raise KernelUnavailable(
            f"the fast engine runs {', '.join(ENGINE_MODEL_TYPES)} models, not '{model_type}'; use --engine torch"
        )
    config = transformers_config(packed)
    if getattr(config, "hidden_act", "silu") not in ENGINE_ACTIVATIONS:
        raise KernelUnavailable(f"the fast engine has no '{config.hidden_act}' MLP activation; use --engine torch")
    return config


def _rope_tables(config, max_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim/2] fp32 from transformers' rotary module of this model type."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    try:  # rope_theta, rope_scaling come from config.json
        rotary = rotary_cls(config=config)
        pos = torch.arange(max_positions).unsqueeze(0)  # [1, P]
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)  # [1, P, D] each, halves duplicated
    except Exception as e:  # transformers' own checks raise ValueError, KeyError, TypeError, ...
        raise PackedModelError(f"config.json: transformers cannot build the rotary embedding ({type(e).__name__}: {e})") from None
    half = head_dim // 2
    if tuple(cos.shape) != (1, max_positions, head_dim):
        raise PackedModelError(f"config.json: the rotary embedding has {cos.shape[-1]} dimensions per head, head_dim is {head_dim}")
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


class FastBackend:
    """The compiled engine with a KV cache of `max_positions` tokens (see module docstring).

    exact: quantized matmuls multiply the fp32 activations instead of their int8 blocks (about 3x
    slower; then only fp32 summation order and the fp16 KV cache separate it from the reference).
    """

    def __init__(self, packed: PackedModel, *, max_positions: int = 2048, threads: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, exact: bool = False) -> None:
        config = _hf_config(packed)
        self._lib = load()
        dims = validate_packed_for_engine(packed, config, _MODULE, self._lib.tf_max_head_dim())
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and max_positions > window:
            raise KernelUnavailable(f"the fast engine has no sliding-window attention; use a KV cache of at most {window} tokens")
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_positions > limit:
            max_positions = int(limit)
        self.vocab_size = dims.vocab
        self.max_positions = int(max_positions)
        self.max_batch = int(max_batch)
        self.threads = threads or default_threads()
        self.slow_layers: list[str] = []  # layers the engine runs as dense fp32 (no fast kernel for their format)
        self._keep: list = []  # every tensor the C structs point into
        self._position = 0

        hidden, n_heads, n_kv, head_dim, n_layers = dims.hidden, dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.n_layers
        cos, sin = _rope_tables(config, self.max_positions, head_dim)
        layers = (TfLayer * n_layers)()
        for i in range(n_layers):
            prefix = f"model.layers.{i}"
            layers[i].attn_norm = self._vector(packed, f"{prefix}.input_layernorm.weight")
            layers[i].mlp_norm = self._vector(packed, f"{prefix}.post_attention_layernorm.weight")
            for p in _PROJECTIONS:
                setattr(layers[i], p, self._matrix(packed, f"{prefix}.{_MODULE[p]}").struct())
        embed = self._matrix(packed, "model.embed_tokens", bias=False)
        head_name = packed.tied.get("lm_head.weight")
        head = embed if head_name == "model.embed_tokens.weight" else self._matrix(packed, "lm_head", bias=False)
        self.weight_bytes = sum(m.nbytes for m in self._keep if isinstance(m, KernelMatrix) and m is not embed) + (
            embed.nbytes if head is embed else 0
        )
        self._keep += [cos, sin, layers]
        self._config = TfConfig(
            n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            inter=dims.inter, vocab=self.vocab_size, max_pos=self.max_positions,
            max_batch=self.max_batch, threads=self.threads, exact=int(exact), eps=float(config.rms_norm_eps),
            attn_scale=head_dim ** -0.5, rope_cos=cos.data_ptr(), rope_sin=sin.data_ptr(),
            embed=embed.struct(), head=head.struct(),
            final_norm=self._vector(packed, "model.norm.weight"), layers=layers,
        )
        self._engine = create_engine(self._lib, self._config)
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

    def _vector(self, packed: PackedModel, name: str) -> int:
        t = packed.kept.get(name)
        if t is None:
            raise PackedModelError(f"packed model lacks {name}")
        t = t.to(torch.float32).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _matrix(self, packed: PackedModel, module: str, *, bias: bool = True) -> KernelMatrix:
        b = packed.kept.get(f"{module}.bias") if bias else None
        if module in packed.layers:
            q = packed.layers[module]
            if isinstance(q, QuantizedTensor):
                m = from_quantized(q, b)
            else:  # no kernel for this format family yet: exact fp32 weights
                self.slow_layers.append(f"{module} ({q.fmt.name})")
                m = from_dense(q.dequantize(), b)
        else:
            name = packed.tied.get(f"{module}.weight", f"{module}.weight")
            w = packed.kept.get(name)
            if w is None:
                raise PackedModelError(f"packed model lacks {module}")
            m = from_dense(w, b)
        self._keep.append(m)
        return m

    # ---- Backend protocol --------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._position:
            raise ValueError(f"cannot keep {n} tokens of a cache holding {self._position}")
        self._position = n  # entries past n are overwritten before they are read again

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
            raise ValueError(f"{self._position + len(ids)} tokens exceed the KV cache of {self.max_positions}")
        outs = []
        for s in range(0, len(ids), self.max_batch):
            chunk = ids[s : s + self.max_batch]
            m = len(chunk)
            self._ids_c[:m] = chunk
            rc = self._forward_c(self._engine, self._ids_c, m, self._position, self._logits_ptr, int(all_logits))
            if rc == -2:
                raise ValueError(f"token id out of range 0..{self.vocab_size - 1} in {chunk}")
            if rc != 0:
                raise ValueError(f"engine refused {m} tokens at position {self._position} (code {rc})")
            self._position += m
            if all_logits:
                outs.append(self._logits[:m].clone())
        return torch.cat(outs) if all_logits else self._logits[:1]

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine:
            self._lib.tf_engine_free(engine)
            self._engine = None


DEFAULT_FAST_POSITIONS = 4096  # fp16 KV cache of the fast engine: 30 layers x 3 heads x 64 x (k + v) x 2 bytes -> 94 MB at 4096


def open_backend(path: Path | PackedModel, *, engine: str = "auto", max_positions: int | None = None,
                 threads: int | None = None):
    """A Backend for a packed model: engine "fast" (compiled), "torch" (reference) or "auto"
    (fast where it supports the model and this machine can build it, else torch with a warning).
    max_positions None: the model's context length (the fast engine caps it at DEFAULT_FAST_POSITIONS)."""
    from tightfit.runtime.torch_backend import TorchBackend

    if engine not in ("auto", "fast", "torch"):
        raise ValueError(f"engine must be auto, fast or torch, got {engine!r}")
    packed = path if isinstance(path, PackedModel) else load_packed(Path(path))
    if engine != "torch":
        try:
            return FastBackend(packed, max_positions=max_positions or DEFAULT_FAST_POSITIONS, threads=threads)
        except KernelUnavailable as e:
            if engine == "fast":
                raise
            warnings.warn(f"{e}; running the torch reference engine", stacklevel=2)
    from tightfit.runtime.model import build_model

    if threads:
        torch.set_num_threads(threads)
    model = build_model(packed)
    return TorchBackend(model, max_positions=max_positions or model.config.max_position_embeddings)


__all__ = ["FastBackend", "open_backend", "default_threads", "ENGINE_MODEL_TYPES"]

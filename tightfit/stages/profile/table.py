"""The profile stage's artifact and its settings: ProfileConfig (how the profile is measured) and
LatencyTable (per-(shape, format) kernel latencies on one machine, in-context scales, the fixed part),
with the kernel the engine runs for each format (`kernel_of`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tightfit.artifacts import Choice, Unquantized
from tightfit.formats.registry import Format, parse_format
from tightfit.runtime import kernels

LATENCY_TABLE_VERSION = 3  # context and kv_bits (later fields) default when absent
PROFILE_CONFIG_VERSION = 2
DENSE_KERNEL = "dense-fp32"  # what the engine runs for a format without a fast kernel
FP16_KERNEL = "dense-fp16"  # what it runs for an unquantized (fp16) matrix


@dataclass(frozen=True)
class ProfileConfig:
    """How the profile is measured; the one home of its defaults.

    threads:          CPU threads of every timed call (the engine's thread count)
    decode_m:         activation rows of a decode call (one token)
    prefill_m:        activation rows of a prefill call (one engine chunk of prompt tokens)
    repeats:          timed calls per entry; the median is kept
    min_repeat_s:     each timed call runs enough back-to-back reps to last at least this long
    stream_mb:        the copies of a matrix that the reps cycle through hold at least this
                      many MB (several times the last-level cache)
    bandwidth_mb:     buffer size of the read-bandwidth measurement
    fixed_format:     a uniform format whose whole model is always timed (as are the candidates)
    embed_format:     format of that model's token embeddings and output head (None: fp16), as
                      the model being planned will have them: the head is most of the fixed part
    fixed_prompt:     prompt tokens before each timed whole-model decode: the context the fixed
                      part (attention above all) is measured at, `--context` of plan and compress
    kv_bits:          the engine's KV cache width in those decodes (16, 8, 4), `--kv`: the
                      attention's cost per cached position depends on it
    fixed_new_tokens: decoded tokens per timed whole-model run
    fixed_repeats:    timed whole-model runs (after one warm-up); the median is kept
    """

    threads: int
    decode_m: int = 1
    prefill_m: int = 64
    repeats: int = 5
    min_repeat_s: float = 0.005
    stream_mb: int = 128
    bandwidth_mb: int = 1024
    fixed_format: str = "w4g64"
    embed_format: str | None = None
    fixed_prompt: int = 32
    fixed_new_tokens: int = 64
    fixed_repeats: int = 5
    kv_bits: int = 16
    version: int = PROFILE_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("threads", "decode_m", "prefill_m", "repeats", "bandwidth_mb", "stream_mb", "fixed_prompt", "fixed_new_tokens", "fixed_repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"profile {name} must be a whole number >= 1, got {v!r}")
        from tightfit.runtime.engine_config import KV_BITS

        if self.kv_bits not in KV_BITS:
            raise ValueError(f"profile kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {self.kv_bits!r}")
        if self.repeats < 5:
            raise ValueError(f"profile repeats must be at least 5 for a stable median, got {self.repeats}")
        if not (isinstance(self.min_repeat_s, (int, float)) and math.isfinite(self.min_repeat_s) and self.min_repeat_s > 0):
            raise ValueError(f"profile min_repeat_s must be a positive number, got {self.min_repeat_s!r}")
        if not kernels.has_kernel(parse_format(self.fixed_format)):
            raise ValueError(f"profile fixed_format must have a fast kernel (a uniform, grid, learned-table or SpQR format), got {self.fixed_format!r}")
        if self.embed_format is not None and not kernels.has_kernel(parse_format(self.embed_format)):
            raise ValueError(f"profile embed_format must be a format with a fast kernel (uniform, grid, learned-table or SpQR) or None, got {self.embed_format!r}")


def kernel_of(fmt: Choice) -> str:
    """The kernel the engine runs for fmt: its own (named like it), fp16 for an unquantized
    matrix, or dense fp32 where the format has none."""
    if isinstance(fmt, Unquantized):
        return FP16_KERNEL
    return fmt.name if kernels.has_kernel(fmt) else DENSE_KERNEL


@dataclass(frozen=True)
class LatencyEntry:
    """One (shape, format) of the table.

    shape:      (N, K) = (out_features, in_features)
    fmt:        format name
    kernel:     the kernel that runs it (`kernel_of`): the format name, or `dense-fp32`
    decode_ms:  ms per [decode_m, K] x [K, N] call
    prefill_ms: ms per [prefill_m, K] x [K, N] call
    """

    shape: tuple[int, int]
    fmt: str
    kernel: str
    decode_ms: float
    prefill_ms: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyEntry:
        return cls(shape=(int(d["shape"][0]), int(d["shape"][1])), fmt=d["fmt"], kernel=d["kernel"],
                   decode_ms=float(d["decode_ms"]), prefill_ms=float(d["prefill_ms"]))


@dataclass(frozen=True)
class LatencyTable:
    """Output of the profile stage: per-(shape, format) kernel latencies on one machine.

    entries:          one per distinct layer shape and format
    fixed_ms:         decode ms per token of everything but the linear layers and (when
                      profiled) the head (>= 0; None when not measured): whole-model decode minus
                      their in-context time, median over the formats measured in context
    model_decode_ms:  measured decode ms per token of the whole model in fixed_format (None when
                      not measured)
    fixed_format:     the uniform format that model was quantized to
    context_scale:    format name -> in-context layer time / summed kernel times (formats not
                      measured in context: 1); decode_ms() applies it
    head:             the head's shape (V, H) when its candidates are among the entries, else None
    head_scale:       the head's in-context time / its kernel time (1 when not measured)
    context, kv_bits: the cached positions and KV cache width fixed_ms was measured at
    bandwidth_gb_s:   read bandwidth with `threads` threads (0 when not measured)
    threads, decode_m, prefill_m: how the entries were timed
    machine, cpu:     `machine_id()` and the CPU model name
    kernel_sha256:    `kernel_hash()` of the engine the entries were timed with
    """

    entries: tuple[LatencyEntry, ...]
    threads: int
    decode_m: int
    prefill_m: int
    machine: str
    cpu: str
    kernel_sha256: str
    bandwidth_gb_s: float = 0.0
    fixed_ms: float | None = None
    model_decode_ms: float | None = None
    fixed_format: str | None = None
    context_scale: dict[str, float] = field(default_factory=dict)
    head: tuple[int, int] | None = None
    head_scale: float = 1.0
    context: int = 0
    kv_bits: int = 16
    version: int = LATENCY_TABLE_VERSION
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {(e.shape, e.fmt): e for e in self.entries})

    def entry(self, shape: tuple[int, int], fmt: Format | str) -> LatencyEntry:
        name = fmt if isinstance(fmt, str) else fmt.name
        key = ((int(shape[0]), int(shape[1])), name)
        if key not in self._index:
            raise KeyError(f"the latency table has no entry for a {shape[0]}x{shape[1]} layer in {name}; profile it first")
        return self._index[key]

    def decode_ms(self, shape: tuple[int, int], fmt: Format | str) -> float:
        """Predicted ms of one decode step of a (N, K) layer in fmt inside the model."""
        entry = self.entry(shape, fmt)
        return entry.decode_ms * self.context_scale.get(entry.fmt, 1.0)

    def head_ms(self, fmt: Choice | str) -> float:
        """Predicted ms of one decode step of the output head in fmt inside the model."""
        if self.head is None:
            raise KeyError("the latency table has no head entries; profile the head's candidates first")
        return self.entry(self.head, fmt).decode_ms * self.head_scale

    def layers_decode_ms(self, layers: Mapping[str, tuple[int, int]], formats: Mapping[str, Format | str]) -> float:
        """Summed decode ms of the layers (name -> shape), each in formats[name]."""
        return sum(self.decode_ms(shape, formats[name]) for name, shape in layers.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "entries": [e.to_json() for e in self.entries], "threads": self.threads,
            "decode_m": self.decode_m, "prefill_m": self.prefill_m, "machine": self.machine, "cpu": self.cpu,
            "kernel_sha256": self.kernel_sha256, "bandwidth_gb_s": self.bandwidth_gb_s, "fixed_ms": self.fixed_ms,
            "model_decode_ms": self.model_decode_ms, "fixed_format": self.fixed_format, "context_scale": self.context_scale,
            "head": None if self.head is None else list(self.head), "head_scale": self.head_scale,
            "context": self.context, "kv_bits": self.kv_bits,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        if not isinstance(d, dict) or d.get("version") != LATENCY_TABLE_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"latency table JSON has version {got!r}; this tightfit reads version {LATENCY_TABLE_VERSION}")
        fields = {k: v for k, v in d.items() if k not in ("version", "entries", "head")}
        head = None if d["head"] is None else (int(d["head"][0]), int(d["head"][1]))
        return cls(entries=tuple(LatencyEntry.from_json(e) for e in d["entries"]), head=head, **fields)

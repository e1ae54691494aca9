"""Profile stage: how long each linear layer takes on this machine, in each candidate format.

The allocate stage's latency row needs t[l, c], the decode time of layer l in format c, and T0,
the time of everything else per token (attention, norms, the embedding lookup, and the output head
unless the plan chooses its format too). Both are measured with tightfit's own engine, the one that
will run the model:

  t[(N, K), c]  one [m, K] x [K, N] call of the kernel that runs format c, timed inside the C
                library (`kernels.time_matmul`): a warm-up call, then the median of `repeats`
                timed calls of back-to-back reps, at fixed threads, for decode (m = 1) and prefill
                (m = 64). Weights are random and rounded to nearest without a clipping search:
                a kernel's time does not depend on the values. The calls cycle through copies
                of the matrix larger together than the last-level cache (`stream_mb`), so each
                call streams its weights from memory as it does in a decode step of the whole
                model; one matrix timed alone stays cache-resident, and then the formats that
                unpack fastest, not the smallest, look fastest. Formats without a fast kernel
                (SpQR) run as dense fp32 in the engine, so that is what they are timed as; an
                unquantized (fp16) head runs the engine's fp16 kernel.
  in context    the whole model, packed uniformly in each candidate format with a fast kernel,
                decodes on the engine (short context); the engine's own phase timers say how
                long its linear layers took per token. scale[c] = that time / the summed kernel
                times of its layers in c: inside a decode step consecutive matrices overlap
                their memory traffic and share one thread team, so isolated calls are off by a
                per-format factor. t[l, c] is the kernel time times scale[c].
  the head      when profiled (its shape (V, H) and candidates): the kernel time of each
                candidate, scaled by the head's in-context time in the models above (the
                engine's `head` phase) over the kernel time of the head format they have.
  T0            decode ms per token of the whole model minus its linear layers' in-context
                time (and the head's, when profiled), median over those formats.

Latency depends on the shape, not the layer, so each distinct (N, K) is timed once per format.
Timings are cached entry by entry, keyed by machine (`cpu_fingerprint`), threads, kernel source
(sha256 of the engine sources), shape and kernel: a second run times nothing, and a changed
kernel or thread count re-times exactly the entries measured under the old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.artifacts import FP16, Choice, Unquantized
from tightfit.errors import CorruptCacheError
from tightfit.formats.files import atomic_write_json, warn_recomputed
from tightfit.formats.packed import PackedModel
from tightfit.formats.registry import Format, parse_format
from tightfit.runtime import kernels
from tightfit.runtime.kernels.build import cpu_fingerprint, source_hash

LATENCY_TABLE_VERSION = 3
PROFILE_CONFIG_VERSION = 2
CACHE_VERSION = 1
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
    fixed_prompt:     prompt tokens before each timed whole-model decode
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
    version: int = PROFILE_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("threads", "decode_m", "prefill_m", "repeats", "bandwidth_mb", "stream_mb", "fixed_prompt", "fixed_new_tokens", "fixed_repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"profile {name} must be a whole number >= 1, got {v!r}")
        if self.repeats < 5:
            raise ValueError(f"profile repeats must be at least 5 for a stable median, got {self.repeats}")
        if not (isinstance(self.min_repeat_s, (int, float)) and math.isfinite(self.min_repeat_s) and self.min_repeat_s > 0):
            raise ValueError(f"profile min_repeat_s must be a positive number, got {self.min_repeat_s!r}")
        if not kernels.has_kernel(parse_format(self.fixed_format)):
            raise ValueError(f"profile fixed_format must have a fast kernel (a uniform or grid format), got {self.fixed_format!r}")
        if self.embed_format is not None and not kernels.has_kernel(parse_format(self.embed_format)):
            raise ValueError(f"profile embed_format must be a format with a fast kernel (uniform or grid) or None, got {self.embed_format!r}")


def kernel_hash() -> str:
    """sha256 of the engine sources: identifies the kernels' version."""
    return source_hash()


def machine_id() -> str:
    """Short hash of the CPU model and instruction sets (`cpu_fingerprint`)."""
    return hashlib.sha256(cpu_fingerprint().encode()).hexdigest()[:16]


def cpu_name() -> str:
    return cpu_fingerprint().split("|", 1)[0]


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
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        if not isinstance(d, dict) or d.get("version") != LATENCY_TABLE_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"latency table JSON has version {got!r}; this tightfit reads version {LATENCY_TABLE_VERSION}")
        fields = {k: v for k, v in d.items() if k not in ("version", "entries", "head")}
        head = None if d["head"] is None else (int(d["head"][0]), int(d["head"][1]))
        return cls(entries=tuple(LatencyEntry.from_json(e) for e in d["entries"]), head=head, **fields)


# ---- timing -------------------------------------------------------------------------------------


def _random_matrix(shape: tuple[int, int], fmt: Choice) -> kernels.KernelMatrix:
    """A [N, K] matrix in the layout the engine gives fmt (see FastBackend._matrix)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # [N, K] fp32
    if kernels.has_kernel(fmt):
        return kernels.from_quantized(quantize_rtn_any(w, fmt, clip_search=False))
    return kernels.from_dense(w.half() if isinstance(fmt, Unquantized) else w)


def streamed_copies(w: kernels.KernelMatrix, megabytes: int) -> list[kernels.KernelMatrix]:
    """w and copies of it, at least `megabytes` MB together (at most 65536 matrices)."""
    count = max(1, min(65536, math.ceil(megabytes * 1e6 / max(w.nbytes, 1))))
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return [w] + [dataclasses.replace(w, codes=clone(w.codes), scales=clone(w.scales), zeros=clone(w.zeros),
                                      dense=clone(w.dense), bias=clone(w.bias)) for _ in range(count - 1)]


def time_call_ms(w: kernels.KernelMatrix | list[kernels.KernelMatrix], m: int, config: ProfileConfig) -> float:
    """Median ms of one [m, K] x W^T call: a warm-up, then `repeats` timed calls of enough
    back-to-back reps to last min_repeat_s each (w: a matrix, or copies the reps cycle through)."""
    first = kernels.time_matmul(w, m, threads=config.threads, reps=1)  # warm-up: pages, caches, thread pool
    probe = kernels.time_matmul(w, m, threads=config.threads, reps=3)
    reps = max(1, min(10_000, math.ceil(config.min_repeat_s / max(min(first, probe), 1e-9))))
    runs = [kernels.time_matmul(w, m, threads=config.threads, reps=reps) for _ in range(config.repeats)]
    return 1e3 * statistics.median(runs)


# ---- cache --------------------------------------------------------------------------------------


class LatencyCache:
    """Timings on disk, one JSON file, entry by entry: key -> value. Keys name everything a
    timing depends on (machine, threads, kernel source, shape, kernel, rows), so entries from
    other machines, thread counts or kernel versions stay, unused, beside the current ones."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.values: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                warn_recomputed(CorruptCacheError(f"{self.path} is unreadable ({e})"))
                data = None  # re-measure, and overwrite it on save
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("values"), dict):
                self.values = data["values"]

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value
        if self.path is not None:
            atomic_write_json(self.path, {"version": CACHE_VERSION, "values": self.values})


def _scope(config: ProfileConfig) -> str:
    return f"machine={machine_id()}|threads={config.threads}|kernel={kernel_hash()[:16]}"


def entry_key(config: ProfileConfig, shape: tuple[int, int], kernel: str) -> str:
    return f"matmul|{_scope(config)}|{shape[0]}x{shape[1]}|{kernel}|m={config.decode_m},{config.prefill_m}|stream={config.stream_mb}"


# ---- the stage ----------------------------------------------------------------------------------


def profile_layers(
    shapes: Sequence[tuple[int, int]],
    formats: Sequence[Choice],
    config: ProfileConfig,
    cache: LatencyCache,
    *,
    on_entry: Callable[[str], None] = lambda _: None,
) -> list[LatencyEntry]:
    """One entry per distinct shape and format, from the cache where it has one, else timed."""
    entries = []
    for shape in sorted({(int(n), int(k)) for n, k in shapes}):
        for fmt in dict.fromkeys(formats):
            kernel = kernel_of(fmt)
            key = entry_key(config, shape, kernel)
            cached = cache.get(key)
            if cached is None:
                on_entry(f"{shape[0]}x{shape[1]} {kernel}")
                w = streamed_copies(_random_matrix(shape, fmt), config.stream_mb)
                cached = {"decode_ms": time_call_ms(w, config.decode_m, config), "prefill_ms": time_call_ms(w, config.prefill_m, config)}
                del w
                cache.put(key, cached)
            entries.append(LatencyEntry(shape=shape, fmt=fmt.name, kernel=kernel, decode_ms=float(cached["decode_ms"]),
                                        prefill_ms=float(cached["prefill_ms"])))
    return entries


def measure_model_decode(packed: PackedModel, config: ProfileConfig) -> tuple[float, float, float]:
    """(decode ms per token, ms per token in the decoder blocks' linear layers, ms per token in
    the head) of a packed model on the engine: a short prompt, then greedy tokens; medians over
    fixed_repeats runs after a warm-up. The last two are the engine's own phase timers over the
    decode steps only."""
    from tightfit.runtime.engine import FastBackend
    from tightfit.runtime.speed import random_prompt

    backend = FastBackend(packed, max_positions=config.fixed_prompt + config.fixed_new_tokens, threads=config.threads)
    prompt = random_prompt(backend.vocab_size, config.fixed_prompt, 0)
    decode, linear, head = [], [], []
    for run in range(config.fixed_repeats + 1):  # the first is a warm-up
        backend.reset()
        token = int(backend.forward(prompt).argmax())
        backend.phase_seconds()  # drop the prefill's
        t0 = time.perf_counter()
        for _ in range(config.fixed_new_tokens):
            token = int(backend.forward([token]).argmax())
        seconds = time.perf_counter() - t0
        phases = backend.phase_seconds()
        if run:
            decode.append(1e3 * seconds / config.fixed_new_tokens)
            linear.append(1e3 * sum(phases[p] for p in backend.LINEAR_PHASES) / config.fixed_new_tokens)
            head.append(1e3 * phases["head"] / config.fixed_new_tokens)
    return statistics.median(decode), statistics.median(linear), statistics.median(head)


def measure_bandwidth_gb_s(config: ProfileConfig) -> float:
    from tightfit.runtime.speed import measure_bandwidth

    return measure_bandwidth(config.threads, megabytes=config.bandwidth_mb)


def architecture_key(hf_config: Mapping[str, Any]) -> str:
    """Hash of a model's configuration: the fixed part depends on the architecture, not on weights."""
    text = json.dumps(dict(hf_config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile(
    layers: Mapping[str, tuple[int, int]],
    formats: Sequence[Format],
    config: ProfileConfig,
    cache: LatencyCache,
    *,
    head: tuple[int, int] | None = None,
    head_formats: Sequence[Choice] = (),
    architecture: str | None = None,
    uniform_model: Callable[[Format], PackedModel] | None = None,
    on_stage: Callable[[str], None] = lambda _: None,
) -> LatencyTable:
    """The latency table of a model's linear layers (name -> (N, K)) in `formats`, and of its
    output head (shape (V, H)) in head_formats when `head` is given.

    architecture, uniform_model: when given, also the in-context scales and the fixed part:
    uniform_model(fmt) builds the model packed uniformly in fmt (embeddings and head in
    config.embed_format; only called when the cache lacks the measurement), and `architecture`
    (`architecture_key` of its config) keys the cached results.
    Bandwidth is measured (or read from the cache) every time.
    """
    if not layers:
        raise ValueError("no layers to profile")
    fixed_fmt = parse_format(config.fixed_format)
    model_head = FP16 if config.embed_format is None else parse_format(config.embed_format)  # the head of uniform_model's models
    wanted = list(formats) + ([fixed_fmt] if uniform_model is not None else [])
    head_wanted = [] if head is None else list(head_formats) + ([model_head] if uniform_model is not None else [])
    todo = [(tuple(s), f) for s in {tuple(v) for v in layers.values()} for f in dict.fromkeys(wanted)]
    todo += [(tuple(head), f) for f in dict.fromkeys(head_wanted)]
    n_missing = sum(cache.get(entry_key(config, s, kernel_of(f))) is None for s, f in dict.fromkeys(todo))
    if n_missing:
        on_stage(f"timing {n_missing} (shape, kernel) entries at {config.threads} threads (cached in {cache.path})")
    entries = profile_layers(list(layers.values()), wanted, config, cache)
    head_entries = profile_layers([head], head_wanted, config, cache) if head is not None else []

    key = f"bandwidth|{_scope(config)}|mb={config.bandwidth_mb}"
    bandwidth = cache.get(key)
    if bandwidth is None:
        on_stage(f"measuring read bandwidth ({config.threads} threads)")
        bandwidth = measure_bandwidth_gb_s(config)
        cache.put(key, bandwidth)

    fixed_ms = model_ms = None
    scale: dict[str, float] = {}
    head_scale = 1.0
    if uniform_model is not None:
        if architecture is None:
            raise ValueError("the fixed part needs the model's architecture key")
        fixed, head_scales = [], []
        for fmt in dict.fromkeys([fixed_fmt, *formats]):
            if not kernels.has_kernel(fmt):
                continue  # no fast kernel: runs as dense fp32, timed as such, unscaled
            key = (f"model-in-context|{_scope(config)}|arch={architecture}|{fmt.name}|"
                   f"ctx={config.fixed_prompt}+{config.fixed_new_tokens}|embed={config.embed_format or 'fp16'}|phases=2")
            measured = cache.get(key)
            if measured is None:
                on_stage(f"timing decode of the whole model in {fmt.name} (in-context layer times, the non-linear rest)")
                decode_ms, linear_ms, head_ms = measure_model_decode(uniform_model(fmt), config)
                measured = {"decode_ms": decode_ms, "linear_ms": linear_ms, "head_ms": head_ms}
                cache.put(key, measured)
            by_shape = {e.shape: e.decode_ms for e in entries if e.fmt == fmt.name}
            kernels_ms = sum(by_shape[tuple(s)] for s in layers.values())
            scale[fmt.name] = float(measured["linear_ms"]) / kernels_ms
            rest = float(measured["decode_ms"]) - float(measured["linear_ms"])
            if head is not None:
                rest -= float(measured["head_ms"])
                head_scales.append(float(measured["head_ms"]) / next(e.decode_ms for e in head_entries if e.fmt == model_head.name))
            # Timer noise can make the difference slightly negative on a small model; it is a time, so >= 0.
            fixed.append(max(rest, 0.0))
            if fmt == fixed_fmt:
                model_ms = float(measured["decode_ms"])
        fixed_ms = statistics.median(fixed)
        head_scale = statistics.median(head_scales) if head_scales else 1.0

    names = {f.name for f in formats}
    head_names = {f.name for f in head_formats}
    return LatencyTable(
        entries=tuple(e for e in entries if e.fmt in names) + tuple(e for e in head_entries if e.fmt in head_names),
        threads=config.threads, decode_m=config.decode_m, prefill_m=config.prefill_m, machine=machine_id(), cpu=cpu_name(),
        kernel_sha256=kernel_hash(), bandwidth_gb_s=float(bandwidth), fixed_ms=fixed_ms,
        model_decode_ms=None if model_ms is None else float(model_ms),
        fixed_format=fixed_fmt.name if uniform_model is not None else None,
        context_scale={k: v for k, v in scale.items() if k in names},
        head=None if head is None else (int(head[0]), int(head[1])), head_scale=head_scale,
    )

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
                unpack fastest, not the smallest, look fastest. A format without a fast kernel
                would run as dense fp32 in the engine, and be timed as that (every format family
                has one now: uniform, grid, SpQR); an unquantized (fp16) head runs the engine's
                fp16 kernel.
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

    table   ProfileConfig and the LatencyTable artifact
    timing  one kernel call, the whole model's decode, the read bandwidth; machine and kernel identity
    cache   LatencyCache, the timings on disk entry by entry
    here    the stage: `profile` (and `profile_layers`), and the keys of the cached entries
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

from tightfit.artifacts import FP16, Choice
from tightfit.formats.packed import PackedModel
from tightfit.formats.registry import Format, parse_format
from tightfit.runtime import kernels
from tightfit.stages.profile.cache import CACHE_VERSION, LatencyCache, architecture_key
from tightfit.stages.profile.table import (
    DENSE_KERNEL,
    FP16_KERNEL,
    LATENCY_TABLE_VERSION,
    PROFILE_CONFIG_VERSION,
    LatencyEntry,
    LatencyTable,
    ProfileConfig,
    kernel_of,
)
from tightfit.stages.profile.timing import (
    _random_matrix,
    cpu_name,
    kernel_hash,
    machine_id,
    measure_bandwidth_gb_s,
    measure_model_decode,
    streamed_copies,
    time_call_ms,
)

__all__ = [
    "CACHE_VERSION", "DENSE_KERNEL", "FP16_KERNEL", "LATENCY_TABLE_VERSION", "PROFILE_CONFIG_VERSION", "LatencyCache",
    "LatencyEntry", "LatencyTable", "ProfileConfig", "architecture_key", "cpu_name", "entry_key", "kernel_hash",
    "kernel_of", "machine_id", "measure_bandwidth_gb_s", "measure_model_decode", "profile", "profile_layers",
    "streamed_copies", "time_call_ms",
]


# ---- cache keys ---------------------------------------------------------------------------------
# _scope and profile look machine_id, kernel_hash and the measurements up in this module, where
# tests replace them.


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
                   f"ctx={config.fixed_prompt}+{config.fixed_new_tokens}|embed={config.embed_format or 'fp16'}|phases=2"
                   + ("" if config.kv_bits == 16 else f"|kv={config.kv_bits}"))
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
        context=config.fixed_prompt + config.fixed_new_tokens // 2 if uniform_model is not None else 0, kv_bits=config.kv_bits,
    )

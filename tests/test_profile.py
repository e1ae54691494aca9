"""Profile stage (latency table, its entry-level cache), latency budgets in plan/compress, and the
Pareto report, on the tiny models."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from tightfit.artifacts import FP16
from tightfit.cli import _latency_ms, main
from tightfit.errors import CorruptCacheWarning, InfeasibleBudget
from tightfit.formats.grid import GridFormat
from tightfit.formats.registry import parse_format
from tightfit.formats.table import QuantFormat
from tightfit.model import load_model
from tightfit.pipeline import DEFAULT_CANDIDATES
from tightfit.runtime.kernels import layout as kernel_layout
from tightfit.stages import profile as profile_stage
from tightfit.stages.allocate import Budget
from tightfit.stages.profile import DENSE_KERNEL, LatencyCache, LatencyEntry, LatencyTable, ProfileConfig

# Fast settings for the real-engine tests: a small bandwidth buffer and short timed calls.
FAST = ProfileConfig(threads=1, bandwidth_mb=16, min_repeat_s=0.0005, stream_mb=1, fixed_prompt=8, fixed_new_tokens=8, fixed_repeats=1)
SHAPES = {"a": (64, 128), "b": (64, 128), "c": (128, 256)}


@pytest.fixture()
def fake_timers(monkeypatch):
    """Count every measurement; return times that grow with bits and with the shape."""
    calls = {"matmul": 0, "bandwidth": 0, "model": 0}

    def time_matmul(w, m, *, threads=1, reps=100):
        calls["matmul"] += 1
        w = w[0] if isinstance(w, list) else w
        n, k = w.shape
        return 1e-9 * n * k * (w.bits or 32) * m / threads

    def bandwidth(config):
        calls["bandwidth"] += 1
        return 10.0

    def model_ms(packed, config):
        calls["model"] += 1
        return 5.0, 2.0, 0.5  # decode ms per token, of which in the linear layers, in the head

    monkeypatch.setattr(profile_stage.kernels, "time_matmul", time_matmul)
    monkeypatch.setattr(profile_stage, "measure_bandwidth_gb_s", bandwidth)
    monkeypatch.setattr(profile_stage, "measure_model_decode", model_ms)
    return calls


def _profile(tmp_path, formats=("w2g32", "w4g64"), config=FAST, model=True):
    return profile_stage.profile(
        SHAPES, [parse_format(f) for f in formats], config, LatencyCache(tmp_path / "latency.json"),
        architecture="arch" if model else None, uniform_model=(lambda fmt: None) if model else None,
    )


def test_second_run_times_nothing_and_a_new_kernel_or_thread_count_retimes(tmp_path, fake_timers, monkeypatch):
    first = _profile(tmp_path)
    # 2 shapes x (2 formats + the fixed format w4g64, already a candidate) x (warm-up, probe, 5 repeats) x (decode, prefill)
    # and the whole model once per format with a fast kernel (w2g32, w4g64)
    assert fake_timers == {"matmul": 2 * 2 * 7 * 2, "bandwidth": 1, "model": 2}
    again = _profile(tmp_path)
    assert fake_timers == {"matmul": 56, "bandwidth": 1, "model": 2}, "a second run must be served from the cache"
    assert again == first

    monkeypatch.setattr(profile_stage, "kernel_hash", lambda: "another engine.cpp")
    _profile(tmp_path)
    assert fake_timers == {"matmul": 112, "bandwidth": 2, "model": 4}, "a changed kernel re-times every entry"

    _profile(tmp_path, config=ProfileConfig(threads=2, bandwidth_mb=16))
    assert fake_timers["matmul"] == 168 and fake_timers["model"] == 6, "another thread count re-times"
    _profile(tmp_path, formats=("w2g32", "w4g64", "w3g64"))
    assert fake_timers["matmul"] == 168 + 2 * 7 * 2, "only the new format's entries are timed"
    assert fake_timers["model"] == 7, "and the whole model in the new format only"

    monkeypatch.undo()  # the original kernel: its entries are still in the cache
    monkeypatch.setattr(profile_stage.kernels, "time_matmul", lambda *a, **k: pytest.fail("timed a cached entry"))
    assert _profile(tmp_path).entries == first.entries


def test_in_context_scale_and_fixed_part(tmp_path, fake_timers):
    """Each format's kernel times are scaled so that the model's layers add up to the engine's own
    in-context time (2 ms of the 5 ms decode, fake_timers); the rest (3 ms) is the fixed part."""
    table = _profile(tmp_path)
    assert table.model_decode_ms == 5.0 and table.fixed_format == "w4g64" and table.fixed_ms == pytest.approx(3.0)
    for fmt in ("w2g32", "w4g64"):
        assert table.layers_decode_ms(SHAPES, {name: fmt for name in SHAPES}) == pytest.approx(2.0)
    kernel_ms = 1e-6 * 64 * 128 * 4  # the fake kernel time of a 64x128 layer in w4g64
    kernels_sum = sum(1e-6 * n * k * 4 for n, k in SHAPES.values())
    assert table.entry((64, 128), "w4g64").decode_ms == pytest.approx(kernel_ms)
    assert table.context_scale["w4g64"] == pytest.approx(2.0 / kernels_sum)
    assert table.decode_ms((64, 128), "w4g64") == pytest.approx(kernel_ms * 2.0 / kernels_sum)
    assert table.entry((128, 256), parse_format("w2g32")).prefill_ms == pytest.approx(1e-6 * 128 * 256 * 2 * 64)
    with pytest.raises(KeyError, match="no entry for a 32x32 layer in w2g32"):
        table.decode_ms((32, 32), "w2g32")


def test_the_head_in_its_candidates_leaves_the_fixed_part(tmp_path, fake_timers):
    """With the head profiled, the engine's head phase (0.5 of the 5 ms, fake_timers) leaves the fixed
    part and scales the head's kernel times; fp16 runs the engine's fp16 kernel."""
    head, w8 = (384, 128), parse_format("w8g32-sym")
    table = profile_stage.profile(SHAPES, [parse_format("w2g32"), parse_format("w4g64")], FAST, LatencyCache(tmp_path / "latency.json"),
                                  head=head, head_formats=[FP16, w8], architecture="arch", uniform_model=lambda fmt: None)
    assert table.fixed_ms == pytest.approx(2.5) and table.head == head
    assert profile_stage.kernel_of(FP16) == profile_stage.FP16_KERNEL and table.entry(head, FP16).kernel == "dense-fp16"
    fp16_ms = 1e-6 * 384 * 128 * 32  # the fake kernel time of a dense matrix
    assert table.head_scale == pytest.approx(0.5 / fp16_ms) and table.head_ms(FP16) == pytest.approx(0.5)
    assert table.head_ms(w8) == pytest.approx(1e-6 * 384 * 128 * 8 * 0.5 / fp16_ms)
    assert LatencyTable.from_json(json.loads(json.dumps(table.to_json()))) == table
    with pytest.raises(KeyError, match="no head entries"):
        _profile(tmp_path).head_ms(FP16)


def test_fixed_part_is_timed_again_for_another_embedding_format_only(tmp_path, fake_timers):
    import dataclasses

    _profile(tmp_path)
    _profile(tmp_path, config=dataclasses.replace(FAST, embed_format="w8g32-sym"))
    assert fake_timers["model"] == 4 and fake_timers["matmul"] == 2 * 2 * 7 * 2, "the head changes the models, not the kernels"


def _without_spqr_kernel(monkeypatch):
    """Make SpQR look like a format family without a fast kernel (every family has one now)."""
    monkeypatch.setattr(kernel_layout, "KERNEL_FORMATS", (QuantFormat, GridFormat))


def test_formats_without_a_kernel_share_the_dense_kernel_entry(tmp_path, fake_timers, monkeypatch):
    _without_spqr_kernel(monkeypatch)
    table = _profile(tmp_path, formats=("spqr-w3g16-s3-o1.0", "spqr-w2g16-s3-o1.0"), model=False)
    assert {e.kernel for e in table.entries} == {DENSE_KERNEL}
    assert fake_timers["matmul"] == 2 * 7 * 2, "one dense timing per shape, whatever the recipe"
    assert table.fixed_ms is None and table.model_decode_ms is None


def test_grid_and_spqr_formats_are_timed_on_their_own_kernels_and_in_context(tmp_path, fake_timers):
    table = _profile(tmp_path, formats=("w4g32-sym", "nl4g32", "spqr-w3g16-s3-o1.0"))
    assert {e.fmt: e.kernel for e in table.entries} == {"w4g32-sym": "w4g32-sym", "nl4g32": "nl4g32", "spqr-w3g16-s3-o1.0": "spqr-w3g16-s3-o1.0"}
    assert "nl4g32" in table.context_scale and "spqr-w3g16-s3-o1.0" in table.context_scale
    assert profile_stage._random_matrix((64, 128), parse_format("nl4g32")).levels is not None
    spqr = profile_stage._random_matrix((64, 128), parse_format("spqr-w3g16-s3-o1.0"))
    assert spqr.stats is not None and spqr.outlier_values is not None
    copy = profile_stage.streamed_copies(spqr, 1)[1]
    assert copy.stats.data_ptr() != spqr.stats.data_ptr() and torch.equal(copy.outlier_values, spqr.outlier_values)


def test_latency_table_json_round_trip(tmp_path, fake_timers):
    table = _profile(tmp_path, formats=("w2g32", "spqr-w3g16-s3-o1.0"))
    again = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again == table and again.entries == table.entries
    assert again.decode_ms((64, 128), "spqr-w3g16-s3-o1.0") == table.decode_ms((64, 128), "spqr-w3g16-s3-o1.0")
    with pytest.raises(ValueError, match="version 99"):
        LatencyTable.from_json({**table.to_json(), "version": 99})
    assert LatencyEntry.from_json(table.entries[0].to_json()) == table.entries[0]


def test_a_corrupt_cache_is_remeasured(tmp_path, fake_timers):
    (tmp_path / "latency.json").write_text("{not json")
    with pytest.warns(CorruptCacheWarning, match="latency.json is unreadable"):
        _profile(tmp_path, model=False)
    assert fake_timers["matmul"] > 0
    assert json.loads((tmp_path / "latency.json").read_text())["version"] == profile_stage.CACHE_VERSION


def test_profile_config_refuses_too_few_repeats_and_a_dense_fixed_format(monkeypatch):
    with pytest.raises(ValueError, match="at least 5"):
        ProfileConfig(threads=1, repeats=3)
    assert ProfileConfig(threads=1, fixed_format="spqr-w3g16-s3-o1.0", embed_format="spqr-w3g16-s3-o1.0")  # SpQR has a kernel
    _without_spqr_kernel(monkeypatch)
    with pytest.raises(ValueError, match="fast kernel"):
        ProfileConfig(threads=1, fixed_format="spqr-w3g16-s3-o1.0")
    with pytest.raises(ValueError, match="embed_format"):
        ProfileConfig(threads=1, embed_format="spqr-w3g16-s3-o1.0")


def test_profile_of_a_tiny_llama_on_the_real_engine(tiny_model_dir, tmp_path, monkeypatch):
    from tightfit.pipeline import linear_layer_shapes, profile_model

    loaded = load_model(str(tiny_model_dir))
    formats = [parse_format("w2g32"), parse_format("w4g64"), parse_format("nl4g32"), parse_format("spqr-w3g16-s3-o1.0")]
    table = profile_model(loaded, formats, FAST, tmp_path)
    shapes = set(linear_layer_shapes(loaded).values())
    assert {(e.shape, e.fmt) for e in table.entries} == {(s, f.name) for s in shapes for f in formats}
    assert all(e.decode_ms > 0 and e.prefill_ms > e.decode_ms for e in table.entries)
    assert table.model_decode_ms > 0 and table.fixed_ms >= 0 and table.bandwidth_gb_s > 0
    assert table.kernel_sha256 == profile_stage.kernel_hash() and table.threads == 1

    with_head = profile_model(loaded, formats, FAST, tmp_path, head_formats=[FP16, parse_format("w8g32-sym")])
    assert with_head.head == (384, 128) and with_head.head_ms(FP16) > 0 and with_head.head_ms("w8g32-sym") > 0
    assert 0 <= with_head.fixed_ms <= table.fixed_ms, "the head leaves the fixed part"

    monkeypatch.setattr(profile_stage.kernels, "time_matmul", lambda *a, **k: pytest.fail("timed a cached entry"))
    monkeypatch.setattr(profile_stage, "measure_model_decode", lambda *a: pytest.fail("re-timed the model"))
    assert profile_model(loaded, formats, FAST, tmp_path) == table


# ---- --max-latency ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ms", [("8ms", 8.0), ("8.5 ms", 8.5), ("750us", 0.75), ("750µs", 0.75), ("0.01s", 10.0), ("2MS", 2.0)])
def test_max_latency_units(text, ms):
    assert _latency_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["8", "fast", "8 kg", "-1ms", "0ms", "ms", "1e999ms"])
def test_max_latency_refuses_bad_values(text):
    with pytest.raises(argparse.ArgumentTypeError, match="latency"):
        _latency_ms(text)


def test_max_latency_flag_error_exits_2(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(tiny_model_dir), "--max-latency", "8", "--out", str(tmp_path / "p.json")])
    assert e.value.code == 2
    assert "like 8ms, 8.5ms or 750us, got '8'" in capsys.readouterr().err


def test_compress_refuses_a_latency_budget_with_a_fixed_format(tiny_model_dir, tmp_path, capsys):
    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--max-latency", "8ms", "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not combine with --format" in capsys.readouterr().err
    rc = main(["plan", str(tiny_model_dir), "--out", str(tmp_path / "p.json")])
    assert rc == 2 and "needs a budget" in capsys.readouterr().err


# ---- latency budgets end to end -----------------------------------------------------------------


def _plan_flags(tiny_text_file, work):
    return ["--candidates", "w2g32,w4g64,spqr-w3g16-s3-o1.0", "--calib-text", str(tiny_text_file), "--calib-samples", "8",
            "--calib-len", "64", "--sensitivity", "proxy", "--work", str(work)]


def test_latency_budget_plan_meets_it_and_an_impossible_one_names_the_fastest(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    from tightfit.pipeline import PlanRequest, make_plan

    monkeypatch.setattr(profile_stage, "measure_bandwidth_gb_s", lambda config: 10.0)
    work = tmp_path / "work"
    # Profile through the CLI first (--predict-latency, a size budget): the table every later call reads from the cache.
    assert main(["--threads", "1", "plan", str(tiny_model_dir), "--bpw", "8", "--predict-latency", "--out", str(tmp_path / "p0.json"),
                 *_plan_flags(tiny_text_file, work)]) == 0
    out = capsys.readouterr().out
    assert "predicted decode" in out and " ms" in out.splitlines()[0]

    loaded = load_model(str(tiny_model_dir))
    config = ProfileConfig(threads=1)
    formats = ("w2g32", "w4g64", "spqr-w3g16-s3-o1.0")
    from tightfit.pipeline import linear_layer_shapes, profile_model

    # The proxy pins the embeddings and head to fp16: the head's time joins the fixed part.
    table = profile_model(loaded, [parse_format(f) for f in formats], config, work, head_formats=[FP16])
    fixed = table.fixed_ms + table.head_ms(FP16)
    layers = linear_layer_shapes(loaded)
    fastest = fixed + sum(min(table.decode_ms(s, f) for f in formats) for s in layers.values())
    slowest = fixed + sum(max(table.decode_ms(s, f) for f in formats) for s in layers.values())
    assert slowest > fastest  # the candidates' kernels differ in time
    monkeypatch.setattr(profile_stage.kernels, "time_matmul", lambda *a, **k: pytest.fail("timed a cached entry"))

    from tightfit.artifacts import CalibrationConfig

    def plan(limit):
        request = PlanRequest(model=str(tiny_model_dir), budget=Budget(max_latency_ms=limit), work=work, formats=formats,
                              calibration=CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64),
                              sensitivity="proxy", profile=config, progress=False)
        return make_plan(request, loaded)

    limit = (fastest + slowest) / 2
    report = plan(limit)
    predicted = fixed + sum(table.decode_ms(layers[n], f) for n, f in report.plan.formats.items())
    assert report.plan.predicted_latency_ms == pytest.approx(predicted)
    assert report.plan.predicted_latency_ms <= limit
    assert report.plan.budget.fixed_latency_ms == pytest.approx(fixed) and report.latency == table
    assert report.plan.pinned == {loaded.arch.embeddings: FP16, loaded.arch.head: FP16}

    with pytest.raises(InfeasibleBudget, match=r"the fastest possible is [0-9.]+ ms/token"):
        plan(fastest * 0.9)

    # Planned embeddings (the Fisher default): the untied head costs its kernel time, the lookup nothing.
    monkeypatch.undo()
    monkeypatch.setattr(profile_stage, "measure_bandwidth_gb_s", lambda config: 10.0)
    request = PlanRequest(model=str(tiny_model_dir), budget=Budget(max_latency_ms=2 * slowest), work=work, formats=formats,
                          calibration=CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=64), profile=config,
                          progress=False)
    planned = make_plan(request, loaded)
    arch = loaded.arch
    assert {c.latency_ms for c in planned.choices[arch.embeddings]} == {0.0}
    assert [c.latency_ms for c in planned.choices[arch.head]] == [planned.latency.head_ms(c.fmt) for c in planned.choices[arch.head]]
    assert planned.plan.budget.fixed_latency_ms == planned.latency.fixed_ms and not planned.plan.pinned

    rc = main(["--threads", "1", "plan", str(tiny_model_dir), "--max-latency", "1us", "--out", str(tmp_path / "p.json"),
               *_plan_flags(tiny_text_file, work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("tightfit: error: budget 0.0 ms/token cannot be met: the fastest possible is")


def test_streamed_copies_exceed_the_budget_and_share_no_storage():
    w = profile_stage._random_matrix((64, 128), parse_format("w2g32"))
    copies = profile_stage.streamed_copies(w, 1)
    assert sum(c.nbytes for c in copies) >= 1e6 > sum(c.nbytes for c in copies[:-1])
    assert copies[0] is w and len({c.codes.data_ptr() for c in copies}) == len(copies)
    assert all(c.shape == w.shape and torch.equal(c.codes, w.codes) for c in copies[:3])
    from tightfit.runtime import kernels

    assert kernels.time_matmul(copies, 1, threads=1, reps=len(copies) + 3) > 0


def test_profile_command_prints_kernel_and_in_context_times(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import dataclasses

    monkeypatch.setattr(profile_stage, "ProfileConfig", lambda threads, embed_format=None: dataclasses.replace(
        FAST, threads=threads, embed_format=embed_format))
    out = tmp_path / "latency.json"
    assert main(["profile", str(tiny_model_dir), "--threads", "1", "--work", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scales = next(line for line in printed.splitlines() if line.startswith("in-context scale"))
    first, last = DEFAULT_CANDIDATES[0], DEFAULT_CANDIDATES[-1]  # the planner's candidates, every one timed
    assert f"{first} " in scales and f"{last} " in scales and "fixed part" in printed
    table = LatencyTable.from_json(json.loads(out.read_text()))
    assert set(table.context_scale) >= set(DEFAULT_CANDIDATES) and all(v > 0 for v in table.context_scale.values())


# ---- --context and --kv: the fixed part at the decode the latency limit is for ---------------------


def test_the_fixed_part_is_measured_at_the_context_and_kv_width_asked_for(tmp_path, fake_timers, monkeypatch):
    """The whole-model decode that gives the fixed part (attention above all) runs at config.fixed_prompt
    cached positions and config.kv_bits; each (context, KV width) is its own cache entry, and the table
    records both."""
    seen = []
    monkeypatch.setattr(profile_stage, "measure_model_decode",
                        lambda packed, config: seen.append((config.fixed_prompt, config.kv_bits)) or (5.0, 2.0, 0.5))
    short = _profile(tmp_path)
    long4 = _profile(tmp_path, config=dataclasses.replace(FAST, fixed_prompt=2048, kv_bits=4))
    again = _profile(tmp_path, config=dataclasses.replace(FAST, fixed_prompt=2048, kv_bits=4))
    assert {s for s in seen} == {(FAST.fixed_prompt, 16), (2048, 4)} and len(seen) == 4  # 2 formats x 2 settings, cached after
    assert (short.context, short.kv_bits) == (FAST.fixed_prompt + FAST.fixed_new_tokens // 2, 16)
    assert (long4.context, long4.kv_bits) == (2048 + FAST.fixed_new_tokens // 2, 4) and again == long4
    assert LatencyTable.from_json(json.loads(json.dumps(long4.to_json()))) == long4
    with pytest.raises(ValueError, match="kv_bits must be one of"):
        ProfileConfig(threads=1, kv_bits=5)


def test_the_real_engine_decodes_at_the_kv_width_of_the_profile(tiny_model_dir, monkeypatch):
    """measure_model_decode runs the engine with the profile's KV width and enough positions for its context."""
    from tightfit.pipeline import uniform_rtn_packed
    from tightfit.runtime import engine as engine_mod
    from tightfit.stages.profile import timing

    made = []
    real = engine_mod.FastBackend

    def spy(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "FastBackend", spy)
    packed = uniform_rtn_packed(load_model(str(tiny_model_dir)), parse_format("w4g64"))
    config = dataclasses.replace(FAST, fixed_prompt=40, fixed_new_tokens=4, fixed_repeats=1, kv_bits=4)
    decode_ms, linear_ms, head_ms = timing.measure_model_decode(packed, config)
    assert made and made[0]["kv_bits"] == 4 and made[0]["max_positions"] == 44
    assert decode_ms > linear_ms > 0 and head_ms > 0


def test_context_and_kv_flags_reach_the_profile_and_need_a_latency_flag(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(profile_stage, "measure_bandwidth_gb_s", lambda config: 10.0)
    real = profile_stage.measure_model_decode
    monkeypatch.setattr(profile_stage, "measure_model_decode", lambda packed, config: seen.append(config) or real(packed, config))
    work = tmp_path / "work"
    assert main(["--threads", "1", "plan", str(tiny_model_dir), "--bpw", "8", "--predict-latency", "--context", "48", "--kv", "8",
                 "--out", str(tmp_path / "p.json"), *_plan_flags(tiny_text_file, work)]) == 0
    out = capsys.readouterr().out
    assert seen and all(c.fixed_prompt == 48 and c.kv_bits == 8 for c in seen)
    assert f"at {48 + seen[0].fixed_new_tokens // 2} cached positions, KV8" in out

    assert main(["plan", str(tiny_model_dir), "--bpw", "8", "--context", "48", "--out", str(tmp_path / "q.json"),
                 *_plan_flags(tiny_text_file, work)]) == 2
    assert "--context and --kv describe the decode" in capsys.readouterr().err
    assert main(["compress", str(tiny_model_dir), "--format", "w4g64", "--kv", "4", "--out", str(tmp_path / "c")]) == 2
    assert "do not combine with --format" in capsys.readouterr().err and not (tmp_path / "c").exists()

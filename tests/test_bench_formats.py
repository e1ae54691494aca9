"""bench/formats.py and bench/formats_report.py: every format family at the target bits/weight beside
llama.cpp+imatrix, the issue's targets met / not met / n/a, source-grid members out of every verdict.
Runs no benchmark: tiny models and synthetic entries only."""

from __future__ import annotations

import json
import math

import pytest

from bench_rows import MACHINE, Q4_1, _entry  # noqa: F401  (puts bench/ on the import path)

import common  # noqa: E402
import formats_plans  # noqa: E402
import peers_report  # noqa: E402
import source_grid  # noqa: E402

from tightfit.artifacts import CalibrationConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.model import load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402


# ---- bench/formats.py: every format family at the target bits/weight ---------------------------------

SMOLLM_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # one block's 7 linears


def test_formats_families_come_from_the_registry_and_skip_the_source_grid():
    import formats_report

    from tightfit.formats.registry import TENSOR_TYPES, every_format

    assert {type(f) for f in every_format()} == set(TENSOR_TYPES)  # a family with a tensor type lists its members
    assert [formats_report.family(n) for n in ("w3g64", "w4g32-sym", "w3pc", "nl4g32", "lut4g64-row", "spqr-w3g16-s3-o0.5",
                                                "plan 3.5")] == \
        ["w{b}g{g}", "w{b}g{g}-sym", "w{b}g{g}", "nl4g{g}", "lut4g{g}-row", "spqr-w{b}g{g}-s3-o{o}", "plan"]
    members = formats_report.choose_members(every_format(), SMOLLM_SHAPES, (Q4_1,))
    at = {(m.family, m.target): m for m in members}
    assert {"w{b}g{g}", "w{b}g{g}-sym", "nl4g{g}", "nf4g{g}", "lut4g{g}", "lut4g{g}-row", "spqr-w{b}g{g}-s3-o{o}"} <= {m.family for m in members}
    # the nearest asymmetric 4-bit format to 4.5 is w4g32, on the source's Q4_1 grid: named, not chosen
    assert at["w{b}g{g}", 4.5].name == "w4g64" and at["w{b}g{g}", 4.5].shadowed == "w4g32"
    assert at["w{b}g{g}-sym", 3.5].name == "w3g32-sym" and at["w{b}g{g}-sym", 3.5].bpw == pytest.approx(3.5)
    assert ("nl4g{g}", 3.0) not in at and at["nl4g{g}", 4.5].name == "nl4g32"  # 4-bit tables only: nothing near 3.0
    assert not any(m.name.endswith(("pc", "pc-sym", "-bf16")) for m in members)  # per channel and bf16 scales left out
    names = formats_report.recipes(members)
    assert "w4g32" not in names and "spqr-w4g32-s3-o0.5" not in names and len(names) == len(set(names))
    assert "w4g32" in formats_report.recipes(members, with_source_grid=True)
    only = formats_report.choose_members(every_format(), SMOLLM_SHAPES, (), families={"w{b}g{g}"}, per_channel=True)
    assert {m.family for m in only} == {"w{b}g{g}"} and any(m.name.endswith("pc") for m in only)
    assert {m.target: m.name for m in only}[4.5] == "w4g32"  # a float source: no grid to skip


def test_formats_measures_dq_twins_by_target_and_reports_the_bits_they_save():
    import formats
    import formats_report

    from tightfit.formats.registry import every_format

    members = formats_report.choose_members(every_format(), SMOLLM_SHAPES, (Q4_1,))
    extra = formats.dq_names(["w4g32-sym", "w3g16"], SMOLLM_SHAPES)
    assert list(extra) == ["w4g32-sym", "w4g32-sym-dq", "w3g16", "w3g16-dq"]
    assert extra["w3g16-dq"] < extra["w3g16"] - 0.4 and extra["w4g32-sym"] == pytest.approx(4.5)
    order = formats.by_target(members, formats_report.recipes(members), extra)
    assert sorted(order) == sorted(set(formats_report.recipes(members)) | set(extra))
    rank = {n: i for i, n in enumerate(order)}
    # w3g16-dq (~3.6 bpw) with the 3.5 target, before anything of the 4.0 one (w3g16, 4.19 bpw)
    assert rank["w4g32-sym-dq"] < rank["w3g32-sym"] < rank["w3g16-dq"] < rank["w3g16"] < rank["w2g16-sym"]
    with pytest.raises(SystemExit, match="--dq nope"):
        formats.dq_names(["nope"], SMOLLM_SHAPES)
    entries = [_entry("tightfit", "w4g32-sym", 4.50, 0.20), _entry("tightfit", "w4g32-sym-dq", 4.27, 0.21),
               _entry("tightfit", "nl4g32-dq", 4.27, 0.15)]  # no base: no row
    table = "\n".join(formats_report.dq_table(entries))
    assert "| w4g32-sym 0.2000 (4.50) | w4g32-sym-dq 0.2100 (4.27) | 0.230 | +5.0 % |" in table and "nl4g32" not in table
    assert formats_report.dq_table(entries[1:]) == ["No -dq format and its base were both measured."]


def _formats_payload(entries):
    import formats_report

    peers_report.mark_source_grid(entries, (Q4_1,))
    members = [formats_report.Member("w{b}g{g}", 4.5, "w4g64", 4.31, "w4g32"), formats_report.Member("w{b}g{g}", 3.5, "w3g32", 3.59),
               formats_report.Member("nl4g{g}", 4.5, "nl4g32", 4.5), formats_report.Member("w{b}g{g}", 2.5, "w2g32", 2.56)]
    payload = {"model": "m", "machine": MACHINE, "threads": 2, "calibration": config_to_json(CalibrationConfig()),
               "evaluation": config_to_json(EvalConfig()), "held_back_windows": 8, "source_grids": source_grid.grids_json((Q4_1,)),
               "n_tokens": 32704, "original_ppl": 15.0, "llama_cpp_version": "0.3", "wall_s": 600.0,
               "engine_floors": {"llama.cpp": {"kl": 1e-5, "ppl": 15.0, "top1": 1.0}}, "members": [m.__dict__ for m in members],
               "entries": [e.to_json() for e in entries], "big": None}
    payload.update(formats_report.verdicts(payload, entries))
    return payload


def test_formats_report_targets_classes_and_source_grid(tmp_path, monkeypatch):
    import formats
    import formats_report

    entries = [
        _entry("tightfit", "w4g64", 4.31, 0.15, held_back=0.16),
        _entry("tightfit", "nl4g32", 4.50, 0.10, held_back=0.12),  # chosen at 4.5 (lowest held-back KL), below IQ4_NL
        _entry("tightfit", "w4g32", 4.625, 0.01),  # on the source's grid: lowest KL of all, in no verdict
        _entry("tightfit", "w3g32", 3.59, 0.53),
        _entry("tightfit", "w2g32", 2.56, 2.3),  # no llama.cpp entry in its class: n/a
        _entry("llama.cpp+imatrix", "IQ4_NL", 4.50, 0.11),
        _entry("llama.cpp+imatrix", "IQ3_XXS", 4.14, 0.24, types={"IQ4_NL": 180, "IQ3_XXS": 30}),
        _entry("llama.cpp+imatrix", "Q2_K", math.nan, math.nan),  # failed
    ]
    payload = _formats_payload(entries)
    targets = {t["bpw"]: t for t in payload["targets"]}
    assert targets[4.5]["met"] is True and targets[4.5]["tightfit"]["name"] == "nl4g32"
    assert targets[3.5]["met"] is False and targets[3.5]["rival"]["kl"] == 0.24
    classes = {c["target"]: c for c in payload["classes"]}
    assert classes[2.5]["tightfit_wins"] is None and classes[2.5]["rival"] is None
    assert classes[4.0]["tightfit"] is None and classes[4.0]["rival"]["name"] == "IQ3_XXS"
    assert classes[4.5]["tightfit"]["name"] == "nl4g32" and classes[4.5]["tightfit_wins"] is True
    assert all(c["tightfit"] is None or c["tightfit"]["name"] != "w4g32" for c in payload["classes"])
    presets = {p["preset"]: p for p in payload["presets"]}
    assert presets["IQ3_XXS"]["tightfit"]["name"] == "w3g32" and presets["IQ3_XXS"]["tightfit_wins"] is False  # w4g64: 4.31 > 4.14
    assert presets["IQ4_NL"]["tightfit"]["name"] == "nl4g32" and presets["Q2_K"]["tightfit_wins"] is None
    md = formats_report.markdown(payload, entries)
    assert "Machine: Test CPU, L3 32 MiB, 2 threads" in md and "Windows used: 64 x 512 evaluation windows; 8 held-back" in md
    assert "| w{b}g{g} | w2g32 2.3000 (2.56) | - | w3g32 0.5300 (3.59) | - | w4g64 0.1500 (4.31); w4g32 on the source's grid: " \
           "0.0100, no evidence |" in md
    assert "| nl4g{g} | - | - | - | - | nl4g32 0.1000 (4.50) |" in md
    assert "below llama.cpp+imatrix IQ4_NL (0.1100 at 4.50 bpw): **met**: tightfit nl4g32" in md
    assert "below llama.cpp+imatrix IQ3_XXS (0.2400 at 4.14 bpw): **not met**: tightfit w3g32" in md
    assert "| 2.5 | 2.25-2.75 | w2g32 2.3000 (2.56) | - | n/a |" in md
    assert "Source grid: The source is a dequantized GGUF file" in md and "w4g32 can hold it" in md
    assert "llama.cpp+imatrix IQ3_XXS 180 of 210 tensors" in md and "No bench/peers_files.py results given" in md
    two = [{"cpu": "A", "isa": ["avx2"], "entries": 3}, {"cpu": "B", "isa": ["avx2", "avx512f"], "entries": 4}]
    assert "scored on 2 machines (3 on A (avx2); 4 on B (avx2, avx512f))" in formats_report.markdown({**payload, "scored_on": two}, entries)
    assert "scored on" not in md and "Partial" not in md
    partial = formats_report.markdown({**payload, "not_measured": ["w3g16-dq", "lut2g32"], "wall_s": None}, entries)
    assert "(one run, partial: 2 entries not measured yet)" in partial and "not measured yet: w3g16-dq, lut2g32." in partial
    assert "Wall time not recorded" in partial
    assert "Wall time 10.0 min." in md and "were scored by an earlier" in formats_report.markdown({**payload, "resumed_entries": 3}, entries)
    # a plan (the planner's mix) in the 3.5 class below IQ3_XXS meets that target, and has a row of its own
    plan = _entry("tightfit", "plan-3.5", 3.50, 0.20, held_back=0.21, types={"nl4g32-dq": 100, "spqr-w3g32-s3-o0.5": 110})
    plan.note = "fisher plan from nl4g32-dq, spqr-w3g32-s3-o0.5"
    with_plan = _formats_payload([*entries, plan])
    assert {t["bpw"]: t for t in with_plan["targets"]}[3.5]["tightfit"]["name"] == "plan-3.5"
    md_plan = formats_report.markdown(with_plan, [*entries, plan])
    assert "| plan (a format per layer) | - | - | plan-3.5 0.2000 (3.50) | - | - |" in md_plan
    assert "IQ3_XXS (0.2400 at 4.14 bpw): **met**: tightfit plan-3.5" in md_plan
    assert "plan-3.5: fisher plan from nl4g32-dq, spqr-w3g32-s3-o0.5." in md_plan and "plan (a format" not in md
    # no IQ4_NL measured: that target is n/a
    no_rival = _formats_payload([e for e in entries if e.name != "IQ4_NL"])
    assert {t["bpw"]: t["met"] for t in no_rival["targets"]}[4.5] is None
    assert "IQ4_NL: **n/a** (IQ4_NL not measured" in formats_report.markdown(no_rival, entries)
    # --report-only: the same report from the JSON, verdicts recomputed
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(formats, "RESULTS", tmp_path)
    common.write_results("formats", {**payload, "targets": [], "classes": []}, "")
    again = formats.main(["--report-only"])
    assert again["targets"] == payload["targets"] and (tmp_path / "formats.md").read_text() == md


def test_formats_big_section_renders_from_a_peers_files_run(tmp_path):

    import formats
    import formats_report

    big = {"model": "big", "machine": MACHINE, "evaluation": config_to_json(EvalConfig(n_windows=16)), "n_tokens": 8176,
           "original_ppl": 10.0, "n_weights": 1.777e9, "source_grids": [],
           "entries": [_entry("tightfit", "big-bpw3.5", 3.50, 0.14).to_json(), _entry("tightfit", "big-bpw4.5", 4.50, 0.025).to_json(),
                       _entry("llama.cpp+imatrix", "IQ3_XXS", 3.44, 0.24).to_json(),
                       _entry("llama.cpp+imatrix", "IQ4_XS", 4.56, 0.028).to_json(),
                       _entry("llama.cpp+imatrix", "Q4_K_M", 5.0, 0.006).to_json()]}
    path = tmp_path / "peers_big.json"
    path.write_text(json.dumps(big))
    section = formats.read_big(path)
    assert [p["preset"] for p in section["presets"]] == list(formats_report.BIG_PRESETS)
    presets = {p["preset"]: p for p in section["presets"]}
    assert presets["IQ4_XS"]["tightfit_wins"] is True and presets["Q4_K_M"]["tightfit_wins"] is False
    assert presets["IQ3_XXS"]["tightfit_wins"] is None  # no tightfit file at no more than 3.44 + 0.05 bits/weight
    assert presets["Q2_K"]["rival"] is None
    md = "\n".join(formats_report.big_section(section))
    assert "## The bigger model: big" in md and "| 3.5 | 3.25-3.75 | big-bpw3.5 0.1400 (3.50) | IQ3_XXS 0.2400 (3.44) | yes |" in md
    assert "fewer than the protocol's 64" in md and "1.777 B parameters" in md and "Source grid" not in md
    assert formats.read_big(tmp_path / "none.json") is None
    with pytest.raises(SystemExit, match="is no file"):
        formats.main(["--report-only", "--big", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit, match="run bench/formats.py first"):
        formats.main(["--report-only", "--name", "no-such-run"])


def test_formats_measures_through_the_engine_and_resumes(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import formats
    import formats_report
    import peers_runs

    from tightfit.evaluate import eval_windows
    from tightfit.formats.registry import every_format
    from tightfit.pipeline import linear_layer_shapes

    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = calibrate_stage.calibrate_with_held_back(
        loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32), 1)
    hessians = calibrate_stage.collect_hessians(loaded, calibration)
    scorer = peers_runs.Scorer(loaded.model, eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32)),
                          held_back)
    members = formats_report.choose_members(every_format(), list(linear_layer_shapes(loaded).values()), ())
    names = [m.name for m in members if m.target == 4.5 and m.family in ("w{b}g{g}-sym", "nl4g{g}")]
    assert names == ["w4g32-sym", "nl4g32"]
    progress = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    out = tmp_path / "packed"
    out.mkdir()
    formats.measure_formats(loaded, calibration, hessians, scorer, names, out, progress)
    by_name = {e.name: e for e in progress.entries}
    for name in names:
        e = by_name[name]
        assert e.peer == "tightfit" and e.bits_per_weight == pytest.approx(4.5) and 0 < e.kl < 1 and not math.isnan(e.kl_held_back)
        assert e.note == ""  # both run on the engine's kernels
    assert list(out.iterdir()) == []  # packed folders deleted once scored
    # a second run with the same key resumes: nothing is quantized again; another key starts over
    monkeypatch.setattr(peers_runs, "run_tightfit", lambda *a: pytest.fail("measured again"))
    again = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    formats.measure_formats(loaded, calibration, hessians, scorer, names, out, again)
    assert [e.kl for e in again.entries] == [e.kl for e in progress.entries]
    assert formats.Progress(tmp_path / "progress.json", {"model": "other"}).entries == []
    saved = json.loads((tmp_path / "progress.json").read_text())
    assert [m["entries"] for m in saved["machines"]] == [2]  # who scored what, for a run resumed elsewhere
    third = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    third.add([])
    third.here["entries"] = 1  # a resumed run on the same machine counts on
    assert [m["entries"] for m in third.all_machines()] == [3]
    assert formats.by_target(members, list(reversed(formats_report.recipes(members))))[0] in {
        m.name for m in members if m.target == formats.TARGET_ORDER[0]}


def test_formats_plans_mix_the_candidates_within_the_budget_and_resume(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import formats
    import formats_report
    import peers_runs

    from tightfit.evaluate import eval_windows

    monkeypatch.setattr(peers_runs, "CACHE", tmp_path / "cache")
    loaded = load_model(str(tiny_model_dir))
    config = CalibrationConfig(text=str(tiny_text_file), n_samples=8, seq_len=32)  # the planner's 8 Fisher windows
    calibration, held_back = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, config, 1)
    hessians = calibrate_stage.collect_hessians(loaded, calibration)
    scorer = peers_runs.Scorer(loaded.model, eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32)),
                          held_back)
    progress = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    out = tmp_path / "packed"
    out.mkdir()
    candidates = ["w2g32-sym", "w8g32-sym"]  # 2.5 and 8.5 bits/weight: a 4.0 budget must mix them
    formats_plans.measure_plans(str(tiny_model_dir), loaded, calibration, hessians, scorer, [4.0], candidates, out, progress)
    (e,) = progress.entries
    assert e.name == formats_plans.plan_name(4.0, candidates) != formats_plans.plan_name(4.0) == "plan-4"  # other candidates: another entry
    assert e.name.startswith("plan-4-") and formats_report.family(e.name) == formats_report.PLAN
    assert 2.5 < e.bits_per_weight <= 4.0 + 1e-9 and set(e.types) == set(candidates)
    assert sum(e.types.values()) == len(hessians.hessians) and 0 < e.kl < 10 and not math.isnan(e.kl_held_back)
    assert "w2g32-sym, w8g32-sym" in e.note and list(out.iterdir()) == []
    # the plan's work folder holds the run's own Hessians (none collected again), its sensitivities and their time
    (work,) = (tmp_path / "cache").iterdir()
    assert {"hessians.safetensors", "sensitivity.json", "planning-seconds.json"} <= {p.name for p in work.iterdir()}
    # another budget plans from the cached sensitivities; its note gives the time they took when measured
    formats_plans.measure_plans(str(tiny_model_dir), loaded, calibration, hessians, scorer, [5.0], candidates, out, progress)
    swept = json.loads((work / "planning-seconds.json").read_text())["seconds"]
    assert f"(cached sensitivities, measured in {swept:.0f} s)" in progress.entries[1].note
    # resumed: nothing planned or measured again
    monkeypatch.setattr(formats_plans, "peers_runs", None)
    again = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    formats_plans.measure_plans(str(tiny_model_dir), loaded, calibration, hessians, scorer, [4.0], candidates, out, again)
    assert [x.kl for x in again.entries] == [x.kl for x in progress.entries]


def test_a_preset_on_the_source_grid_says_so_in_the_preset_table():
    import formats_report

    on_grid = _entry(formats_report.RIVAL_PEER, "Q4_K_M", 5.0, 0.006)
    on_grid.source_grid = True
    entries = [on_grid, _entry("tightfit", "plan", 4.5, 0.03)]
    rows = formats_report.preset_rows(entries, ["Q4_K_M", "IQ4_XS"])
    table = "\n".join(formats_report.preset_table(rows))
    assert "| Q4_K_M | on the source's grid: no evidence | - | n/a |" in table
    assert "| IQ4_XS | not measured or failed | - | n/a |" in table

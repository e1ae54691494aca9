"""`tightfit pareto`: one compressed point per budget, its report, resume, and the shared Hessians."""

from __future__ import annotations

import json

from tightfit.cli import main


def test_pareto_writes_one_row_per_point_and_resumes(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    import tightfit.pipeline.pareto_sweep as pareto_sweep
    import tightfit.runtime.speed as speed

    monkeypatch.setattr(speed, "measure_bandwidth", lambda threads, megabytes=1024, repeats=5: 10.0)
    compressed = []
    real_compress = pareto_sweep.compress

    def counting(request, *a, **k):
        compressed.append(request.out.name)
        return real_compress(request, *a, **k)

    monkeypatch.setattr(pareto_sweep, "compress", counting)
    out = tmp_path / "pareto"
    common = ["--candidates", "w2g32,w4g64", "--method", "rtn", "--eval-windows", "2", "--text", str(tiny_text_file),
              "--ctx", "32", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--calib-text", str(tiny_text_file),
              "--calib-samples", "8", "--calib-len", "64", "--sensitivity", "proxy", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert main(["pareto", str(tiny_model_dir), "--budgets", "3.4", *common]) == 0
    report = json.loads((out / "pareto.json").read_text())
    names = [p["name"] for p in report["points"]]
    assert names == ["original (fp16)", "uniform w2g32", "uniform w4g64", "planned 3.40 bpw"]
    assert sorted(compressed) == ["planned-3.40", "uniform-w2g32", "uniform-w4g64"]
    original, w2, w4, planned = report["points"]
    assert original["kl"] == 0 and original["ppl"] is not None and original["size_mb"] > w4["size_mb"] > w2["size_mb"]
    assert w2["kl"] > w4["kl"] > 0 and all(p["decode_tok_s"] > 0 and p["read_mb"] > 0 for p in report["points"])
    assert w2["bits_per_weight"] < planned["bits_per_weight"] <= 3.4
    md = (out / "pareto.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    assert f"Calibration: {tiny_text_file}, 8 windows of 64 tokens (the original model's Hessians)" in md  # how the points were made
    assert "candidates w2g32, w4g64; embeddings fp16." in md and "planner sensitivity proxy" in md
    assert report["machine"] and f"Machine: {report['machine']}." in md  # where the speeds were timed
    assert report["bandwidth_gb_s"] == 10.0 and "read bandwidth 10.0 GB/s" in md  # probed beside the speeds
    try:
        import matplotlib  # noqa: F401

        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out

    # Resume: only the new budget is compressed; an infeasible one is recorded as skipped.
    compressed.clear()
    assert main(["pareto", str(tiny_model_dir), "--budgets", "3.4,3.0,1.0", *common]) == 0
    assert compressed == ["planned-3.00"]
    points = json.loads((out / "pareto.json").read_text())["points"]
    assert points[1]["decode_tok_s"] != w2["decode_tok_s"], "points from the first run are timed again beside the new ones"
    assert [p["name"] for p in points] == names + ["planned 3.00 bpw", "planned 1.00 bpw"]
    assert points[-1]["skipped"] and "cannot be met" in points[-1]["skipped"] and points[-1]["kl"] is None
    assert "| planned 1.00 bpw | skipped:" in (out / "pareto.md").read_text()

    capsys.readouterr()
    rc = main(["pareto", str(tiny_model_dir), "--budgets", "3.4", *[c if c != "rtn" else "gptq" for c in common]])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "other settings (method)" in err


def test_pareto_with_gptq_uses_the_original_hessians_once(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import tightfit.pipeline.pareto_sweep as pareto_sweep
    import tightfit.runtime.speed as speed

    monkeypatch.setattr(speed, "measure_bandwidth", lambda threads, megabytes=1024, repeats=5: 10.0)
    seen = []
    real_compress = pareto_sweep.compress
    monkeypatch.setattr(pareto_sweep, "compress", lambda request, *a, **k: seen.append(k.get("hessians")) or real_compress(request, *a, **k))
    common = ["--candidates", "w2g32,w4g64", "--eval-windows", "1", "--text", str(tiny_text_file), "--ctx", "32",
              "--new-tokens", "2", "--repeats", "1", "--threads", "1", "--calib-text", str(tiny_text_file), "--calib-samples", "8",
              "--calib-len", "64", "--sensitivity", "proxy", "--work", str(tmp_path / "work")]
    assert main(["pareto", str(tiny_model_dir), "--budgets", "3.4", *common, "--out", str(tmp_path / "p")]) == 0
    assert len(seen) == 3 and seen[0] is not None and all(h is seen[0] for h in seen), "one set of Hessians for every point"
    assert (tmp_path / "work" / "hessians.safetensors").is_file()
    seen.clear()
    assert main(["pareto", str(tiny_model_dir), "--budgets", "3.4", *common, "--sequential", "--out", str(tmp_path / "q")]) == 0
    assert seen == [None, None, None]

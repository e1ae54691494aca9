"""bench/matrix_ab.py: one layer of several packed folders timed round-robin through the kernels the
engine loads, SpQR's outliers timed apart on request. Tiny packed models, two timing rounds: the
figures are not checked, only that every pair is timed and a bad folder or layer is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench_rows import MACHINE  # noqa: F401  (puts bench/ on the import path)

import matrix_ab  # noqa: E402

from tightfit.cli import main as cli  # noqa: E402

LAYER = "model.layers.0.mlp.gate_proj"


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("matrix_ab")
    made = []
    for fmt in ("w3g64", "spqr-w3g32-s3-o0.5"):
        folder = out / fmt
        assert cli(["compress", str(tiny_model_dir), "--format", fmt, "--method", "rtn", "--no-eval", "--out", str(folder)]) == 0
        made.append(str(folder))
    return made


def test_every_pair_is_timed_and_outliers_apart(folders, capsys):
    matrix_ab.main([*folders, "--layer", LAYER, "--no-outliers", "--rounds", "2", "--reps", "2",
                    "--variant", "", "--variant", "TF_OUTLIER_SIMD=0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{LAYER} [") and "1 rounds of 2 calls" in lines[0]
    rows = [line.split()[:2] for line in lines[1:]]
    labels = ["w3g64", "spqr-w3g32-s3-o0.5", "spqr-w3g32-s3-o0.5/no-outliers"]
    assert [r[0] for r in rows] == [x for x in labels for _ in range(2)]
    assert [r[1] for r in rows] == ["(default)", "TF_OUTLIER_SIMD=0"] * 3
    assert "100.0 % of the first's speed" in lines[1]


def test_bad_folder_or_layer_is_one_line(folders, tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a packed tightfit folder"):
        matrix_ab.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="has no layer 'model.nothing'"):
        matrix_ab.main([folders[0], "--layer", "model.nothing"])
    with pytest.raises(SystemExit):
        matrix_ab.main([folders[0], "--rounds", "1"])
    assert "--rounds must be at least 2" in capsys.readouterr().err

"""bench/decode_pairs.py: every non-uniform format paired with the uniform one nearest in bytes (and an
A/A control), timed A B B A in bursts on the same prompt. Tiny packed models, two rounds: the figures
are not checked, only the pairing, that every pair is timed every round at the same positions, and the
table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench_rows import MACHINE  # noqa: F401  (puts bench/ on the import path)

import decode_pairs  # noqa: E402

from tightfit.cli import main as cli  # noqa: E402
from tightfit.errors import TightfitError  # noqa: E402
from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.runtime.engine import FastBackend  # noqa: E402


def test_each_other_format_meets_the_uniform_one_of_nearest_bytes():
    pairs = decode_pairs.nearest_uniform({"w3g64": 75, "w4g32-sym": 94, "spqr-w3g32-s3-o0.5": 78, "nl4g32": 94,
                                          "w3g64 (copy)": 75})
    assert pairs == [("w3g64 (copy)", "w3g64"), ("spqr-w3g32-s3-o0.5", "w3g64"), ("nl4g32", "w4g32-sym")]
    sizes = {"w3g64": 75.8, "w3g32": 80.7, "spqr-w3g32-s3-o0.5": 78.2, "lut3g128": 73.5, "w3g64 (copy)": 75.8}
    assert decode_pairs.nearest_uniform(sizes, bracket=True) == [
        ("w3g64 (copy)", "w3g64"), ("spqr-w3g32-s3-o0.5", "w3g64"), ("spqr-w3g32-s3-o0.5", "w3g32"), ("lut3g128", "w3g64")]
    with pytest.raises(TightfitError, match="at least one uniform format"):
        decode_pairs.nearest_uniform({"nl4g32": 94, "lut4g32": 94})
    with pytest.raises(TightfitError, match="at least one uniform format"):
        decode_pairs.nearest_uniform({"w3g64": 75})


def test_every_pair_is_timed_each_round_at_the_same_positions(tiny_model_dir: Path, tmp_path: Path):
    backends = {}
    for fmt in ("w3g64", "spqr-w3g32-s3-o0.5"):
        assert cli(["compress", str(tiny_model_dir), "--format", fmt, "--method", "rtn", "--no-eval", "--out", str(tmp_path / fmt)]) == 0
        backends[fmt] = FastBackend(load_packed(tmp_path / fmt), max_positions=16, threads=1)
    backends["w3g64 (copy)"] = FastBackend(load_packed(tmp_path / "w3g64"), max_positions=16, threads=1)
    pairs = decode_pairs.nearest_uniform({f: b.weight_bytes for f, b in backends.items()})
    rounds = []
    ratios, tok_s = decode_pairs.time_pairs(backends, pairs, [1, 2, 3, 4], [5, 6, 7], 2, on_round=rounds.append)
    assert rounds == [0, 1, 2] and all(b.position == 7 for b in backends.values())  # prompt + one burst
    assert {pair: len(r) for pair, r in ratios.items()} == {("w3g64 (copy)", "w3g64"): 2, ("spqr-w3g32-s3-o0.5", "w3g64"): 2}
    assert len(tok_s["w3g64"]) == 4 and all(t > 0 for ts in tok_s.values() for t in ts)  # it serves both pairs
    rows = decode_pairs.rows_of(pairs, {f: b.weight_bytes for f, b in backends.items()}, ratios, tok_s)
    md = decode_pairs.markdown({"machine": MACHINE, "model": "tiny", "threads": 1, "rounds": 2, "burst": 3,
                                "prompt_tokens": 4, "rows": rows})
    assert "| spqr-w3g32-s3-o0.5 |" in md and "| w3g64 |" in md
    assert "The first row is the A/A control (w3g64 against a second copy of itself)" in md

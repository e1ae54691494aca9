"""What the bench report tests share (tests/test_bench_*.py): bench/ on the import path, a machine
line, the default model's source grid and synthetic result rows."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import peers_report  # noqa: E402
import source_grid  # noqa: E402

Q4_1 = source_grid.SourceGrid("Q4_1", 4, 32, True, 210)  # the default model's grid
MACHINE = {"cpu": "Test CPU", "l3": "32 MiB", "isa": ["avx2"], "cores": 2, "torch_threads": 2, "torch": "2.x",
           "tightfit": "0.0", "python": "3.11", "date": "2026-01-01T00:00:00+00:00"}


def _row(name: str, bpw: float, kl: float, kl_held_back: float, family: str = "uniform") -> dict:
    return {"format": name, "name": name, "family": family, "bits_per_weight": bpw, "model_bits_per_weight": bpw + 2,
            "file_bytes": 1, "ppl": 20.0, "kl": kl, "top1": 0.7, "kl_fp32": kl * 0.99, "ppl_fp32": 20.0, "top1_fp32": 0.7,
            "kl_held_back": kl_held_back, "engine_dense_layers": 0, "quantize_seconds": 1.0, "outlier_share": {}}


def _entry(peer, name, bpw, kl, held_back=None, types=None):
    return peers_report.Entry(peer, name, bpw, 1.0, ppl=20.0, kl=kl, top1=0.7, kl_held_back=kl if held_back is None else held_back,
                              types=types or {})

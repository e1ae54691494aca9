"""The compress run's memory estimate (pipeline/footprint.py): its terms against the tensors the code
really allocates on a tiny random model, and the one-line refusal before any weight is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tightfit.algorithms import HessianAccumulator
from tightfit.algorithms.gptq import GRAM_BLOCK
from tightfit.artifacts import CalibrationConfig
from tightfit.cli import main
from tightfit.errors import InsufficientMemory
from tightfit.evaluate import EvalConfig
from tightfit.model import load as load_module
from tightfit.model import load_model, open_weights
from tightfit.model import memory as memory_module
from tightfit.model.blocks import capture_block_inputs
from tightfit.model.memory import MemoryBudget, memory_budget
from tightfit.pipeline import footprint
from tightfit.pipeline.footprint import CompressSettings, CompressShapes, check_compress_memory, compress_peak

CALIBRATION = CalibrationConfig(n_samples=4, seq_len=32, batch_size=2)


@pytest.fixture(scope="module")
def shapes(tiny_model_dir: Path) -> CompressShapes:
    return CompressShapes.of(open_weights(str(tiny_model_dir)), streamed=False)


def test_shapes_match_the_loaded_model(tiny_model_dir: Path, shapes: CompressShapes) -> None:
    loaded = load_model(str(tiny_model_dir))
    model, arch = loaded.model, loaded.arch
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith(arch.blocks)]
    assert shapes.linear_weights == sum(m.weight.numel() for m in linears)
    assert shapes.widest_input == max(m.in_features for m in linears) == model.config.intermediate_size
    assert shapes.hidden == model.config.hidden_size and shapes.vocab == model.config.vocab_size
    assert shapes.whole_fp32 == shapes.held_fp32 == sum(p.numel() * 4 for p in model.parameters())
    outside = sum(p.numel() * 4 for name, p in model.named_parameters() if not name.startswith(f"{arch.blocks}."))
    assert shapes.outside_fp32 == outside
    streamed = CompressShapes.of(open_weights(str(tiny_model_dir)), streamed=True)
    assert outside < streamed.held_fp32 < streamed.whole_fp32


def test_terms_count_the_tensors_the_stages_allocate(tiny_model_dir: Path, shapes: CompressShapes) -> None:
    estimate = compress_peak(shapes, CompressSettings(calibration=CALIBRATION, evaluation=None))
    loaded = load_model(str(tiny_model_dir))
    tokens = torch.randint(0, shapes.vocab, (CALIBRATION.n_samples, CALIBRATION.seq_len))
    inputs = capture_block_inputs(loaded.model, loaded.arch, tokens, CALIBRATION.batch_size)
    activations = sum(h.numel() * h.element_size() for h in inputs.hidden)
    assert estimate.phases["hessian"]["calibration activations"] == activations
    assert estimate.phases["forward"]["calibration activations"] == 2 * activations  # a block's inputs and outputs
    acc = HessianAccumulator(shapes.widest_input)
    acc.add_batch(torch.randn(4, shapes.widest_input))
    result, k = acc.hessian(), shapes.widest_input
    row_block = min(GRAM_BLOCK, k) * k * acc._h.element_size()  # the largest temporary of hessian()
    held = acc._h.numel() * acc._h.element_size() + result.numel() * result.element_size() + row_block
    assert estimate.phases["hessian"]["Hessian accumulator (fp64)"] == held
    assert estimate.phases["hessian"]["working copy (fp32)"] == shapes.whole_fp32  # quantize_model's deepcopy
    assert estimate.held["loaded weights (fp32)"] == shapes.whole_fp32
    assert set(estimate.phases) == {"hessian", "factor", "forward"}
    assert estimate.total == max(estimate.phase_total(p) for p in estimate.phases)


def test_settings_move_the_terms_they_should(shapes: CompressShapes) -> None:
    base = CompressSettings(calibration=CALIBRATION, evaluation=EvalConfig(n_windows=4, ctx=64))
    estimate = compress_peak(shapes, base)
    halved = compress_peak(shapes, dataclasses.replace(base, calibration=dataclasses.replace(CALIBRATION, n_samples=2)))
    assert 2 * halved.phases["hessian"]["calibration activations"] == estimate.phases["hessian"]["calibration activations"]
    ev = estimate.phases["evaluate"]
    quantized = int(shapes.linear_weights * footprint.QUANTIZED_BYTES_PER_WEIGHT)
    assert ev["packed model in the engine"] == shapes.whole_fp32 + quantized  # torch: fp32 weights beside the codes
    assert ev["log-probs of one batch"] == footprint.LOGITS_COPIES * 2 * 64 * shapes.vocab * 4
    assert ev["reference hidden states"] == 0  # a reference in memory replays nothing
    assert "evaluate" not in compress_peak(shapes, dataclasses.replace(base, evaluation=None)).phases
    rtn = compress_peak(shapes, dataclasses.replace(base, method="rtn"))
    assert "hessian" not in rtn.phases and rtn.total <= estimate.total
    planned = compress_peak(shapes, dataclasses.replace(base, planned=True, original_hessians=True))
    assert "planner" in planned.phases and "hessian" not in planned.phases


def test_refusal_names_what_fits(shapes: CompressShapes) -> None:
    # a long evaluation context makes the log-probs the peak: --no-eval is what fits
    settings = CompressSettings(calibration=CALIBRATION, evaluation=EvalConfig(n_windows=2, ctx=4096))
    estimate = compress_peak(shapes, settings)
    assert estimate.peak_phase == "evaluate"
    without_eval = compress_peak(shapes, dataclasses.replace(settings, evaluation=None)).total
    check_compress_memory(shapes, settings, MemoryBudget(available=estimate.total, detail="enough"))
    check_compress_memory(shapes, settings, MemoryBudget(available=None, detail="unknown"))
    with pytest.raises(InsufficientMemory, match=r"^compressing .* needs about \d+\.\d GB at its peak \(evaluate; largest "
                       r"part: runtime \d+\.\d GB\), \d+\.\d GB is available \(MemAvailable small\); --no-eval would "
                       r"fit \(about \d+\.\d GB\)$"):
        check_compress_memory(shapes, settings, MemoryBudget(available=without_eval, detail="MemAvailable small"))
    with pytest.raises(InsufficientMemory, match=r"no calibration or evaluation setting brings it under that: use a "
                       r"smaller model or free memory$"):
        check_compress_memory(shapes, settings, MemoryBudget(available=footprint.RUNTIME_BYTES, detail="tiny"))


def test_cli_refuses_in_one_line_before_loading(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 500000 kB\n")  # 0.5 GB
    small = memory_budget(meminfo=tmp_path / "meminfo", proc_cgroup=tmp_path / "none", cgroup_root=tmp_path / "none")
    monkeypatch.setattr(memory_module, "memory_budget", lambda: small)
    monkeypatch.setattr(load_module, "_hf_model", lambda weights: pytest.fail("weights were read"))
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_model_dir), "--format", "w4g32", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tightfit: error: compressing "), lines
    assert "0.5 GB is available (MemAvailable 0.5 GB)" in lines[0]
    assert not out.exists()


def test_smooth_attention_counts_the_calibration_forwards(shapes: CompressShapes) -> None:
    """RTN with SmoothAttention runs the calibration windows through the blocks (key scales): the
    estimate has that forward phase; GPTQ has it already and costs the same either way."""
    cal = CalibrationConfig(n_samples=64, seq_len=512)
    rtn = compress_peak(shapes, CompressSettings(calibration=cal, evaluation=None, method="rtn"))
    smooth = compress_peak(shapes, CompressSettings(calibration=cal, evaluation=None, method="rtn", smooth_attention=True))
    assert "forward" not in rtn.phases and "forward" in smooth.phases
    assert smooth.total > rtn.total
    gptq = CompressSettings(calibration=cal, evaluation=None)
    assert compress_peak(shapes, dataclasses.replace(gptq, smooth_attention=True)).total == compress_peak(shapes, gptq).total

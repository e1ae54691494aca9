"""Fixed non-uniform grid formats (formats/grid.py): names, exact bytes and storage, nearest-level
codes, the scale search, and GPTQ on the grid."""

import math

import pytest
import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.algorithms.gptq import gptq_quantize
from tightfit.errors import FormatError
from tightfit.formats.grid import (
    GRID_BITS,
    GRIDS,
    GridFormat,
    GridTensor,
    all_grid_formats,
    choose_level_scale,
    dequantize_grid,
    grid_levels,
    nearest_level,
    quantize_grid_rtn,
)
from tightfit.formats.primitives import quantize_rtn
from tightfit.formats.registry import parse_format, unpack_tensor
from tightfit.formats.table import QuantFormat

from test_formats_primitives import gaussian, one_thread, sqnr_db  # noqa: F401  (one_thread: an autouse fixture)


# ---- the table ------------------------------------------------------------------------------------


def test_grids_are_16_sorted_int8_levels():
    for levels in GRIDS.values():
        assert len(levels) == 1 << GRID_BITS
        assert list(levels) == sorted(set(levels))
        assert all(isinstance(v, int) and -128 <= v <= 127 for v in levels)


@pytest.mark.parametrize("fmt", all_grid_formats(), ids=lambda f: f.name)
def test_names_round_trip(fmt):
    assert GridFormat.parse(fmt.name) == fmt
    assert parse_format(f"  {fmt.name.upper()} ") == fmt
    assert GridFormat.from_json(fmt.to_json()) == fmt


def test_name_examples():
    assert parse_format("nl4g32") == GridFormat("nl4", 32)
    assert parse_format("nf4pc-bf16") == GridFormat("nf4", None, "bf16")
    assert GridFormat("nl4", 128).name == "nl4g128"


@pytest.mark.parametrize("text, match", [
    ("nl4g48", r"group size 48"),
    ("nl4g32-sym", r"cannot parse grid format 'nl4g32-sym'.*nl4g32"),
    ("nf4", r"cannot parse grid format"),
    ("nl4g32-bf16-bf16", r"cannot parse grid format"),
])
def test_bad_names_raise_one_line(text, match):
    with pytest.raises(FormatError, match=match) as info:
        parse_format(text)
    assert "\n" not in str(info.value)


def test_constructor_validates():
    with pytest.raises(FormatError, match="grid 'nl3'"):
        GridFormat("nl3")
    with pytest.raises(FormatError, match="scale dtype"):
        GridFormat("nl4", 32, "fp32")


@pytest.mark.parametrize("n, k, group", [(48, 256, 32), (7, 100, 32), (5, 576, 128), (3, 40, None)])
def test_bytes_are_codes_and_scales(n, k, group):
    fmt = GridFormat("nl4", group)
    g = 1 if group is None else math.ceil(k / group)
    b = fmt.nbytes(n, k)
    assert (b.codes, b.scales, b.zeros, b.outliers) == (math.ceil(n * k * GRID_BITS / 8), 2 * n * g, 0, 0)
    # same bytes as the symmetric uniform 4-bit format of the same group (IQ4_NL's 4.5 bpw at g32)
    assert b.total == QuantFormat(4, group, symmetric=True).nbytes(n, k).total


# ---- storage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nl4g32", "nf4g16", "nl4pc-bf16", "nf4g128"])
@pytest.mark.parametrize("shape", [(48, 256), (7, 100)])
def test_pack_unpack_is_exact_and_bytes_are_exact(name, shape):
    fmt = parse_format(name)
    q = quantize_grid_rtn(gaussian(*shape), fmt)
    tensors = q.pack()
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == fmt.nbytes(*shape).total == q.nbytes().total
    back = unpack_tensor(fmt, shape, tensors)
    assert isinstance(back, GridTensor)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_unpack_rejects_bad_tensors():
    fmt = GridFormat("nl4", 32)
    tensors = quantize_grid_rtn(gaussian(8, 64), fmt).pack()
    with pytest.raises(FormatError, match="needs keys"):
        GridTensor.unpack(fmt, (8, 64), {**tensors, "qzeros": tensors["qweight"]})
    with pytest.raises(FormatError, match="scales must be"):
        GridTensor.unpack(fmt, (8, 64), {**tensors, "scales": tensors["scales"].float()})
    with pytest.raises(FormatError, match="nonzero"):
        GridTensor.unpack(fmt, (8, 64), {**tensors, "scales": torch.zeros_like(tensors["scales"])})
    with pytest.raises(FormatError, match="bytes"):
        GridTensor.unpack(fmt, (8, 64), {**tensors, "qweight": tensors["qweight"][:-1]})


# ---- codes and scales -----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", list(GRIDS))
def test_codes_are_the_nearest_level(grid):
    fmt = GridFormat(grid, 32)
    w = gaussian(64, 32)
    scale = choose_level_scale(w, grid_levels(grid), fmt).unsqueeze(1)  # [N, 1]
    w_hat = dequantize_grid(nearest_level(w / scale, grid_levels(grid)), scale, fmt)
    every_level = torch.tensor(GRIDS[grid], dtype=torch.float32) * scale.unsqueeze(2)  # [N, 1, 16]
    nearest = (w.unsqueeze(2) - every_level).abs().amin(dim=2)  # [N, 32]
    assert torch.allclose((w - w_hat).abs(), nearest, rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", [GRIDS["nl4"], GRIDS["nf4"], (-8, -3, 0, 5), (-2, -1, 0, 1), (-1.5, 0.25, 2.0)])
def test_nearest_level_by_lookup_is_the_binary_search_on_midpoints_ties_to_the_lower(levels):
    """Integer tables take a lookup of ceil(2x); any table gives what bucketize on the midpoints gives:
    ties (x exactly on a midpoint) to the lower level, far outside the table to its ends."""
    table = torch.tensor(levels, dtype=torch.float32)
    mids = (table[1:] + table[:-1]) / 2
    x = torch.cat([gaussian(64, 512).flatten() * 60, torch.arange(-300, 300, 0.25), mids,
                   torch.nextafter(mids, torch.full_like(mids, 1e9)), torch.nextafter(mids, torch.full_like(mids, -1e9)),
                   torch.tensor([1e30, -1e30, float("inf"), -float("inf"), 0.0, -0.0])])
    x = x[: x.numel() // 4 * 4]
    codes = nearest_level(x.reshape(4, -1), table)
    assert codes.dtype == torch.uint8 and codes.shape == (4, x.numel() // 4)
    assert torch.equal(codes.flatten(), torch.bucketize(x, mids).to(torch.uint8))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_values_are_levels_times_a_signed_scale(grid):
    q = quantize_grid_rtn(gaussian(64, 128, seed=2), GridFormat(grid, 32))
    per_weight = q.scales.repeat_interleave(32, dim=1)  # [N, K]
    levels = torch.tensor(GRIDS[grid], dtype=torch.float32)
    assert torch.equal(q.dequantize(), levels[q.codes.long()] * per_weight)
    assert torch.equal(q.scales, q.scales.half().float())  # stored exactly in fp16
    assert bool((q.scales < 0).any() and (q.scales > 0).any())  # the grid is mirrored where that fits better


@pytest.mark.parametrize("grid", list(GRIDS))
def test_scale_search_never_loses_to_absmax_scaling(grid):
    fmt = GridFormat(grid, 32)
    w = gaussian(256, 32, seed=3) * torch.logspace(-1, 1, 32)  # uneven columns
    weight = torch.rand(32, generator=torch.Generator().manual_seed(4))

    def err(scale):
        s = scale.unsqueeze(1)
        return ((w - dequantize_grid(nearest_level(w / s, grid_levels(grid)), s, fmt)).square() * weight).sum(1)

    searched = err(choose_level_scale(w, grid_levels(grid), fmt, weight))
    absmax = err(choose_level_scale(w, grid_levels(grid), fmt, weight, search=False))
    assert bool((searched <= absmax * (1 + 1e-3)).all())  # up to the fp16 rounding of the refitted scale
    assert searched.sum() < 0.9 * absmax.sum()


def test_grid_beats_the_uniform_symmetric_grid_on_gaussian_weights():
    """Bell-shaped weights put more levels near 0: at equal bytes both grids beat w4g32-sym by a margin."""
    w = gaussian(256, 512, seed=5)
    uniform = sqnr_db(w, quantize_rtn(w, QuantFormat(4, 32, symmetric=True)).dequantize())
    for grid in GRIDS:
        assert sqnr_db(w, quantize_grid_rtn(w, GridFormat(grid, 32)).dequantize()) > uniform + 0.5, grid


def test_zero_and_constant_groups():
    fmt = GridFormat("nl4", 32)
    w = torch.zeros(3, 64)
    w[1, :32] = 0.37
    w[2, 32:] = -2.5
    q = quantize_grid_rtn(w, fmt)
    assert bool(torch.isfinite(q.scales).all() and (q.scales != 0).all())
    err = (q.dequantize() - w).abs()
    # all-zero row: the smallest normal scale on the level nearest 0 (nl4 has no exact 0)
    assert err[0].max() <= torch.finfo(torch.float16).tiny * min(abs(v) for v in GRIDS["nl4"])
    assert err.max() < 1e-3 * w.abs().max()


def test_bad_weights_raise():
    w = gaussian(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        quantize_grid_rtn(w, GridFormat("nf4", 32))


# ---- GPTQ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nl4g32", "nf4g64"])
def test_gptq_on_the_grid_reduces_output_error(name):
    torch.manual_seed(0)
    fmt = parse_format(name)
    w = torch.randn(96, 128)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(2048, 128)  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    rtn = quantize_rtn_any(w, fmt)
    result = gptq_quantize(w, h, fmt)
    assert isinstance(result.quantized, GridTensor) and result.quantized.fmt == fmt
    out_err = lambda w_hat: float(((x @ (w - w_hat).T) ** 2).mean())  # noqa: E731
    assert out_err(result.quantized.dequantize()) < 0.8 * out_err(rtn.dequantize())
    # and GPTQ's grid beats GPTQ's uniform grid of equal bytes on the same Hessian
    uniform = gptq_quantize(w, h, QuantFormat(4, fmt.group_size, symmetric=True)).quantized
    assert out_err(result.quantized.dequantize()) < out_err(uniform.dequantize())

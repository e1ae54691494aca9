"""Learned 4-, 3- and 2-bit tables (formats/lut.py): names, exact bytes with the tables counted, storage, the
weighted k-means, GPTQ on a fitted table, and a tiny model quantized, packed and reloaded."""

import pytest
import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.algorithms.gptq import gptq_quantize
from tightfit.artifacts import CalibrationConfig, QuantizeConfig, parse_choice
from tightfit.errors import FormatError
from tightfit.formats.grid import GRIDS
from tightfit.formats.lut import (
    LEVEL_MAX,
    LUT_BITS,
    LutFormat,
    LutTensor,
    all_lut_formats,
    fit_levels,
    init_levels,
    lloyd_levels,
    table_error,
)
from tightfit.formats.packed import load_packed
from tightfit.formats.registry import parse_format, unpack_tensor
from tightfit.model import load_model
from tightfit.runtime import build_model
from tightfit.stages import calibrate as calibrate_stage
from tightfit.stages import pack as pack_stage
from tightfit.stages import quantize as quantize_stage

from test_formats_primitives import gaussian, one_thread  # noqa: F401  (one_thread: an autouse fixture)


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[N, K] Student-t(4) weights with per-row spread: LLM-like tails, unlike a Gaussian."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) / torch.sqrt(torch.distributions.Chi2(4.0).sample((n, k)) / 4)
    return t * torch.rand(n, 1, generator=g).add(0.5)


# ---- names and bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", all_lut_formats(), ids=lambda f: f.name)
def test_names_round_trip(fmt):
    assert LutFormat.parse(fmt.name) == fmt
    assert parse_format(f"  {fmt.name.upper()} ") == fmt
    assert parse_choice(fmt.name) == fmt  # the planner's candidates
    assert LutFormat.from_json(fmt.to_json()) == fmt


def test_name_examples():
    assert parse_format("lut4g32") == LutFormat(32)
    assert parse_format("lut4pc") == LutFormat(None)
    assert parse_format("lut4g64-row") == LutFormat(64, per_row=True)
    assert parse_format("lut4g128-row-bf16") == LutFormat(128, True, "bf16")
    assert parse_format("lut3g64") == LutFormat(64, bits=3)
    assert parse_format("lut2g32-row") == LutFormat(32, per_row=True, bits=2)
    assert parse_format("lut3pc-row-bf16") == LutFormat(None, True, "bf16", bits=3)
    assert {f.bits for f in all_lut_formats()} == set(LUT_BITS) == {2, 3, 4}


def test_old_json_without_bits_is_a_4_bit_table():
    """Plans and manifests written before the 2- and 3-bit tables have no `bits` key."""
    old = {k: v for k, v in LutFormat(64, True).to_json().items() if k != "bits"}
    assert LutFormat.from_json(old) == LutFormat(64, True, bits=4)


@pytest.mark.parametrize("text, match", [
    ("lut4g48", r"group size 48"),
    ("lut4g32-bf16-row", r"cannot parse learned-table format 'lut4g32-bf16-row'.*lut3g64-row"),
    ("lut5g32", r"invalid learned-table format 'lut5g32': learned-table bits 5 is not in the format table; choose one of 2, 3, 4"),
    ("lut1g32-row", r"learned-table bits 1 is not"),
    ("lut8pc", r"learned-table bits 8 is not"),
    ("lut3g24", r"group size 24"),
    ("lutg32", r"cannot parse learned-table format"),
    ("lut4", r"cannot parse learned-table format"),
    ("lut3", r"cannot parse learned-table format"),
])
def test_bad_names_raise_one_line(text, match):
    with pytest.raises(FormatError, match=match) as info:
        parse_format(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_nbytes_count_the_tables(group):
    n, k = 576, 1536
    grid = parse_format("nl4" + ("pc" if group is None else f"g{group}")).nbytes(n, k)
    tensor, row = LutFormat(group).nbytes(n, k), LutFormat(group, per_row=True).nbytes(n, k)
    assert (tensor.levels, row.levels) == (16, 16 * n)
    assert tensor.total == grid.total + 16 and row.total == grid.total + 16 * n
    assert LutFormat(32).bits_per_weight(n, k) == pytest.approx(4.5 + 128 / (n * k))
    assert LutFormat(32, True).bits_per_weight(n, k) == pytest.approx(4.5 + 128 / k)


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("group", [32, 64, None])
def test_nbytes_of_smaller_tables_match_the_symmetric_uniform_format_plus_the_table(bits, group):
    """b-bit codes packed as w{b}'s, one scale per group, no zeros: w{b}...-sym's bytes plus 2^b (or 2^b N) table bytes."""
    n, k = 576, 1536
    sym = parse_format(f"w{bits}" + ("pc" if group is None else f"g{group}") + "-sym").nbytes(n, k)
    tensor, row = LutFormat(group, bits=bits).nbytes(n, k), LutFormat(group, per_row=True, bits=bits).nbytes(n, k)
    assert (tensor.codes, tensor.scales, tensor.zeros) == (sym.codes, sym.scales, 0) == (row.codes, row.scales, 0)
    assert (tensor.levels, row.levels) == (1 << bits, (1 << bits) * n)
    assert tensor.total == sym.total + (1 << bits) and row.total == sym.total + (1 << bits) * n
    if group is not None:
        assert LutFormat(group, bits=bits).bits_per_weight(n, k) == pytest.approx(bits + 16 / group + 8 * (1 << bits) / (n * k))
        assert LutFormat(group, True, bits=bits).bits_per_weight(n, k) == pytest.approx(bits + 16 / group + 8 * (1 << bits) / k)


@pytest.mark.parametrize("name", ["lut4g32", "lut4pc", "lut4g64-row", "lut4g16-row-bf16", "lut3g64", "lut3g32-row",
                                  "lut2g32", "lut2pc-row-bf16"])
@pytest.mark.parametrize("shape", [(8, 64), (5, 100), (33, 576)])
def test_pack_unpack_is_exact_and_bytes_are_exact(name, shape):
    fmt = parse_format(name)
    q = quantize_rtn_any(heavy_tailed(*shape), fmt)
    assert isinstance(q, LutTensor)
    packed = q.pack()
    assert sum(t.numel() * t.element_size() for t in packed.values()) == fmt.nbytes(*shape).total == q.nbytes().total
    back = unpack_tensor(fmt, shape, packed)
    assert isinstance(back, LutTensor) and torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(back.levels, q.levels) and torch.equal(back.codes, q.codes)
    assert int(q.codes.max()) < fmt.entries and q.levels.shape[-1] == fmt.entries
    rows = q.rows(slice(2, 5))  # error_rows' pieces: a per-tensor table is shared, a per-row one sliced
    assert torch.equal(rows.dequantize(), q.dequantize()[2:5])


def test_unpack_refuses_bad_tables():
    fmt = parse_format("lut4g32-row")
    tensors = quantize_rtn_any(heavy_tailed(8, 64), fmt).pack()
    with pytest.raises(FormatError, match=r"needs keys \['levels', 'qweight', 'scales'\]"):
        unpack_tensor(fmt, (8, 64), {k: v for k, v in tensors.items() if k != "levels"})
    with pytest.raises(FormatError, match=r"levels must be int8 \[8, 16\]"):
        unpack_tensor(fmt, (8, 64), {**tensors, "levels": tensors["levels"][0]})
    with pytest.raises(FormatError, match="sorted"):
        unpack_tensor(fmt, (8, 64), {**tensors, "levels": tensors["levels"].flip(1)})
    with pytest.raises(FormatError, match="sorted and in"):
        unpack_tensor(fmt, (8, 64), {**tensors, "levels": torch.full((8, 16), -128, dtype=torch.int8)})
    three = quantize_rtn_any(heavy_tailed(8, 64), parse_format("lut3g32")).pack()
    with pytest.raises(FormatError, match=r"levels must be int8 \[8\]"):
        unpack_tensor(parse_format("lut3g32"), (8, 64), {**three, "levels": torch.zeros(16, dtype=torch.int8)})
    with pytest.raises(FormatError, match=r"hold 192 bytes but 512 codes at 2 bits need exactly 128"):
        unpack_tensor(parse_format("lut2g32"), (8, 64), {**three, "levels": three["levels"][:4]})


# ---- the k-means ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", LUT_BITS)
@pytest.mark.parametrize("per_row", [False, True])
def test_fitted_tables_are_sorted_int8(per_row, bits):
    fmt = LutFormat(32, per_row, bits=bits)
    levels = fit_levels(heavy_tailed(40, 256), fmt, torch.rand(256))
    assert levels.shape == ((40, 1 << bits) if per_row else (1 << bits,))
    assert torch.equal(levels, levels.round()) and levels.abs().max() <= LEVEL_MAX
    assert torch.equal(levels, levels.sort(dim=-1).values)


def test_per_row_tables_fitted_in_pieces_equal_the_whole(monkeypatch):
    """fit_levels fits per-row tables FIT_CHUNK weights at a time (an embedding's temporaries)."""
    from tightfit.formats import lut

    w, importance = heavy_tailed(50, 64), torch.rand(64)
    whole = fit_levels(w, LutFormat(32, True), importance)
    monkeypatch.setattr(lut, "FIT_CHUNK", 64 * 7)
    assert torch.equal(fit_levels(w, LutFormat(32, True), importance), whole)


@pytest.mark.parametrize("bits", LUT_BITS)
@pytest.mark.parametrize("seed", range(4))
def test_kmeans_never_increases_the_weighted_error_of_its_start(seed, bits):
    """lloyd_levels against its start (nl4; the normal quantiles at 3 and 2 bits), on the objective it
    minimizes (Hessian-diagonal-weighted squared error in level units), per table; and on heavy-tailed
    weights it lowers it."""
    g = torch.Generator().manual_seed(seed)
    x = heavy_tailed(16, 512, seed) * 40  # [R, M] in level units, some beyond the end levels
    kw = torch.rand(16, 512, generator=g) ** 2  # [R, M] H_jj s^2
    init = init_levels(bits).expand(16, -1)
    fitted = lloyd_levels(x, kw, init)
    before, after = table_error(x, kw, init), table_error(x, kw, fitted)
    assert (after <= before).all()
    # the 8 normal quantiles and the 2-bit start sit near a local optimum of these symmetric weights already
    assert after.sum() < (0.98 if bits == 4 else 0.999) * before.sum()
    assert not torch.equal(fitted, init)


@pytest.mark.parametrize("name, baseline", [("lut4g32", "nl4g32"), ("lut4g32-row", "nl4g32"), ("lut3g32", "w3g32"),
                                            ("lut3g64-row", "w3g64"), ("lut2g32", "w2g32"), ("lut2g32-row", "w2g32")])
def test_learned_tables_beat_fixed_grids_on_a_random_layer(name, baseline):
    """RTN in a fitted table has less importance-weighted error than RTN on nl4 (4 bits) or on the
    uniform asymmetric grid (3, 2 bits: more bytes, its zero points) at the same group size
    (heavy-tailed weights, the Hessian diagonal of correlated inputs as importance)."""
    w = heavy_tailed(128, 256, seed=3)
    x = torch.randn(1024, 256) * torch.rand(256).add(0.2)
    importance = (x * x).mean(0)  # [K] H_jj / 2
    err = lambda q: float(((q.dequantize() - w) ** 2 * importance).sum())  # noqa: E731
    assert err(quantize_rtn_any(w, parse_format(name))) < err(quantize_rtn_any(w, parse_format(baseline)))


# ---- GPTQ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lut4g32", "lut4g64-row", "lut3g32", "lut2g32-row"])
def test_gptq_with_a_learned_table(name):
    torch.manual_seed(0)
    fmt = parse_format(name)
    w = heavy_tailed(96, 128, seed=1)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(2048, 128)  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(w, h, fmt)
    q = result.quantized
    assert isinstance(q, LutTensor) and q.fmt == fmt
    assert torch.equal(q.levels, fit_levels(w, fmt, torch.diag(h)))  # fitted before GPTQ, deterministic
    out_err = lambda w_hat: float(((x @ (w - w_hat).T) ** 2).mean())  # noqa: E731
    assert out_err(q.dequantize()) < 0.8 * out_err(quantize_rtn_any(w, fmt).dequantize())
    fixed = parse_format(f"nl4g{fmt.group_size}" if fmt.bits == 4 else f"w{fmt.bits}g{fmt.group_size}")  # nl4, or uniform
    assert out_err(q.dequantize()) < out_err(gptq_quantize(w, h, fixed).quantized.dequantize())


@pytest.mark.parametrize("name", ["lut4g32", "lut4g32-row", "lut3g64-row", "lut2g32"])
def test_gptq_tiny_model_packs_and_reloads(name, tiny_model_dir, tiny_text_file, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    calib = calibrate_stage.calibrate(loaded.tokenizer, CalibrationConfig(text=str(tiny_text_file), n_samples=8,
                                                                          seq_len=64, batch_size=4))
    qmodel = quantize_stage.quantize_model(loaded, calib, QuantizeConfig(fmt=parse_format(name), method="gptq"),
                                           progress=False)
    out = pack_stage.write(pack_stage.pack(qmodel, loaded, calib.config), loaded.tokenizer, tmp_path / "packed")
    packed = load_packed(out)
    assert {q.fmt.name for q in packed.layers.values()} == {name}
    assert all(isinstance(q, LutTensor) for q in packed.layers.values())
    ids = torch.randint(4, 384, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = qmodel.module(input_ids=ids).logits
        b = build_model(packed)(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5


def test_grids_unchanged():
    """The fixed grids still decode through their own table (the shared primitives take a table)."""
    q = quantize_rtn_any(gaussian(16, 64), parse_format("nl4g32"))
    assert torch.equal(q.levels, torch.tensor(GRIDS["nl4"], dtype=torch.float32))


def test_formats_command_lists_learned_tables(capsys):
    from tightfit.cli import main

    assert main(["formats", "--shape", "576x1536"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("lut")}
    assert float(rows["lut4g32"][0]) == pytest.approx(LutFormat(32).bits_per_weight(576, 1536), abs=1e-3)
    assert int(rows["lut4g64-row"][1]) == LutFormat(64, True).nbytes(576, 1536).total
    assert int(rows["lut3g64"][1]) == LutFormat(64, bits=3).nbytes(576, 1536).total
    assert int(rows["lut2g32-row"][1]) == LutFormat(32, True, bits=2).nbytes(576, 1536).total
    assert {f.name for f in all_lut_formats() if f.scale_dtype == "fp16"} <= set(rows)

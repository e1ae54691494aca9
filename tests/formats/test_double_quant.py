"""Double-quantized scales (-dq, table.DoubleQuant and formats/double_quant.py): names, exact bytes,
storage round trips, the scale codes' error bound, and RTN / GPTQ landing on the super-scales' grid."""

import pytest
import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.algorithms.gptq import gptq_quantize
from tightfit.artifacts import parse_choice
from tightfit.errors import FormatError
from tightfit.formats.bitpack import pack_bits, packed_nbytes
from tightfit.formats.double_quant import choose_super_scales, scale_codes, snap_scales
from tightfit.formats.grid import GridFormat, all_grid_formats
from tightfit.formats.lut import LutFormat, all_lut_formats
from tightfit.formats.registry import parse_format, unpack_tensor
from tightfit.formats.table import DQ, QuantFormat, all_formats, with_dq

from test_formats_primitives import gaussian, one_thread  # noqa: F401  (one_thread: an autouse fixture)

DQ_FORMATS = with_dq(all_formats() + all_grid_formats() + all_lut_formats())


# ---- names and bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", DQ_FORMATS, ids=lambda f: f.name)
def test_names_round_trip(fmt):
    assert fmt.dq and fmt.name.endswith("-dq")
    assert parse_format(fmt.name) == fmt
    assert parse_format(f"  {fmt.name.upper()} ") == fmt
    assert parse_choice(fmt.name) == fmt
    assert type(fmt).from_json(fmt.to_json()) == fmt


def test_name_examples():
    assert parse_format("w3g16-dq") == QuantFormat(3, 16, dq=True)
    assert parse_format("w4g32-sym-dq") == QuantFormat(4, 32, symmetric=True, dq=True)
    assert parse_format("nl4g32-dq") == GridFormat("nl4", 32, dq=True)
    assert parse_format("lut4g64-row-dq") == LutFormat(64, per_row=True, dq=True)
    assert QuantFormat.from_json({k: v for k, v in QuantFormat(4, 32).to_json().items() if k != "dq"}) == QuantFormat(4, 32)


@pytest.mark.parametrize("text, match", [
    ("w4g32-dq-bf16", r"-dq .* takes no -bf16"),
    ("w4g32-bf16-dq", r"-dq .* takes no -bf16"),
    ("nl4g32-dq-bf16", r"-dq .* takes no -bf16"),
    ("lut4g32-row-bf16-dq", r"-dq .* takes no -bf16"),
    ("w4g32-dq-dq", r"a suffix repeats"),
    ("w4pc-dq", r"per-channel format has one scale per row"),
    ("nl4pc-dq", r"per-channel format has one scale per row"),
    ("w4g32-dq-sym", r"cannot parse quantization format"),
])
def test_bad_names_raise_one_line(text, match):
    with pytest.raises(FormatError, match=match) as info:
        parse_format(text)
    assert "\n" not in str(info.value)


def test_bad_fields_refused():
    with pytest.raises(FormatError, match="no bf16 scales"):
        QuantFormat(4, 32, scale_dtype="bf16", dq=True)
    with pytest.raises(FormatError, match="dq must be True or False"):
        GridFormat("nl4", 32, dq=1)


@pytest.mark.parametrize("name, n, k, supers", [
    ("w3g16-dq", 576, 1536, 6), ("w3g16-dq", 576, 576, 3), ("w3g32-dq", 1536, 576, 3),
    ("w4g32-sym-dq", 576, 1536, 6), ("w2g32-dq", 576, 600, 3), ("nl4g32-dq", 576, 1536, 6),
    ("w4g128-dq", 64, 200, 1), ("lut4g64-row-dq", 64, 1536, 6),
])
def test_nbytes_exact(name, n, k, supers):
    """Super-blocks of 256 weights along K (the last narrower); scales cost N*S*2 + ceil(N*G*6/8)
    instead of N*G*2; codes, zeros and tables are the base format's."""
    fmt = parse_format(name)
    base = parse_format(name.removesuffix("-dq"))
    g = base.num_groups(k)
    assert fmt.num_super_blocks(k) == supers == -(-g // (DQ.super_block // fmt.group_size))
    got, want = fmt.nbytes(n, k), base.nbytes(n, k)
    assert got.scales == n * supers * 2 + packed_nbytes(n * g, 6)
    assert (got.codes, got.zeros, got.levels) == (want.codes, want.zeros, want.levels)
    assert got.total == want.total - want.scales + got.scales


def test_bits_per_weight_saved():
    """g16: 1 bit of fp16 scale per weight becomes 6/16 + 16/256 = 0.4375; g32: 0.5 -> 0.25."""
    for name, saved in [("w3g16", 1.0 - 0.4375), ("w3g32", 0.25), ("w4g32-sym", 0.25), ("nl4g32", 0.25)]:
        base, dq = parse_format(name), parse_format(name + "-dq")
        assert base.bits_per_weight(576, 1536) - dq.bits_per_weight(576, 1536) == pytest.approx(saved)


# ---- primitives -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w3g16-dq", "nl4g32-dq"])
@pytest.mark.parametrize("rounding", ["nearest", "up"])
def test_scale_codes_error_bound(name, rounding):
    """Codes stay in range, the largest scale of each super-block gets the top code, and a snapped
    scale is within half a step d/2 of the scale (nearest) or not below it (up), up to fp16's rounding."""
    fmt = parse_format(name)
    k = 600  # a narrower last super-block
    g = fmt.num_groups(k)
    s = torch.rand(96, g, generator=torch.Generator().manual_seed(0)).add(0.02)  # [N, G]
    if fmt.signed_scales:
        s = s * torch.where(torch.rand(96, g) < 0.5, -1.0, 1.0)
    s = s.to(torch.float16).to(torch.float32)
    d = choose_super_scales(s, fmt, k)  # [N, S]
    top = DQ.code_max(fmt.signed_scales)
    c = scale_codes(s, d, fmt, k, rounding)
    assert int(c.abs().min()) >= 1 and int(c.abs().max()) == top
    per = d[:, fmt.super_block_of_groups(k)]  # [N, G]
    snapped = snap_scales(s, d, fmt, k, rounding)
    assert torch.equal(torch.sign(snapped), torch.sign(s))
    err = (snapped - s) * torch.sign(s)  # > 0: the scale grew
    fp16 = snapped.abs() * 2**-11
    if rounding == "nearest":
        assert bool((err.abs() <= per / 2 + fp16).all())
    else:
        assert bool((err >= -fp16).all()) and bool((err <= per + fp16).all())


def test_super_scale_covers_the_largest_scale():
    fmt = parse_format("w4g32-dq")
    s = torch.tensor([[1.0, 0.5, 63.0, 2.0, 1e-3, 0.3, 0.2, 0.1, 7.0]])  # 9 groups of 32: 2 super-blocks
    d = choose_super_scales(s, fmt, 288)
    assert d.shape == (1, 2) and float(d[0, 0]) == 1.0 and float(d[0, 1]) >= 7.0 / 63
    assert float(snap_scales(s, d, fmt, 288)[0, 4]) == float(d[0, 0])  # a tiny scale gets code 1, never 0


# ---- tensors: RTN, storage, GPTQ --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w3g16-dq", "w3g32-dq", "w4g32-sym-dq", "w2g32-dq", "nl4g32-dq", "nf4g64-dq",
                                  "lut4g32-dq", "lut4g32-row-dq", "w4g128-dq"])
def test_rtn_pack_unpack_round_trip(name):
    fmt = parse_format(name)
    n, k = 40, 600
    w = gaussian(n, k)
    q = quantize_rtn_any(w, fmt)
    assert q.super_scales.shape == (n, fmt.num_super_blocks(k))
    assert torch.equal(snap_scales(q.scales, q.super_scales, fmt, k), q.scales)  # on the grid
    parts = q.pack()
    assert {"super_scales", "scale_codes"} <= set(parts) and "scales" not in parts
    assert sum(t.numel() * t.element_size() for t in parts.values()) == fmt.nbytes(n, k).total
    back = unpack_tensor(fmt, (n, k), parts)
    assert torch.equal(back.scales, q.scales) and torch.equal(back.super_scales, q.super_scales)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(back.rows(slice(3, 9)).dequantize(), q.dequantize()[3:9])
    # the base format's error, up to the scales' 6-bit codes
    base = quantize_rtn_any(w, parse_format(name.removesuffix("-dq")))
    err, base_err = (q.dequantize() - w).square().mean(), (base.dequantize() - w).square().mean()
    assert err <= base_err * 1.1


def test_unpack_refuses_bad_storage():
    fmt = parse_format("nl4g32-dq")
    parts = quantize_rtn_any(gaussian(8, 256), fmt).pack()
    with pytest.raises(FormatError, match="super_scales must be torch.float16"):
        unpack_tensor(fmt, (8, 256), {**parts, "super_scales": parts["super_scales"].float()})
    with pytest.raises(FormatError, match="code beyond"):  # stored 0 is c = -32, outside -31..31
        unpack_tensor(fmt, (8, 256), {**parts, "scale_codes": torch.zeros_like(parts["scale_codes"])})
    with pytest.raises(FormatError, match="zero scale"):  # stored 32 is c = 0 (6-bit codes 100000 repeated)
        unpack_tensor(fmt, (8, 256), {**parts, "scale_codes": pack_bits(torch.full((8 * 8,), 32, dtype=torch.uint8), 6)})
    uniform = parse_format("w4g32-dq")
    uparts = quantize_rtn_any(gaussian(8, 256), uniform).pack()
    with pytest.raises(FormatError, match="zero scale"):
        unpack_tensor(uniform, (8, 256), {**uparts, "scale_codes": torch.zeros_like(uparts["scale_codes"])})
    with pytest.raises(FormatError, match="needs keys"):
        unpack_tensor(fmt, (8, 256), {k: v for k, v in parts.items() if k != "scale_codes"})


@pytest.mark.parametrize("name", ["w3g32-dq", "w4g32-sym-dq", "nl4g32-dq"])
def test_gptq_lands_on_the_super_scales(name):
    """GPTQ snaps each group's scale to its super-block's grid (fixed up front); its loss stays near
    the base format's."""
    fmt = parse_format(name)
    n, k = 32, 512
    w = gaussian(n, k, seed=1)
    x = gaussian(2048, k, seed=2) @ torch.eye(k).add(0.3 * gaussian(k, k, seed=3) / k**0.5)
    h = 2 * x.T @ x / x.shape[0]
    res, base = gptq_quantize(w, h, fmt), gptq_quantize(w, h, parse_format(name.removesuffix("-dq")))
    q = res.quantized
    assert torch.equal(snap_scales(q.scales, q.super_scales, fmt, k), q.scales)
    assert torch.equal(unpack_tensor(fmt, (n, k), q.pack()).dequantize(), q.dequantize())
    assert res.loss <= base.loss * 1.1


@pytest.mark.parametrize("name", ["w4g32-sym-dq", "w4g32-dq", "w3g16-dq"])
def test_exports_write_the_expanded_scales_exactly(name):
    """GGUF and compressed-tensors have no 6-bit scale codes: they write the expanded fp16 scales
    (the base format's bytes), exactly, as for the base format."""
    from tightfit.export.compressed_tensors import compress_layer, decompress_layer, scheme_of
    from tightfit.export.gguf import encode_layer

    q = quantize_rtn_any(gaussian(16, 256), parse_format(name))
    parts, _ = compress_layer(q)
    assert torch.equal(decompress_layer(parts, scheme_of(q)), q.dequantize())
    encoded = encode_layer(q)
    if q.fmt.group_size >= 32:
        assert encoded.exact
    else:  # as the base format: GGML's 32-blocks hold one scale
        assert "split GGML's 32-weight blocks" in encoded.note


def test_formats_command_lists_dq(capsys):
    from tightfit.cli import main

    assert main(["formats", "--shape", "576x1536"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if "-dq" in line}
    assert int(rows["w3g16-dq"][1]) == parse_format("w3g16-dq").nbytes(576, 1536).total
    assert float(rows["nl4g32-dq"][0]) == pytest.approx(4.25, abs=1e-3)
    assert "w4pc-dq" not in rows and not any(name.endswith("-bf16-dq") for name in rows)

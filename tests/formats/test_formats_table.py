"""The format table: names, parsing, JSON, and exact byte costs."""

import math

import pytest

from tightfit.errors import FormatError
from tightfit.formats import BITS, GROUP_SIZES, SCALE_DTYPES, LayerBytes, QuantFormat, all_formats


def test_table_enumerates_every_combination():
    formats = all_formats()
    assert len(formats) == len(BITS) * len(GROUP_SIZES) * 2 * len(SCALE_DTYPES)
    assert len({f.name for f in formats}) == len(formats)  # names are unique


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_name_round_trips_through_parse(fmt):
    assert QuantFormat.parse(fmt.name) == fmt
    assert QuantFormat.parse(f"  {fmt.name.upper()}\n") == fmt
    assert QuantFormat.from_json(fmt.to_json()) == fmt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("w3g64", QuantFormat(3, 64)),
        ("w4g128-sym", QuantFormat(4, 128, symmetric=True)),
        ("w8pc", QuantFormat(8, None)),
        ("w2g16-bf16", QuantFormat(2, 16, scale_dtype="bf16")),
        ("w4g32-sym-bf16", QuantFormat(4, 32, symmetric=True, scale_dtype="bf16")),
        (" W6PC-SYM ", QuantFormat(6, None, symmetric=True)),
    ],
)
def test_parse_examples(text, expected):
    assert QuantFormat.parse(text) == expected


def test_defaults_and_names():
    f = QuantFormat(4)
    assert (f.group_size, f.symmetric, f.scale_dtype) == (128, False, "fp16")
    assert f.name == "w4g128"
    assert QuantFormat(5, None, True, "bf16").name == "w5pc-sym-bf16"


@pytest.mark.parametrize(
    "text, match",
    [
        ("w7g64", r"bits 7 .*2, 3, 4, 5, 6, 8"),
        ("w3g48", r"group size 48"),
        ("q4", r"cannot parse .*'q4'.*w\{bits\}g\{group\}"),
        ("w3g64-foo", r"cannot parse .*w3g64-foo"),
        ("", r"cannot parse quantization format '': .*e\.g\. w3g64"),
        ("w4g128-bf16-sym", r"cannot parse"),  # suffixes in the wrong order
        ("w4", r"cannot parse"),
        ("w04g128", r"cannot parse"),
        ("w4g128-fp32", r"cannot parse"),
    ],
)
def test_bad_strings_raise(text, match):
    with pytest.raises(FormatError, match=match) as info:
        QuantFormat.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits 1"),
        ({"bits": 4.0}, "bits 4.0"),
        ({"bits": 4, "group_size": 256}, "group size 256"),
        ({"bits": 4, "group_size": 0}, "group size 0"),
        ({"bits": 4, "scale_dtype": "fp32"}, "scale dtype 'fp32'"),
        ({"bits": 4, "symmetric": 1}, "symmetric"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(FormatError, match=match):
        QuantFormat(**kwargs)


def test_from_json_rejects_bad_input():
    good = QuantFormat(3, 64).to_json()
    assert good["version"] == 1
    with pytest.raises(FormatError, match="version"):
        QuantFormat.from_json({**good, "version": 99})
    with pytest.raises(FormatError, match="unknown keys"):
        QuantFormat.from_json({**good, "outliers": 0.01})
    with pytest.raises(FormatError, match="bits 7"):
        QuantFormat.from_json({**good, "bits": 7})
    with pytest.raises(FormatError, match="lacks 'bits'"):
        QuantFormat.from_json({"version": 1})


def test_groups():
    assert QuantFormat(4, 64).num_groups(4096) == 64
    assert QuantFormat(4, 64).group_width(4096) == 64
    assert QuantFormat(4, None).num_groups(4096) == 1
    assert QuantFormat(4, None).group_width(4096) == 4096
    assert QuantFormat(4, 64).num_groups(100) == 2  # 64 + a narrower last group of 36
    assert QuantFormat(4, 128).group_bounds(576) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    with pytest.raises(FormatError, match="in_features"):
        QuantFormat(4, 64).num_groups(0)


def test_nbytes_by_hand():
    # w3g64 on [4096, 4096]: 3 bits of code + 16/64 bits of scale + 3/64 bits of zero per weight.
    b = QuantFormat.parse("w3g64").nbytes(4096, 4096)
    assert b == LayerBytes(codes=4096 * 4096 * 3 // 8, scales=4096 * 64 * 2, zeros=4096 * 64 * 3 // 8)
    assert b.total == 6291456 + 524288 + 98304
    assert QuantFormat.parse("w3g64").bits_per_weight(4096, 4096) == 3 + 16 / 64 + 3 / 64
    # Symmetric formats store no zeros.
    assert QuantFormat.parse("w4g128-sym").nbytes(8, 256) == LayerBytes(codes=8 * 256 // 2, scales=8 * 2 * 2, zeros=0)
    # Partial last bytes are counted: [3, 5] at 3 bits per channel -> ceil(15*3/8) code bytes, ceil(3*3/8) zero bytes.
    assert QuantFormat.parse("w3pc-bf16").nbytes(3, 5) == LayerBytes(codes=6, scales=6, zeros=2)


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f.name)
def test_bits_per_weight_matches_the_formula(fmt):
    n, k = 96, 1024
    g = 1 if fmt.group_size is None else k // fmt.group_size
    expected_bits = n * k * fmt.bits + n * g * 16 + (0 if fmt.symmetric else n * g * fmt.bits)
    assert fmt.nbytes(n, k).total == math.ceil(n * k * fmt.bits / 8) + n * g * 2 + (
        0 if fmt.symmetric else math.ceil(n * g * fmt.bits / 8)
    )
    assert fmt.bits_per_weight(n, k) == pytest.approx(expected_bits / (n * k), abs=16 / (n * k))

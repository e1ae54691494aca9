"""Every kernel against the dense reference on random shapes, native (AVX-512 VNNI where the CPU
has it) and portable (scalar) builds.

The kernel layout must decode to exactly the reference weights; a quantized matmul must equal
the dequantized weight times the int8 block-32 activations (what the kernels compute), up to fp32
summation order (SpQR: its dense part so, its outliers times the fp32 activations); dense fp16/fp32
kernels use exact activations.
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from tightfit.algorithms.builders import quantize_rtn_any
from tightfit.formats.primitives import quantize_rtn
from tightfit.formats.registry import parse_format
from tightfit.formats.spqr import SpQRTensor, StatCodes
from tightfit.formats.table import QuantFormat
from tightfit.runtime import kernels
from tightfit.runtime.kernels import build, layout

FORMATS = ["w2g64", "w2pc", "w3g32-sym", "w3g64", "w4g16", "w4g32", "w4g128-bf16", "w5pc", "w6g16", "w8g32-sym", "w8g128",
           "nl4g32", "nf4g16", "nl4pc", "nf4g128-bf16",  # uniform grids, and fixed non-uniform grids (a level table)
           "lut4g32", "lut4pc-bf16", "lut4g32-row", "lut4g16-row-bf16", "lut4pc-row",  # learned tables: per tensor, per row
           "lut3g64", "lut3g32-row", "lut3pc-bf16", "lut2g32", "lut2g16-row-bf16", "lut2pc-row"]  # 8- and 4-entry tables
SHAPES = [(37, 576), (16, 50), (8, 200), (5, 1536), (33, 20), (3, 8), (64, 64)]
BUILDS = [pytest.param(False, id="native"), pytest.param(True, id="portable"), pytest.param(kernels.AVX2, id="avx2")]


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("name", FORMATS)
def test_quantized_kernels_match_reference(name, portable):
    g = torch.Generator().manual_seed(hash(name) % 1000)
    for n, k in SHAPES:
        q = quantize_rtn_any(torch.randn(n, k, generator=g), parse_format(name))
        w = kernels.from_quantized(q, torch.randn(n, generator=g))
        assert torch.equal(kernels.dequantize(w, portable=portable), q.dequantize()), (n, k)
        for m in (1, 3, 6):
            x = torch.randn(m, k, generator=g) * 3
            xd = kernels.quantize_activations(x, portable=portable)
            ref = xd.double() @ q.dequantize().double().T + w.bias.double()
            y = kernels.matmul(w, x, threads=2, portable=portable)
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, (n, k, m)


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("name", ["w2g64", "w3g32-sym", "w4g16", "w5pc", "w8g128", "nl4g32", "nf4g16-bf16", "lut4g32",
                                  "lut4g64-row", "lut3g32", "lut3g64-row", "lut2g32", "lut2g32-row"])
def test_exact_mode_multiplies_fp32_activations(name, portable):
    g = torch.Generator().manual_seed(7)
    for n, k in SHAPES:
        q = quantize_rtn_any(torch.randn(n, k, generator=g), parse_format(name))
        w = kernels.from_quantized(q, torch.randn(n, generator=g))
        x = torch.randn(3, k, generator=g) * 3
        ref = x.double() @ q.dequantize().double().T + w.bias.double()
        y = kernels.matmul(w, x, threads=2, portable=portable, exact=True)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, (n, k)


@pytest.mark.parametrize("portable", BUILDS)
def test_activation_quantization_is_block_int8(portable):
    x = torch.randn(3, 100) * torch.logspace(-2, 2, 100)
    xd = kernels.quantize_activations(x, portable=portable)
    for b in range(0, 100, 32):
        blk, dq = x[:, b:b + 32], xd[:, b:b + 32]
        step = blk.abs().amax(dim=1, keepdim=True) / 127
        assert torch.allclose(dq / step, torch.round(dq / step), atol=1e-3)  # on the int8 grid of its block
        assert ((dq - blk).abs() <= step / 2 + 1e-6).all()  # nearest level


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dense_kernels_use_exact_activations(dtype, portable):
    g = torch.Generator().manual_seed(3)
    wt = torch.randn(33, 70, generator=g).to(dtype)
    w = kernels.from_dense(wt, torch.randn(33, generator=g))
    x = torch.randn(5, 70, generator=g)
    ref = x.double() @ wt.double().T + w.bias.double()
    assert (kernels.matmul(w, x, threads=2, portable=portable).double() - ref).abs().max() < 1e-4


def test_builds_report_their_instruction_set():
    assert kernels.has_avx512(portable=True) is False  # the portable build never uses AVX-512
    flags = build.cpu_fingerprint()
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")):
        assert kernels.has_avx512() and not kernels.has_avx2()
    # the AVX-512 tier compiled out: the AVX2 kernels wherever the CPU has AVX2, FMA and F16C
    assert not kernels.has_avx512(portable=kernels.AVX2) and not kernels.has_avx2(portable=True)
    assert kernels.has_avx2(portable=kernels.AVX2) == all(f in flags.split() for f in ("avx2", "fma", "f16c"))


def test_library_cache_is_keyed_by_every_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTFIT_CACHE", str(tmp_path / "cache"))
    first = build.build(build.PORTABLE_FLAGS)
    assert first.exists() and build.build(build.PORTABLE_FLAGS) == first  # second call: cached
    src = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    assert build.library_path(build.PORTABLE_FLAGS) == first  # the same sources elsewhere: the same library
    header = src / "matmul.h"  # included by engine.cpp, not compiled on its own
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.library_path(build.PORTABLE_FLAGS) != first  # any changed source rebuilds
    assert build.library_path(build.PORTABLE_FLAGS + ("-DTF_PREFETCH=512",)) != build.library_path(build.PORTABLE_FLAGS)


def test_variant_builds_load_through_the_same_path():
    """bench/kernel_ab.py's variants: compiled with extra macros, ABI-checked and declared like the default."""
    lib = build.load(portable=True, defines=("TF_PREFETCH=512",))
    assert lib is not build.load(portable=True) and lib.tf_time_matmul.restype is ctypes.c_double
    w = kernels.from_quantized(quantize_rtn(torch.randn(20, 64), QuantFormat.parse("w4g32")))
    x = torch.randn(3, 64)
    y = torch.empty(3, 20)
    lib.tf_matmul(ctypes.byref(w.struct()), x.data_ptr(), 3, y.data_ptr(), 1, 0)
    assert torch.equal(y, kernels.matmul(w, x, portable=True))  # the prefetch distance changes no result


def test_row_blocks_change_no_result():
    """quant_matmul_rows walks rows in blocks of TF_ROW_BLOCK_BYTES with the tokens inside: a build
    whose blocks are one tile (16 rows) gives bit for bit the default build's result, every kind of
    matrix (several blocks per thread here: 100 rows, 9 tokens, 2 threads)."""
    small = build.load(defines=("TF_ROW_BLOCK_BYTES=1",))
    g = torch.Generator().manual_seed(11)
    mats = [kernels.from_quantized(quantize_rtn_any(torch.randn(100, 200, generator=g), parse_format(name)),
                                   torch.randn(100, generator=g))
            for name in ("w3g64", "w4g16", "w8g32-sym", "nl4g32", "lut4g32-row", "lut2g32")]
    mats += [kernels.from_dense(torch.randn(100, 200, generator=g).to(dtype)) for dtype in (torch.float16, torch.float32)]
    mats.append(kernels.from_quantized(_spqr(SPQR_FORMATS[0], 100, 200, seed=0)))
    x = torch.randn(9, 200, generator=g)
    for w in mats:
        y = torch.empty(9, 100)
        small.tf_matmul(ctypes.byref(w.struct()), x.data_ptr(), 9, y.data_ptr(), 2, 0)
        assert torch.equal(y, kernels.matmul(w, x, threads=2)), w.kind


@pytest.mark.parametrize("name", ["w4g32", "w3g64-sym", "nl4g32", "lut4g32-row", "lut3g32-row"])
def test_layout_of_a_tall_matrix_is_the_same_in_pieces(name, monkeypatch):
    """from_quantized lays out PLANE_ROWS rows at a time (a 150k-row embedding's temporaries would
    be GBs): the pieces join into the layout of the whole, a partial last tile included."""
    q = quantize_rtn_any(torch.randn(100, 64, generator=torch.Generator().manual_seed(3)), parse_format(name))
    whole = kernels.from_quantized(q)
    monkeypatch.setattr(layout, "PLANE_ROWS", 32)
    pieces = kernels.from_quantized(q)
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(whole, field), getattr(pieces, field)), field


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_per_row_tables_decode_each_row_with_its_own_levels(bits):
    """Per-row tables in the kernel layout: row 16T + 4l + j reads register j, lane l of tile T
    (layout.h); every row given a table of its own (a shifted copy of one) decodes to its levels.
    2^bits < 16 levels fill the first entries of the same 16-byte tables."""
    from tightfit.formats.lut import LutFormat, LutTensor

    n, k, e = 37, 64, 1 << bits
    base = torch.linspace(-120, 105, e).round()  # [E] sorted
    levels = (base + torch.arange(n, dtype=torch.float32).unsqueeze(1) % 7).clamp(-127, 127)  # [N, E]
    codes = torch.randint(0, e, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    q = LutTensor(fmt=LutFormat(32, per_row=True, bits=bits), codes=codes, scales=torch.ones(n, 2), levels=levels)
    w = kernels.from_quantized(q)
    assert w.level_rows and w.levels.shape == (3, 4, 64) and w.bits == bits
    for portable in (False, True):
        assert torch.equal(kernels.dequantize(w, portable=portable), q.dequantize())


# ---- SpQR: quantized statistics decoded in the kernel, outliers (tile slices) added after the dense part ----

SPQR_FORMATS = ["spqr-w3g16-s3-o1.0", "spqr-w2g32-s3-o0.5", "spqr-w4g8-s2-o0.0", "spqr-w3g64-s4-o2.5", "spqr-w3g32-s3-o0.0"]
SPQR_SHAPES = [(37, 576), (16, 50), (5, 100), (33, 20), (3, 8), (64, 64), (50, 200)]  # N % 16 and K % group != 0


def _spqr(name: str, n: int, k: int, seed: int) -> SpQRTensor:
    """A random SpQR weight: random codes, statistics quantized at both levels, outliers at the
    format's cap in random places (the kernels do not care how a quantizer chose them)."""
    fmt, g = parse_format(name), torch.Generator().manual_seed(seed)
    groups, top = fmt.num_groups(k), (1 << fmt.bits) - 1
    codes = torch.randint(0, top + 1, (n, k), generator=g).to(torch.uint8)
    scale = StatCodes.of(0.01 + 0.1 * torch.rand(groups, n, generator=g), fmt.stat_bits)  # [G, N]
    zero = StatCodes.of(top * torch.rand(groups, n, generator=g), fmt.stat_bits)  # real-valued zeros
    where = torch.randperm(n * k, generator=g)[: fmt.max_outliers(n, k)].sort().values  # row-major: CSR order
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(where // k, minlength=n).cumsum(0)])
    values = torch.randn(where.numel(), generator=g).half().float()
    return SpQRTensor(fmt, codes, scale, zero, rowptr, where % k, values)


def _outliers(q) -> torch.Tensor:
    """R [N, K]: the sparse residuals as a dense matrix."""
    r = torch.zeros(q.shape)
    r[torch.repeat_interleave(torch.arange(q.shape[0]), q.rowptr.diff()), q.cols] = q.values
    return r


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("name", SPQR_FORMATS)
def test_spqr_kernels_match_reference(name, portable):
    """The layout decodes to exactly W_hat = (q - z) * s + R; the int8 kernel computes the dense part
    times the int8 block-32 activations plus R times the fp32 activations, at 1 and 3 threads."""
    g = torch.Generator().manual_seed(5)
    for i, (n, k) in enumerate(SPQR_SHAPES):
        q = _spqr(name, n, k, seed=i)
        assert q.n_outliers == q.fmt.max_outliers(n, k)
        w = kernels.from_quantized(q, torch.randn(n, generator=g))
        assert (w.outlier_tiles is None) == (q.n_outliers == 0)
        assert torch.equal(kernels.dequantize(w, portable=portable), q.dequantize()), (n, k)
        dense, r = q.dense().double(), _outliers(q).double()
        for m in (1, 3, 6):
            x = torch.randn(m, k, generator=g) * 3
            xd = kernels.quantize_activations(x, portable=portable)
            ref = xd.double() @ dense.T + x.double() @ r.T + w.bias.double()
            for threads in (1, 3):
                y = kernels.matmul(w, x, threads=threads, portable=portable)
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, (n, k, m, threads)
            exact = x.double() @ q.dequantize().double().T + w.bias.double()
            y = kernels.matmul(w, x, threads=2, portable=portable, exact=True)
            assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5, (n, k, m)


@pytest.mark.parametrize("simd", ["0", "1"])
def test_outlier_slices_sum_every_entry(simd):
    """add_outliers sums each tile's slices as 16-row vectors (TF_OUTLIER_SIMD=1, the vector builds; 0 the
    scalar loop): every variant adds exactly R x up to fp32 summation order, for rows of 0 to 40 entries
    (none, fewer or more than 8 in a tile, a last tile of 5 rows), 1 and 5 tokens, 2 threads."""
    lib = build.load(defines=(f"TF_OUTLIER_SIMD={simd}",))
    g = torch.Generator().manual_seed(13)
    n = 53
    q = _spqr("spqr-w3g32-s3-o0.0", n, 576, seed=4)
    counts = torch.tensor([(7 * i) % 41 for i in range(n)])
    counts[16:32] = 0  # a tile without outliers
    cols = torch.cat([torch.randperm(576, generator=g)[:c].sort().values for c in counts.tolist()])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    values = (torch.randn(cols.numel(), generator=g) * 4).half().float()
    q = SpQRTensor(q.fmt, q.codes, q.scale, q.zero, rowptr, cols, values)
    w = kernels.from_quantized(q, torch.randn(n, generator=g))
    dense, r = q.dense().double(), _outliers(q).double()
    for m in (1, 5):
        x = torch.randn(m, 576, generator=g) * 3
        ref = kernels.quantize_activations(x).double() @ dense.T + x.double() @ r.T + w.bias.double()
        y = torch.empty(m, n)
        lib.tf_matmul(ctypes.byref(w.struct()), x.data_ptr(), m, y.data_ptr(), 2, 0)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, (simd, m)


def test_outlier_slices_hold_each_rows_entries_in_order():
    """outlier_slices: slice k of a tile holds the k-th entry of each row with more than k, rows in
    order (masks), a tile as many slices as its fullest row has entries; nothing lost or added."""
    rowptr = torch.tensor([0, 2, 2, 5, 6] + [6] * 13 + [7])  # rows 0-3: 2, 0, 3, 1 entries; row 17: 1
    cols = torch.arange(7) * 10
    values = torch.arange(7, dtype=torch.float32)
    s = layout.outlier_slices(rowptr, cols, values)
    assert s["outlier_tiles"].tolist() == [0, 3, 4] and s["outlier_entries"].tolist() == [0, 6, 7]
    assert (s["outlier_masks"].to(torch.int32) & 0xFFFF).tolist() == [0b1101, 0b0101, 0b0100, 0b0010]
    # slice 0: rows 0, 2, 3 -> entries 0, 2, 5; slice 1: rows 0, 2 -> 1, 3; slice 2: row 2 -> 4; tile 1: 6
    assert s["outlier_values"].float().tolist() == [0, 2, 5, 1, 3, 4, 6]
    assert s["outlier_cols"].tolist() == [0, 20, 50, 10, 30, 40, 60]


@pytest.mark.parametrize("rows", [(0, 16), (16, 37), (32, 37), (0, 37)])
def test_spqr_layout_of_a_row_part_is_that_part(rows):
    """A fused projection's part (start on a 16-row statistics group) decodes to those rows, outliers included."""
    q = _spqr("spqr-w3g16-s3-o1.0", 37, 100, seed=1)
    w = layout.from_spqr(q, rows=rows)
    assert w.shape == (rows[1] - rows[0], 100)
    assert torch.equal(kernels.dequantize(w), q.dequantize()[rows[0]:rows[1]])
    assert not layout.spqr_rows_fit((8, 37)), "a part cut inside a statistics group has no SpQR layout"


def test_spqr_bytes_are_what_the_kernel_reads():
    """nbytes counts codes, the 24-byte statistics records and the outlier table: for 3-bit codes
    in groups of 32 below the uniform w3g32 layout (fp16 scale + u8 zero per row and group)."""
    q = _spqr("spqr-w3g32-s3-o0.5", 64, 576, seed=2)
    w = kernels.from_quantized(q)
    tiles, groups = 4, 18
    outliers = 2 * 4 * (tiles + 1) + 2 * w.outlier_masks.numel() + 4 * q.n_outliers  # tiles' firsts, masks, entries
    assert w.nbytes == tiles * (576 // 4) * 24 + tiles * groups * 24 + outliers
    uniform = kernels.from_quantized(quantize_rtn(torch.randn(64, 576), QuantFormat.parse("w3g32")))
    assert uniform.nbytes - w.nbytes + outliers == tiles * groups * (16 * 3 - 24)  # 48 vs 24 bytes

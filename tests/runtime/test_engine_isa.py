"""The kernels the tests exercise are the ones users run: where the CPU has AVX-512 VNNI, the native
build uses it, else where it has AVX2 (with FMA and F16C) the AVX2 tier, and the fast engine runs that
build (else the suite would pass on the portable path alone and the README's speed figures would go
unchecked). Skipped, and allowed to be in CI (tests/ci_skips.py), only on a CPU with neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from tightfit.formats.packed import load_packed
from tightfit.runtime.engine import FastBackend
from tightfit.runtime.kernels import build


def test_the_engine_runs_the_best_build_the_cpu_has(packed_llama: Path) -> None:
    flags = build.cpu_fingerprint().rpartition("|")[2].split()
    avx512 = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
    avx2 = all(f in flags for f in ("avx2", "fma", "f16c"))
    if not (avx512 or avx2):
        pytest.skip("this CPU has neither AVX-512 VNNI nor AVX2: only the portable kernels can be tested here")
    native, portable = build.load(portable=False), build.load(portable=True)
    assert native.tf_has_avx512() == int(avx512), "the native build's AVX-512 tier does not match the CPU"
    assert native.tf_has_avx2() == int(avx2 and not avx512), "the native build's AVX2 tier does not match the CPU"
    assert portable.tf_has_avx512() == 0 and portable.tf_has_avx2() == 0
    engine = FastBackend(load_packed(packed_llama), max_positions=8)
    # the engine, and test_kernels.py's "native" cases, run that build
    assert engine._lib._name == native._name == str(build.library_path(build.NATIVE_FLAGS))
    assert engine._lib.tf_has_avx512() == int(avx512)

"""The kernels the tests exercise are the ones users run: where the CPU has AVX-512 VNNI, the native
build uses it and the fast engine runs that build (else the suite would pass on the portable path
alone and the README's AVX-512 figures would go unchecked). Skipped, and allowed to be in CI
(tests/ci_skips.py), only on a CPU without AVX-512 VNNI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tightfit.formats.packed import load_packed
from tightfit.runtime.engine import FastBackend
from tightfit.runtime.kernels import build


def test_the_engine_runs_the_avx512_build_where_the_cpu_has_it(packed_llama: Path) -> None:
    flags = build.cpu_fingerprint().rpartition("|")[2].split()
    if "avx512_vnni" not in flags:
        pytest.skip("this CPU has no AVX-512 VNNI: only the portable kernels can be tested here")
    native = build.load(portable=False)
    assert native.tf_has_avx512() == 1, "the CPU has AVX-512 VNNI but the native build does not use it"
    assert build.load(portable=True).tf_has_avx512() == 0
    engine = FastBackend(load_packed(packed_llama), max_positions=8)
    # the engine, and test_kernels.py's "native" cases, run the AVX-512 build
    assert engine._lib._name == native._name == str(build.library_path(build.NATIVE_FLAGS))
    assert engine._lib.tf_has_avx512() == 1

"""A pytest plugin (loaded by tests/conftest.py): under CI=true (.ci/run) a skipped test fails unless
CI_ALLOWED_SKIPS lists it with the reason CI may skip it. A skip hides a missing package or missing
hardware, and with it the README claim the test checks (JSON-schema output needs xgrammar, the
llama.cpp round trip needs llama-cpp-python, the SIMD kernels need the CPU)."""

from __future__ import annotations

import os

import pytest

CI_ALLOWED_SKIPS = {
    "tests/runtime/test_engine_isa.py::test_the_engine_runs_the_best_build_the_cpu_has":
        "a runner with neither AVX-512 VNNI nor AVX2 has only the portable kernels to test (test_kernels.py runs them)",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.nodeid.split("[")[0] in CI_ALLOWED_SKIPS:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where a skip must be expected: {reason} "
                       "(tests/ci_skips.py CI_ALLOWED_SKIPS lists the expected ones, with why)")

"""Compile the C++ engine (engine.cpp) for this CPU on first use and load it with ctypes.

The shared library is built with the system C++ compiler (`$CXX`, else g++ / c++ / clang++) and
`-march=native`, so it uses the instruction sets this machine has (AVX-512 VNNI where present, a
portable scalar path otherwise). It is cached under `$TIGHTFIT_CACHE/kernels` (default
`~/.cache/tightfit/kernels`) keyed by the source, the flags, the compiler and the CPU, so a new
kernel or another machine rebuilds and a second run loads instantly. Builds are atomic: the
library is compiled to a temporary name and renamed into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from tightfit.errors import KernelUnavailable

SOURCE = Path(__file__).with_name("engine.cpp")
ABI_VERSION = 4  # must equal TF_ABI_VERSION in engine.cpp
NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
PORTABLE_FLAGS = ("-O3", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def cache_dir() -> Path:
    root = os.environ.get("TIGHTFIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tightfit") / "kernels"


def cpu_fingerprint() -> str:
    """CPU model name and instruction-set flags (Linux /proc/cpuinfo; else the platform string)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags") and key not in fields:
            fields[key] = value.strip()
    return f"{fields.get('model name', '?')}|{fields.get('flags', '?')}"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C++ compiler found (install g++, or set CXX); the fast engine needs one once to build its kernels")


def build(flags: tuple[str, ...] = NATIVE_FLAGS) -> Path:
    """Path of the compiled library for these flags, compiling it if it is not cached."""
    cxx = _compiler()
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), cxx.encode(), cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"libtightfit-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise KernelUnavailable(f"compiling the tightfit kernels with {cxx} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=None)
def load(portable: bool = False) -> ctypes.CDLL:
    """The kernel library (native build, or the portable scalar build for tests), ready to call."""
    lib = ctypes.CDLL(str(build(PORTABLE_FLAGS if portable else NATIVE_FLAGS)))
    if lib.tf_abi_version() != ABI_VERSION:
        raise KernelUnavailable(f"kernel library ABI {lib.tf_abi_version()} != {ABI_VERSION}; delete {cache_dir()}")
    declare(lib)
    return lib


def declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every exported function (mirrors engine.cpp's extern "C" part)."""
    from tightfit.runtime.kernels.layout import TfMat

    mat, ptr, i32, f64 = ctypes.POINTER(TfMat), ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.tf_matmul.argtypes = [mat, ptr, i32, ptr, i32, i32]
    lib.tf_time_matmul.argtypes = [mat, i32, ptr, i32, ptr, i32, i32]
    lib.tf_time_matmul.restype = f64
    lib.tf_dequant_rows.argtypes = [mat, i32, i32, ptr]
    lib.tf_quantize_activations.argtypes = [ptr, i32, i32, ptr]
    lib.tf_read_seconds.argtypes = [ptr, ctypes.c_size_t, i32, i32]
    lib.tf_read_seconds.restype = f64
    lib.tf_engine_create.argtypes = [ptr]
    lib.tf_engine_create.restype = ptr
    lib.tf_engine_free.argtypes = [ptr]
    lib.tf_engine_forward.argtypes = [ptr, ctypes.POINTER(ctypes.c_int32), i32, i32, ptr, i32]
    lib.tf_engine_profile.argtypes = [ptr, ptr]

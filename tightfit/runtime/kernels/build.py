"""Compile the C++ engine for this CPU on first use and load it with ctypes.

The engine is one translation unit, engine.cpp, which includes the other sources here (*.h; see
its header). The shared library is built with the system C++ compiler (`$CXX`, else g++ / c++ /
clang++) and `-march=native`, so it uses the instruction sets this machine has (AVX-512 VNNI where
present, else AVX2 with FMA and F16C, else a portable scalar path). It is cached under
`$TIGHTFIT_CACHE/kernels` (default `~/.cache/tightfit/kernels`) keyed by every source file, the flags
(variant macros included), the compiler and the CPU, so a new kernel or another machine rebuilds and a
second run loads instantly. Builds are atomic: the library is compiled to a temporary name and renamed into place.
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

SOURCE_DIR = Path(__file__).parent
MAIN_SOURCE = "engine.cpp"  # the one translation unit; it includes the *.h sources
ABI_VERSION = 13  # must equal TF_ABI_VERSION in common.h
NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
PORTABLE_FLAGS = ("-O3", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def sources() -> list[Path]:
    """Every engine source file (engine.cpp and the headers it includes), sorted by name."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h"))


def source_hash() -> str:
    """sha256 over every engine source file, names and contents: identifies the kernels' version."""
    h = hashlib.sha256()
    for path in sources():
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


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


def library_path(flags: tuple[str, ...] = NATIVE_FLAGS) -> Path:
    """Where the library for these flags is cached, named by a hash of every source, the flags, the
    compiler and the CPU."""
    key = hashlib.sha256(
        b"\0".join([source_hash().encode(), " ".join(flags).encode(), _compiler().encode(), cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    return cache_dir() / f"libtightfit-{key}.so"


def build(flags: tuple[str, ...] = NATIVE_FLAGS) -> Path:
    """Path of the compiled library for these flags, compiling it if it is not cached."""
    target = library_path(flags)
    if target.exists():
        return target
    cxx = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE_DIR / MAIN_SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise KernelUnavailable(f"compiling the tightfit kernels with {cxx} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# The build for this CPU with its AVX-512 tier compiled out: the AVX2 kernels that CPUs without AVX-512
# run (load(AVX2): their tests on machines that have AVX-512).
AVX2 = "avx2"


@lru_cache(maxsize=None)
def load(portable: bool | str = False, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernel library (native build, the portable scalar build, or AVX2 for tests), ready to call.

    defines: NAME=VALUE macros for a build variant (the TF_* tuning knobs in tuning.h and outliers.h; used by
    bench/kernel_ab.py); each variant is a library of its own in the cache.
    """
    if portable == AVX2:
        portable, defines = False, ("TF_NO_AVX512=1", *defines)
    flags = (PORTABLE_FLAGS if portable else NATIVE_FLAGS) + tuple(f"-D{d}" for d in defines)
    lib = ctypes.CDLL(str(build(flags)))
    if lib.tf_abi_version() != ABI_VERSION:
        raise KernelUnavailable(f"kernel library ABI {lib.tf_abi_version()} != {ABI_VERSION}; delete {cache_dir()}")
    declare(lib)
    return lib


def declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every exported function (mirrors the engine's extern "C" functions)."""
    from tightfit.runtime.kernels.layout import TfMat

    mat, ptr, i32, f64 = ctypes.POINTER(TfMat), ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.tf_matmul.argtypes = [mat, ptr, i32, ptr, i32, i32]
    lib.tf_time_matmul.argtypes = [mat, i32, ptr, i32, ptr, i32, i32]
    lib.tf_time_matmul.restype = f64
    lib.tf_dequant_rows.argtypes = [mat, i32, i32, ptr]
    lib.tf_quantize_activations.argtypes = [ptr, i32, i32, ptr]
    lib.tf_read_seconds.argtypes = [ptr, ctypes.c_size_t, i32, i32]
    lib.tf_read_seconds.restype = f64
    lib.tf_has_avx2.restype = ctypes.c_int
    lib.tf_engine_create.argtypes = [ptr, ctypes.POINTER(ptr)]
    lib.tf_engine_create.restype = i32
    lib.tf_max_head_dim.restype = i32
    lib.tf_engine_free.argtypes = [ptr]
    lib.tf_engine_forward.argtypes = [ptr, ctypes.POINTER(ctypes.c_int32), i32, i32, ptr, i32]
    lib.tf_engine_profile.argtypes = [ptr, ptr]
    lib.tf_engine_kv_bytes.argtypes = [ptr]
    lib.tf_engine_kv_bytes.restype = ctypes.c_size_t
    lib.tf_engine_kv_bytes_per_token.argtypes = [ptr]
    lib.tf_engine_kv_bytes_per_token.restype = ctypes.c_size_t
    lib.tf_kv_attend.argtypes = [i32, i32, i32, i32, ptr, ptr, ptr, ctypes.c_float, ptr]
    lib.tf_time_kv_attend.argtypes = [i32, i32, i32, i32, i32, ptr, ptr, ptr, ctypes.c_float, i32, ctypes.c_size_t, ptr]
    lib.tf_time_kv_attend.restype = f64
    lib.tf_kv_attend.restype = i32


if __name__ == "__main__":  # `PYTHONPATH=. python tightfit/runtime/kernels/build.py`: the native build, no torch needed
    import sys

    try:
        print(build())
    except KernelUnavailable as e:
        sys.exit(f"tightfit kernels: {e}")

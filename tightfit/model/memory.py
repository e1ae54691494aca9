"""How much memory a load may still take: /proc/meminfo's MemAvailable, capped by the cgroup's limit.

A model loaded whole into fp32 that does not fit is killed by the kernel's OOM killer without a
message; checking first turns that into one line saying what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_GB = 1e9
# (limit, usage) file names: cgroup v2, then v1
_CGROUP_FILES = (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes this process may still allocate, and where the bound comes from.

    Fields:
        available: the smallest of the bounds found (None: no bound could be read, e.g. not Linux).
        detail: the bounds, for messages, e.g. "MemAvailable 5.2 GB, cgroup memory.max 8.0 GB with 6.1 GB used".
    """

    available: int | None
    detail: str


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    """An integer file of the cgroup tree; None when absent or "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit(proc_cgroup: Path, root: Path) -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup (v2 memory.max, else v1), None when unlimited."""
    folders: list[Path] = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, relative = line.split(":", 2)
            if hierarchy == "0":  # v2: one unified tree
                folders.append(root / relative.lstrip("/"))
            elif "memory" in controllers.split(","):  # v1: the memory controller's own tree
                folders.append(root / "memory" / relative.lstrip("/"))
    except (OSError, ValueError):
        pass
    folders += [root, root / "memory"]  # in a container the process's cgroup is mounted as the root
    for folder in folders:
        for limit_file, usage_file in _CGROUP_FILES:
            limit = _read_int(folder / limit_file)
            # cgroup v1 writes "no limit" as a number near 2**63
            if limit is not None and limit < 1 << 60:
                return limit, _read_int(folder / usage_file) or 0
    return None


def memory_budget(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                  cgroup_root: Path = _CGROUP_ROOT) -> MemoryBudget:
    """The memory this process may still allocate (the paths are parameters for tests)."""
    bounds: list[int] = []
    details: list[str] = []
    available = _meminfo_available(meminfo)
    if available is not None:
        bounds.append(available)
        details.append(f"MemAvailable {available / _GB:.1f} GB")
    cgroup = _cgroup_limit(proc_cgroup, cgroup_root)
    if cgroup is not None:
        limit, usage = cgroup
        bounds.append(max(0, limit - usage))
        details.append(f"cgroup limit {limit / _GB:.1f} GB with {usage / _GB:.1f} GB used")
    return MemoryBudget(available=min(bounds) if bounds else None, detail=", ".join(details) or "unknown")


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Tensors under 32 MB come from the heap, and after thousands of them (a big model's layers,
    quantized, packed and unpacked) the freed space stays in this process's RSS; a stage that
    drops its big objects calls this before the next one grows."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)

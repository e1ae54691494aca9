"""One matrix, several formats and kernel builds: decode time of a single linear layer (one token,
x [1, K] times W^T), for comparing formats of equal bytes or build variants without the rest of a
model's decode around them.

    .venv/bin/python bench/matrix_ab.py --layer model.layers.3.mlp.gate_proj PACKED_DIR [PACKED_DIR ...] \\
        [--variant "" --variant TF_OUTLIER_SIMD=0] [--no-outliers] [--rounds 15] [--reps 500] [--threads 1]

Each packed folder's layer is taken into kernel layout as the engine loads it
(`layout.from_quantized`); each variant's kernel library is built (or found in the build cache)
and loaded by `build.load(defines=...)`, as bench/kernel_ab.py does. One timing = `reps`
back-to-back calls inside the library (`kernels.time_matmul`); every (folder, variant) pair is timed
once per round, round-robin, so that this shared machine's drifts hit all of them alike, and the
first round warms up. --no-outliers adds each SpQR layer again without its outlier table (the cost
of the outliers = with minus without). Prints best and median ns per call and ns per weight, and
each pair's best as a share of the first pair's; writes nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import load_variants  # noqa: E402

from tightfit.formats.packed import load_packed  # noqa: E402
from tightfit.runtime.kernels import KernelMatrix, from_quantized, time_matmul  # noqa: E402

OUTLIER_FIELDS = ("outlier_tiles", "outlier_entries", "outlier_masks", "outlier_cols", "outlier_values")


def matrices(folders: list[str], layer: str, no_outliers: bool) -> dict[str, KernelMatrix]:
    """label -> the layer of each folder in kernel layout (label: the layer's format), and with
    no_outliers each SpQR layer again without its outliers (label + '/no-outliers')."""
    out: dict[str, KernelMatrix] = {}
    for folder in folders:
        packed = load_packed(Path(folder))
        if layer not in packed.layers:
            sys.exit(f"matrix_ab: {folder} has no layer {layer!r} (e.g. {next(iter(packed.layers))})")
        q = packed.layers[layer]
        label = q.fmt.name if q.fmt.name not in out else f"{q.fmt.name} ({folder})"
        out[label] = from_quantized(q)
        if no_outliers and out[label].outlier_tiles is not None:
            out[f"{label}/no-outliers"] = dataclasses.replace(out[label], **{f: None for f in OUTLIER_FIELDS})
    return out


def time_pairs(mats: dict[str, KernelMatrix], libs: dict[str, ctypes.CDLL], rounds: int, reps: int,
               threads: int) -> dict[tuple[str, str], list[float]]:
    """(matrix label, variant) -> seconds per call of each round after the first, round-robin."""
    out: dict[tuple[str, str], list[float]] = {(a, v): [] for a in mats for v in libs}
    for rnd in range(rounds):
        for label, m in mats.items():
            for v, lib in libs.items():
                s = time_matmul(m, 1, threads=threads, reps=reps, lib=lib)
                if rnd:
                    out[(label, v)].append(s)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="PACKED_DIR", help="packed tightfit folders (one format each, or plans)")
    ap.add_argument("--layer", default="model.layers.3.mlp.gate_proj", help="the linear layer timed in every folder")
    ap.add_argument("--variant", action="append", help='a kernel build: `+`-joined NAME=VALUE macros; "" (the default '
                                                       'build) when none is given; repeatable')
    ap.add_argument("--no-outliers", action="store_true", help="also time each SpQR layer without its outliers")
    ap.add_argument("--rounds", type=int, default=15, help="round-robin rounds; the first warms up")
    ap.add_argument("--reps", type=int, default=500, help="back-to-back calls per timing")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.reps < 1 or args.threads < 1:
        ap.error("--rounds must be at least 2 (the first warms up), --reps and --threads at least 1")
    for f in args.folders:
        if not (Path(f) / "manifest.json").is_file():
            sys.exit(f"matrix_ab: {f} is not a packed tightfit folder")
    mats = matrices(args.folders, args.layer, args.no_outliers)
    libs = load_variants(args.variant or [""])
    runs = time_pairs(mats, libs, args.rounds, args.reps, args.threads)
    first = min(next(iter(runs.values())))
    n, k = next(iter(mats.values())).shape
    print(f"{args.layer} [{n}, {k}], 1 token, {args.threads} thread(s), {args.rounds - 1} rounds of {args.reps} calls")
    for (label, v), secs in runs.items():
        best, weights = min(secs), mats[label].shape[0] * mats[label].shape[1]
        print(f"{label:34s} {v or '(default)':22s} best {best * 1e9:9.0f} ns  median {statistics.median(secs) * 1e9:9.0f} ns  "
              f"{best * 1e9 / weights:6.4f} ns/weight  {100 * first / best:5.1f} % of the first's speed")


if __name__ == "__main__":
    main()

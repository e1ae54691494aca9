"""Decode attention over one KV head's cache, per KV width, with and without grouped-query attention.

For each context length and KV width (16, 8, 4 bits) the engine's cache of one KV head holds that
many positions of random keys and values, and the rep query heads that share it attend over all of
them, timed inside the library (tightfit.runtime.kernels.time_kv_attend, one thread): each head
alone (group 1, how decode attention read the cache before grouping) and all rep heads together
(the engine's decode now). The shapes default to Qwen2 1.5B's (head_dim 128, 12 query heads over 2
KV heads: rep 6). Prints the median of `--rounds` timings, microseconds per KV head and decoded
token, and the speedup; writes nothing. Indicative only on a shared machine. One head's cache may
sit in the CPU's caches, where a whole model's (28 layers x 2 KV heads on the 1.5B) streams from
memory: `--stream-mib 96` cycles through copies that large together.

    .venv/bin/python bench/kv_attention.py --positions 512 2048 4096 --rounds 5 --stream-mib 96
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tightfit.runtime.kernels import time_kv_attend


def median_seconds(bits: int, n: int, d: int, rep: int, group: int, rounds: int, min_bytes: int) -> float:
    """Median over `rounds` timings of one KV head's decode attention (n positions, rep query heads in
    groups of `group`, copies of the cache up to min_bytes)."""
    g = torch.Generator().manual_seed(n)
    keys, values, q = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(rep, d, generator=g)
    reps = max(3, 200_000 // n)  # about 50 ms per timing at 4096 positions
    return statistics.median(time_kv_attend(bits, keys, values, q, d**-0.5, group=group, reps=reps, min_bytes=min_bytes)
                             for _ in range(rounds))


def main(positions: list[int], d: int, rep: int, rounds: int, stream_mib: int) -> None:
    where = f"caches streamed from {stream_mib} MiB of copies" if stream_mib else "one cache, which may stay in the CPU's caches"
    print(f"head_dim {d}, {rep} query heads per KV head, {where}; us per KV head and token (median of {rounds})")
    for n in positions:
        cells = []
        for bits in (16, 8, 4):
            alone, grouped = (median_seconds(bits, n, d, rep, group, rounds, stream_mib << 20) for group in (1, min(rep, 8)))
            cells.append(f"kv{bits:<2d} {alone * 1e6:7.1f} -> {grouped * 1e6:6.1f} ({alone / grouped:.2f}x)")
        print(f"{n:5d} positions  " + "   ".join(cells))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep", type=int, default=6, help="query heads per KV head")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stream-mib", type=int, default=0,
                    help="cycle through copies of the cache this large together (beyond the last-level cache: read from memory)")
    args = ap.parse_args()
    main(args.positions, args.head_dim, args.rep, args.rounds, args.stream_mib)

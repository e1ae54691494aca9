"""Blocks in forked worker processes: the stages whose blocks are independent (the sensitivity
sweep; GPTQ from the original model's Hessians) run them one per CPU.

Why processes: GPTQ's time is its column loop, Python and small tensor operations that a second
thread inside torch does not speed up (smollm2-135m's block swept in 9 formats: 8.7 s with one
thread, 9.0 s with two), while two processes on two cores do two blocks in the time of 1.25. The
workers are forked, so the model, Hessians and statistics are shared, not copied or pickled, and
take one thread each; what they return is pickled back.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def worker_count() -> int:
    """Worker processes a stage may use: the threads torch is given (--threads), at most the CPUs this
    process may run on."""
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))))


_FORKED: Callable | None = None  # the function forked workers run: set in the parent before the fork


def _run_forked(item):
    assert _FORKED is not None
    return _FORKED(item)


def fork_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, desc: str, progress: bool, unit: str = "block") -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for every item, in the order they finish, computed by `workers` forked
    processes of one thread each (in this process, in order, when workers < 2, when there is one
    item, or where fork does not exist). fn's result must pickle; an exception in fn is raised here."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress or not items)
    try:
        if workers < 2 or len(items) < 2 or "fork" not in multiprocessing.get_all_start_methods():
            for item in items:
                yield item, fn(item)
                bar.update()
            return
        global _FORKED
        _FORKED = fn
        try:
            with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("fork"),
                                     initializer=torch.set_num_threads, initargs=(1,)) as pool:
                futures = {pool.submit(_run_forked, item): item for item in items}
                try:
                    for done in as_completed(futures):
                        yield futures[done], done.result()
                        bar.update()
                except BaseException:
                    for f in futures:  # nothing more to wait for: the pool's exit waits only on running ones
                        f.cancel()
                    raise
        finally:
            _FORKED = None
    finally:
        bar.close()

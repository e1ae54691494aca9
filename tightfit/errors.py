"""Errors a user can cause. The CLI prints their message on one line and exits non-zero.

Every message must say what was wrong and, where possible, what would be right.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


class TightfitError(Exception):
    """Base of every error caused by input (files, flags, budgets), not by a bug."""


class FormatError(TightfitError):
    """A quantization format string or table entry is invalid."""


class ModelSourceError(TightfitError):
    """A model path or name cannot be resolved or read."""


class UnsupportedArchitecture(TightfitError):
    """The model's architecture is not in the architecture table."""


class TextSourceError(TightfitError):
    """A text source is missing, unreadable, or too short for the request."""


class PackedModelError(TightfitError):
    """A packed model on disk is missing, truncated, corrupted, or of an unknown version."""


class InfeasibleBudget(TightfitError):
    """No assignment of formats to layers meets the budget; the message names the smallest one that can."""


class ExportError(TightfitError):
    """A packed model cannot be written in the requested foreign format (GGUF, compressed-tensors), or the output path is unusable."""


class GenerationError(TightfitError, ValueError):
    """A generation request is invalid: sampling settings, an empty or too long prompt, a cache size."""


class KernelUnavailable(TightfitError):
    """The fast CPU engine cannot run here: no compiler, a failed build, or an unsupported model."""


class QuantizedSourceWarning(UserWarning):
    """The input model is already quantized (e.g. a Q4_1 GGUF): compressing it again adds a second rounding error."""


class InsufficientMemory(TightfitError):
    """Too little free memory for the request (e.g. a whole model in fp32); the message says what would fit."""


@contextmanager
def native_stderr_held() -> Iterator[None]:
    """Hold what is written to file descriptor 2 meanwhile (e.g. a Rust library's panic message, which
    no Python code can silence): written out after the block if it succeeds, dropped if it raises,
    whose error then becomes the one line the user sees."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", errors="replace"))
                sys.stderr.flush()


class CorruptCacheError(TightfitError):
    """A saved intermediate result (a block checkpoint; cached Hessians, Fisher statistics, sensitivities
    or timings) is missing a part, unreadable, or fails its checksum. Callers recompute it (CorruptCacheWarning)."""


class CorruptCacheWarning(UserWarning):
    """A corrupt intermediate result was thrown away and is computed again."""

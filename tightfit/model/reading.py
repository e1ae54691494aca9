"""Calling transformers on model files: quietly, and with its exceptions turned into one-line errors."""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tightfit.errors import ModelSourceError


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and progress bars for the duration, then restore them.

    The GGUF dequantization loop uses its own `tqdm.auto.tqdm`, which ignores
    `disable_progress_bar()`; its module-level name is swapped for a disabled one meanwhile.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_errors() -> tuple[type[BaseException], ...]:
    """What transformers, gguf and safetensors raise on unreadable files (truncated, corrupt, invalid JSON;
    NotImplementedError: a GGML type gguf cannot dequantize)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, IndexError, KeyError, struct.error, SafetensorError, NotImplementedError)


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn the libraries' exceptions for an unreadable `what` of `path` into one-line ModelSourceErrors."""
    try:
        yield
    except _read_errors() as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ModelSourceError(f"cannot read the {what} of {path}: {detail}") from e

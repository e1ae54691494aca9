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
    NotImplementedError: a GGML type gguf cannot dequantize; TypeError and huggingface_hub's
    StrictDataclassError: a config value of the wrong type; ArithmeticError, AssertionError,
    AttributeError, RuntimeError: a model transformers cannot build from the config, or whose tensors
    do not fit it)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, IndexError, KeyError, TypeError, ArithmeticError, AssertionError, AttributeError,
            RuntimeError, struct.error, SafetensorError, StrictDataclassError)


@contextmanager
def reading(path: Path, what: str, *, any_exception: bool = False) -> Iterator[None]:
    """Turn the libraries' exceptions for an unreadable `what` of `path` into one-line ModelSourceErrors.

    any_exception: for a parser that raises plain Exception on bad input, or even pyo3's PanicException
    (a BaseException) when its Rust code panics: the `tokenizers` library.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        if not (any_exception or isinstance(e, _read_errors())):
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ModelSourceError(f"cannot read the {what} of {path}: {detail}") from e

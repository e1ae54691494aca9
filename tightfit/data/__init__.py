"""Text sources (calibration and evaluation text) and calibration mixes of them."""

from tightfit.data.mix import MixPart, TextMix, apportion, interleave, parse_mix
from tightfit.data.text import (
    BUILTIN_TEXTS,
    DEFAULT_TEXT,
    SELF_TEXT,
    TextCorpus,
    load_text,
    split_documents,
    split_groups,
    stream_windows,
    token_windows,
    window_body,
)

__all__ = [
    "BUILTIN_TEXTS", "DEFAULT_TEXT", "MixPart", "SELF_TEXT", "TextCorpus", "TextMix", "apportion", "interleave",
    "load_text", "parse_mix", "split_documents", "split_groups", "stream_windows", "token_windows", "window_body",
]

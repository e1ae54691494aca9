"""Text sources (calibration and evaluation text)."""

from tightfit.data.text import DEFAULT_TEXT, TextCorpus, load_text, split_documents, token_windows

__all__ = ["DEFAULT_TEXT", "TextCorpus", "load_text", "split_documents", "token_windows"]

"""Errors a user can cause. The CLI prints their message on one line and exits non-zero.

Every message must say what was wrong and, where possible, what would be right.
"""


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

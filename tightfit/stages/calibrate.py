"""Calibrate stage: fixed calibration windows from the calibration part of a text source."""

from __future__ import annotations

from tightfit.artifacts import CalibrationConfig, CalibrationSet
from tightfit.data import load_text, token_windows


def calibrate(tokenizer, config: CalibrationConfig) -> CalibrationSet:
    """config.n_samples windows of config.seq_len tokens -> CalibrationSet (tokens [S, T])."""
    corpus = load_text(config.text)
    tokens = token_windows(tokenizer, corpus, "calibration", config.n_samples, config.seq_len)
    return CalibrationSet(config=config, tokens=tokens)

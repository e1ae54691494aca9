"""Calibrate stage: fixed calibration windows from the calibration part of a text source (or a
mix of sources, data/mix.py), and statistics of the original model on them:

    windows   `calibrate`: the windows (CalibrationSet), held-back windows, `self` text sampled
              from the model
    hessians  H = 2/T X^T X of every linear layer's inputs (one forward pass, block by block),
              saved in one file or, for a streamed model, one file per block (`HessianFiles`)
    fisher    the diagonal Fisher information of every linear layer's outputs, of the embeddings
              and of the logits (one forward and backward per window; `FisherSet`)
    cache     the checked read of a cached statistics file, keyed by the source model and the
              calibration

Both statistics are cached in a work folder with the sha256 of their contents; a corrupt cache is
collected again.
"""

from tightfit.artifacts import CalibrationSet
from tightfit.stages.calibrate.fisher import collect_fisher, load_fisher, save_fisher
from tightfit.stages.calibrate.hessians import (
    HESSIAN_FILES_META,
    HessianFiles,
    collect_hessians,
    load_hessian_files,
    load_hessians,
    save_hessians,
)
from tightfit.stages.calibrate.windows import (
    SELF_FILE,
    SELF_NEW_TOKENS,
    SELF_PROMPTS,
    SELF_SEED,
    SELF_VERSION,
    calibrate,
    calibrate_with_held_back,
    sample_self_text,
)

__all__ = [
    "HESSIAN_FILES_META", "SELF_FILE", "SELF_NEW_TOKENS", "SELF_PROMPTS", "SELF_SEED", "SELF_VERSION", "CalibrationSet",
    "HessianFiles", "calibrate", "calibrate_with_held_back", "collect_fisher", "collect_hessians", "load_fisher",
    "load_hessian_files", "load_hessians", "sample_self_text", "save_fisher", "save_hessians",
]

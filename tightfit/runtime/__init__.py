"""Run packed models. Needs only formats/ and the packed model, never calibration or solver code."""

from tightfit.runtime.model import QuantLinear, build_model, load_runtime

__all__ = ["QuantLinear", "build_model", "load_runtime"]

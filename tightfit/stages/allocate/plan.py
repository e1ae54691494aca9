"""The allocate stage's typed artifacts: a candidate per (layer, format), the budget, the plan, and their JSON.

The layers of a plan are the linear layers of the decoder blocks, and the token embeddings and an
untied head (one layer when tied); a candidate is a format, or fp16 (left unquantized). Sizes are
exact bytes (`fmt.nbytes(out, in).total`, every overhead counted); a bits/weight limit becomes a
byte limit by `_bpw_to_bytes`, read as the decimal it was written as.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from tightfit.artifacts import Choice, Unquantized, parse_choice
from tightfit.formats.registry import Format

PLAN_JSON_VERSION = 2
BUDGET_JSON_VERSION = 2
BYTES_PER_MB = 1_000_000  # MB in budgets and messages is decimal


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _bpw_to_bytes(bpw: float, total_weights: int) -> int:
    """floor(bpw * W / 8), with bpw read as the decimal it was written as: the float typed as
    2.28 sits just below 2.28 (repr is the shortest string that round-trips), and must not
    floor one byte short of a plan of exactly 2.28 bits/weight."""
    return math.floor(Fraction(repr(float(bpw))) * total_weights / 8)


@dataclass(frozen=True)
class LayerChoice:
    """One candidate for one layer, as measured by the sensitivity and profile stages.

    fmt:         the quantization format, or fp16 (`Unquantized`)
    nbytes:      exact bytes of the layer packed in fmt (`fmt.nbytes(out, in).total`)
    sensitivity: additive predicted loss of quantizing only this layer in fmt (lower is better)
    latency_ms:  decode latency of this layer per token in fmt, None when not measured
    """

    fmt: Choice
    nbytes: int
    sensitivity: float
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, Choice.__args__):
            raise ValueError(f"choice format must be a quantization format or fp16, got {type(self.fmt).__name__}")
        if not _is_int(self.nbytes) or self.nbytes <= 0:
            raise ValueError(f"choice {self.fmt.name}: nbytes must be a positive integer, got {self.nbytes!r}")
        if not _is_real(self.sensitivity):
            raise ValueError(f"choice {self.fmt.name}: sensitivity must be a finite number, got {self.sensitivity!r}")
        if self.latency_ms is not None and (not _is_real(self.latency_ms) or self.latency_ms < 0):
            raise ValueError(
                f"choice {self.fmt.name}: latency_ms must be a finite number >= 0 or None, got {self.latency_ms!r}"
            )


@dataclass(frozen=True)
class Budget:
    """Limits on a plan; set at least one of the first three.

    max_bytes:        total bytes of the plan's layers plus fixed_bytes
    max_bpw:          average bits per weight of the plan's layers (their bytes * 8 / their weights)
    max_latency_ms:   predicted decode latency per token, the sum of the chosen layers'
                      latencies plus fixed_latency_ms
    fixed_latency_ms: measured latency of everything else per token (attention, norms)
    fixed_bytes:      bytes of everything else that max_bytes covers (e.g. the norms and header
                      of a packed file)
    """

    max_bytes: int | None = None
    max_bpw: float | None = None
    max_latency_ms: float | None = None
    fixed_latency_ms: float = 0.0
    fixed_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_bytes is None and self.max_bpw is None and self.max_latency_ms is None:
            raise ValueError("a budget needs at least one of max_bytes, max_bpw, max_latency_ms")
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if self.max_bpw is not None and (not _is_real(self.max_bpw) or self.max_bpw <= 0):
            raise ValueError(f"max_bpw must be a positive finite number, got {self.max_bpw!r}")
        if self.max_latency_ms is not None and (not _is_real(self.max_latency_ms) or self.max_latency_ms <= 0):
            raise ValueError(f"max_latency_ms must be a positive finite number, got {self.max_latency_ms!r}")
        if not _is_real(self.fixed_latency_ms) or self.fixed_latency_ms < 0:
            raise ValueError(f"fixed_latency_ms must be a finite number >= 0, got {self.fixed_latency_ms!r}")
        if not _is_int(self.fixed_bytes) or self.fixed_bytes < 0:
            raise ValueError(f"fixed_bytes must be an integer >= 0, got {self.fixed_bytes!r}")

    def describe(self) -> str:
        """The limits for people, e.g. `≤ 3.00 bits/weight, ≤ 60.0 MB, ≤ 12.0 ms/token`."""
        parts = []
        if self.max_bpw is not None:
            parts.append(f"≤ {self.max_bpw:.2f} bits/weight")
        if self.max_bytes is not None:
            parts.append(f"≤ {self.max_bytes / BYTES_PER_MB:.1f} MB")
        if self.max_latency_ms is not None:
            parts.append(f"≤ {self.max_latency_ms:.1f} ms/token")
        return ", ".join(parts)

    def bytes_cap(self, total_weights: int) -> int | None:
        """B, the byte limit on the plan's layers that both size limits imply together, or None
        when neither is set."""
        caps = []
        if self.max_bytes is not None:
            caps.append(int(self.max_bytes) - int(self.fixed_bytes))
        if self.max_bpw is not None:
            caps.append(_bpw_to_bytes(self.max_bpw, total_weights))
        return min(caps) if caps else None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": BUDGET_JSON_VERSION,
            "max_bytes": None if self.max_bytes is None else int(self.max_bytes),
            "max_bpw": None if self.max_bpw is None else float(self.max_bpw),
            "max_latency_ms": None if self.max_latency_ms is None else float(self.max_latency_ms),
            "fixed_latency_ms": float(self.fixed_latency_ms),
            "fixed_bytes": int(self.fixed_bytes),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Budget:
        fields = _check_json(d, "budget", BUDGET_JSON_VERSION, ("max_bytes", "max_bpw", "max_latency_ms", "fixed_latency_ms", "fixed_bytes"))
        return cls(**fields)


@dataclass(frozen=True)
class Plan:
    """Output of the allocate stage: one candidate per layer and what it is predicted to cost.

    formats:              layer name -> chosen format (or fp16), in the order the layers were given
    total_bytes:          exact bytes of all the plan's layers in their chosen formats
    total_weights:        sum of out_features * in_features over the layers
    bits_per_weight:      total_bytes * 8 / total_weights
    predicted_loss:       sum of the chosen choices' sensitivities
    predicted_latency_ms: sum of the chosen latencies + budget.fixed_latency_ms; None when the
                          choices carry no latencies
    budget:               the budget the plan was solved for
    pinned:               layer name -> a candidate fixed before allocation (e.g. the embeddings
                          by --embed-format): applied with the plan, outside its totals; its
                          bytes and latency are in the budget's fixed parts
    """

    formats: dict[str, Choice]
    total_bytes: int
    total_weights: int
    bits_per_weight: float
    predicted_loss: float
    predicted_latency_ms: float | None
    budget: Budget
    pinned: dict[str, Choice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.formats or not all(isinstance(f, Choice.__args__) for f in self.formats.values()):
            raise ValueError("a plan needs at least one layer, each with a quantization format or fp16")
        if not (_is_int(self.total_bytes) and self.total_bytes > 0 and _is_int(self.total_weights) and self.total_weights > 0):
            raise ValueError(f"plan totals must be positive integers, got {self.total_bytes!r} bytes, {self.total_weights!r} weights")
        if not isinstance(self.budget, Budget):
            raise ValueError(f"plan budget must be a Budget, got {type(self.budget).__name__}")
        if not all(isinstance(f, Choice.__args__) for f in self.pinned.values()) or set(self.pinned) & set(self.formats):
            raise ValueError("pinned layers need a quantization format or fp16, and lie outside the plan's layers")

    @property
    def quantized(self) -> dict[str, Format]:
        """Every layer the plan quantizes, pinned ones included, and its format (fp16 ones omitted)."""
        return {name: f for name, f in {**self.formats, **self.pinned}.items() if not isinstance(f, Unquantized)}

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_JSON_VERSION,
            "formats": {name: fmt.name for name, fmt in self.formats.items()},
            "total_bytes": int(self.total_bytes),
            "total_weights": int(self.total_weights),
            "bits_per_weight": float(self.bits_per_weight),
            "predicted_loss": float(self.predicted_loss),
            "predicted_latency_ms": None if self.predicted_latency_ms is None else float(self.predicted_latency_ms),
            "budget": self.budget.to_json(),
            "pinned": {name: fmt.name for name, fmt in self.pinned.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        keys = ("formats", "total_bytes", "total_weights", "bits_per_weight", "predicted_loss", "predicted_latency_ms", "budget",
                "pinned")
        fields = _check_json(d, "plan", PLAN_JSON_VERSION, keys)
        for key in ("formats", "pinned"):
            if not isinstance(fields[key], dict):
                got = type(fields[key]).__name__
                raise ValueError(f"plan JSON {key!r} must be an object of layer name -> format name, got {got}")
        return cls(
            **{
                **fields,
                "formats": {name: parse_choice(text) for name, text in fields["formats"].items()},
                "pinned": {name: parse_choice(text) for name, text in fields["pinned"].items()},
                "budget": Budget.from_json(fields["budget"]),
            }
        )


def _check_json(d: object, what: str, version: int, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} JSON must be an object, got {type(d).__name__}")
    if d.get("version") != version:
        raise ValueError(f"{what} JSON has version {d.get('version')!r}; this tightfit reads version {version}")
    got = set(d) - {"version"}
    if got != set(keys):
        missing, unknown = sorted(set(keys) - got), sorted(got - set(keys))
        raise ValueError(f"{what} JSON keys differ from the expected ones: missing {missing}, unknown {unknown}")
    return {k: d[k] for k in keys}

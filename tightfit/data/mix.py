"""Calibration text as a mix of sources: `wiki`, `wiki,code`, `wiki:0.5,code:0.5`, `wiki,self:2048`.

Each entry names a source (a built-in text, a .txt/.jsonl file, or `self`: text sampled from the
model) with an optional amount after a colon:

    name          an equal share of the windows the other entries leave
    name:0.25     a share (a number with a decimal point, in (0, 1]) of the windows that token
                  counts leave
    name:2048     a number of tokens (a whole number): 2048 // seq_len whole windows

The windows of a calibration set of n windows are apportioned once, by largest remainder, so the
mix is exact and the same on every run. `interleave` orders them so that any prefix of the set
(the Fisher statistics take the first windows) holds the sources in their shares.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tightfit.data.text import BUILTIN_TEXTS, SELF_TEXT, text_file
from tightfit.errors import TextSourceError

_SHARE = re.compile(r"[0-9]*\.[0-9]+|[0-9]+\.")
_TOKENS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class MixPart:
    """One source of a mix: share (of the windows token counts leave) or tokens, or neither (an
    equal share of what the others leave)."""

    name: str
    share: float | None = None
    tokens: int | None = None

    def __str__(self) -> str:
        if self.tokens is not None:
            return f"{self.name}:{self.tokens}"
        return self.name if self.share is None else f"{self.name}:{self.share:g}"


@dataclass(frozen=True)
class TextMix:
    parts: tuple[MixPart, ...]

    def __str__(self) -> str:
        """The canonical spec (what CalibrationConfig.text records)."""
        return ",".join(str(p) for p in self.parts)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def windows(self, n_windows: int, seq_len: int) -> dict[str, int]:
        """Windows of each source in a calibration set of n_windows windows of seq_len tokens, in
        spec order. Raises TextSourceError when the amounts do not fit n_windows."""
        counted = {p.name: p.tokens // seq_len for p in self.parts if p.tokens is not None}
        for p in self.parts:
            if p.tokens is not None and counted[p.name] < 1:
                raise TextSourceError(f"{p} is less than one calibration window of {seq_len} tokens (--calib-len)")
        rest = n_windows - sum(counted.values())
        shared = [p for p in self.parts if p.tokens is None]
        if rest < 0:
            raise TextSourceError(f"the token counts of '{self}' take {sum(counted.values())} windows of {seq_len} "
                                  f"tokens, more than the {n_windows} calibration windows (--calib-samples)")
        if not shared and rest > 0:
            raise TextSourceError(f"the token counts of '{self}' fill {sum(counted.values())} of {n_windows} "
                                  f"calibration windows: add a source without a count to take the rest, or set "
                                  f"--calib-samples {sum(counted.values())}")
        given = sum(p.share for p in shared if p.share is not None)
        free = [p for p in shared if p.share is None]
        shares = [p.share if p.share is not None else (1.0 - given) / len(free) for p in shared]
        counts = dict(zip((p.name for p in shared), apportion(shares, rest)))
        for p in shared:
            if counts[p.name] < 1:
                raise TextSourceError(f"{p} of the {rest} calibration windows left by '{self}' is less than one "
                                      "window: give it a larger share or more --calib-samples")
        return {p.name: counted.get(p.name, counts.get(p.name)) for p in self.parts}


def apportion(weights: list[float], total: int) -> list[int]:
    """Whole counts summing to total, proportional to weights (largest remainder; ties to the first)."""
    whole = sum(weights)
    if total == 0 or whole <= 0:
        return [0] * len(weights)
    exact = [w / whole * total for w in weights]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def interleave(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(source, index within that source) of every window, ordered so that each source's windows
    spread evenly over the set: window j of a source with w windows sits at (j + 1/2) / w."""
    order = list(counts)
    slots = [(name, j) for name, w in counts.items() for j in range(w)]
    return sorted(slots, key=lambda s: ((s[1] + 0.5) / counts[s[0]], order.index(s[0])))


def _part(entry: str) -> MixPart:
    name, amount = entry, None
    if ":" in entry:
        head, tail = entry.rsplit(":", 1)
        if _SHARE.fullmatch(tail) or _TOKENS.fullmatch(tail):
            name, amount = head.strip(), tail
        elif not _is_file(entry):
            raise TextSourceError(f"bad amount in '{entry}': after the colon give a share like 0.5 or a number "
                                  "of tokens like 2048")
    if not name:
        raise TextSourceError(f"'{entry}' names no text source")
    if name != SELF_TEXT and name not in BUILTIN_TEXTS:
        text_file(name)  # missing or unsupported files fail here, before any model is loaded
    if amount is None:
        return MixPart(name)
    if _TOKENS.fullmatch(amount):
        tokens = int(amount)
        if tokens < 1:
            raise TextSourceError(f"'{entry}': a token count must be 1 or more")
        return MixPart(name, tokens=tokens)
    share = float(amount)
    if not 0 < share <= 1:
        raise TextSourceError(f"'{entry}': a share must lie in (0, 1], got {amount}")
    return MixPart(name, share=share)


def _is_file(entry: str) -> bool:
    try:
        text_file(entry)
    except TextSourceError:
        return False
    return True


def parse_mix(spec: str) -> TextMix:
    """A --calib-text spec -> TextMix; raises TextSourceError with a one-line reason when it is bad.
    A spec that names one existing file is that file, whatever commas or colons its path holds."""
    if not isinstance(spec, str) or not spec.strip():
        raise TextSourceError("the calibration text is empty: give e.g. wiki, wiki,code or wiki:0.75,self:2048")
    if _is_file(spec):
        return TextMix((MixPart(spec),))
    entries = [e.strip() for e in spec.split(",")]
    if not all(entries):
        raise TextSourceError(f"'{spec}' has an empty entry: separate sources by single commas")
    parts = tuple(_part(e) for e in entries)
    names = [p.name for p in parts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TextSourceError(f"'{spec}' names {', '.join(repeated)} more than once")
    shares = [p.share for p in parts if p.tokens is None]
    given = sum(s for s in shares if s is not None)
    if None not in shares and shares and abs(given - 1.0) > 1e-6:
        raise TextSourceError(f"the shares of '{spec}' add up to {given:g}: they must add up to 1, or leave one "
                              "source without a share to take the rest")
    if None in shares and given >= 1.0 - 1e-6:
        raise TextSourceError(f"the shares of '{spec}' add up to {given:g}, leaving nothing for the sources "
                              "without a share")
    return TextMix(parts)

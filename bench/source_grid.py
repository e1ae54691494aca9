"""The source's own grid: a GGUF source that was quantized before we see it (the default model is a
Q4_1 file) is dequantized to fp32, but its weights still lie on that file's grid, so a format that can
hold the grid re-quantizes them (near) losslessly and its quality there is no evidence. Which grid it
is comes from the file's own tensor types, never from a table of models; the benches record it in
their JSON and print the caveat from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceGrid:
    """A uniform code grid the source's weights already lie on.

    ggml_type: llama.cpp's type of those tensors ("Q4_1"); bits: code width; group_size: weights per
    scale (a K-type's sub-block); asymmetric: a min (offset) per group besides the scale; tensors:
    how many of the file's linear layers (decoder-block matrices) are of this type.
    """

    ggml_type: str
    bits: int
    group_size: int
    asymmetric: bool
    tensors: int

    def describe(self) -> str:
        kind = "asymmetric" if self.asymmetric else "symmetric"
        return (f"{self.ggml_type} ({self.bits}-bit {kind}, groups of {self.group_size}; {self.tensors} "
                f"linear layer{'' if self.tensors == 1 else 's'})")


# The uniform GGML types (ggml-common.h block layouts): (bits, weights per scale, a min per group).
# The IQ types are lattices and codebooks: no uniform format holds them, so they are not grids here.
GGML_GRIDS: dict[str, tuple[int, int, bool]] = {
    "Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q5_0": (5, 32, False), "Q5_1": (5, 32, True), "Q8_0": (8, 32, False),
    "Q2_K": (2, 16, True), "Q3_K": (3, 16, False), "Q4_K": (4, 32, True), "Q5_K": (5, 32, True), "Q6_K": (6, 16, False),
}


def source_grids(source) -> tuple[SourceGrid, ...]:
    """The uniform grids of a GGUF source's quantized decoder-block matrices (the linear layers the
    benches quantize; the embeddings and head are left out), most tensors first; () for a float
    source (fp16/bf16/fp32, or a safetensors folder). Reads the file's header only."""
    from collections import Counter

    from tightfit.model.checkpoint_files import read_gguf_header
    from tightfit.model.sources import GGUF

    if source.kind != GGUF:
        return ()
    counts = Counter(t.ggml_type.name for t in read_gguf_header(source.path).tensors
                     if t.name.startswith("blk.") and len(t.shape) == 2)
    return tuple(SourceGrid(t, *GGML_GRIDS[t], n) for t, n in counts.most_common() if t in GGML_GRIDS)


def grids_json(grids) -> list[dict]:
    return [dataclasses.asdict(g) for g in grids]


def grids_from_json(items: list[dict]) -> tuple[SourceGrid, ...]:
    return tuple(SourceGrid(**g) for g in items)


def recorded_grids(payload: dict) -> list[dict]:
    """A results payload's `source_grids`; for one written before runs recorded them, its model's,
    read from the model's file header now (a report-only rerender)."""
    if "source_grids" in payload:
        return payload["source_grids"]
    from tightfit.model import resolve_source

    return grids_json(source_grids(resolve_source(payload["model"])))


def code_grid(name: str) -> tuple[int, int, bool] | None:
    """(bits, group size, asymmetric) of the codes of format `name`: a uniform format, an SpQR
    recipe's dense part, or a uniform GGML type ("Q4_K"). None for what has no uniform grouped grid:
    a per-channel format, a fixed or learned non-uniform table (nl4g32, lut4g32), an IQ type, a plan's
    file name."""
    from tightfit.errors import FormatError
    from tightfit.formats.registry import parse_format
    from tightfit.formats.spqr import SpQRFormat
    from tightfit.formats.table import QuantFormat

    if name in GGML_GRIDS:
        return GGML_GRIDS[name]
    try:
        fmt = parse_format(name)
    except FormatError:
        return None
    if not isinstance(fmt, (QuantFormat, SpQRFormat)) or fmt.group_size is None:  # the uniform code grids only
        return None
    return fmt.bits, fmt.group_size, not fmt.symmetric


def is_format(name: str) -> bool:
    """Whether `name` is one format of ours (not a plan's file, not a peer's recipe)."""
    from tightfit.errors import FormatError
    from tightfit.formats.registry import parse_format

    try:
        parse_format(name)
    except FormatError:
        return False
    return True


def holds(code: tuple[int, int, bool], grid: SourceGrid) -> bool:
    """Whether codes (bits, group size, asymmetric) can hold `grid` up to the rounding of their
    statistics: the same bits, groups that divide the grid's (each source group is whole groups of
    ours), and a zero point wherever the grid has a min (a zero point also holds a symmetric grid)."""
    bits, group, asymmetric = code
    return bits == grid.bits and grid.group_size % group == 0 and (asymmetric or not grid.asymmetric)


def favoured(code: tuple[int, int, bool], grid: SourceGrid) -> bool:
    """Codes on the same grid with coarser groups (a multiple of the grid's): not held, but close."""
    bits, group, asymmetric = code
    return (bits == grid.bits and group > grid.group_size and group % grid.group_size == 0
            and (asymmetric or not grid.asymmetric))


def held_grids(name: str, grids) -> list[SourceGrid]:
    """The source grids format `name` (or GGML type) can hold."""
    code = code_grid(name)
    return [] if code is None else [g for g in grids if holds(code, g)]


def on_source_grid(name: str, grids) -> bool:
    """Whether format `name` can hold one of the source's own grids, so re-quantizing to it is (near)
    lossless and proves nothing."""
    return bool(held_grids(name, grids))


def source_line(grids) -> str:
    """What the source's weights already are; '' for a float source."""
    if not grids:
        return ""
    return ("The source is a dequantized GGUF file whose linear layers already lie on a grid: "
            + ", ".join(g.describe() for g in grids) + ".")


def source_grid_caveat(names, grids) -> str:
    """What the source's grid means for the formats `names`: which of them can hold it (no evidence,
    verdicts n/a) and which are favoured by it ('' for a float source)."""
    if not grids:
        return ""
    names = list(dict.fromkeys(names))
    on = [n for n in names if on_source_grid(n, grids)]
    near = [n for n in names if n not in on and (c := code_grid(n)) is not None and any(favoured(c, g) for g in grids)]
    if on:
        held = sorted({g.ggml_type for n in on for g in held_grids(n, grids)})
        text = (f"{', '.join(on)} can hold it ({', '.join(held)}: the same bits, groups that divide the source's, and a "
                "zero point where the source has a min; an SpQR recipe differs from it only in its quantized statistics), "
                "so their quality here is (near) lossless re-quantization, not evidence; verdicts on them are n/a.")
    else:
        text = "None of the formats here can hold it."
    if near:
        text += f" {', '.join(near)} {'is' if len(near) == 1 else 'are'} on its grid with coarser groups, so favoured by it."
    return f"{source_line(grids)} {text}"

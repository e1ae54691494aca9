"""The Pareto report: size, decode speed and KL of a model's compressed versions, as JSON,
Markdown and a figure.

`pipeline.pareto` measures the points (one packed model each) and saves the JSON after every
point, so a sweep resumes; this module holds the artifact and renders it. The figure has two
panels: KL to the original against size (log KL, colour = decode tok/s), and decode tok/s
against the bytes the engine reads per token, under the roofline tok/s = bandwidth / bytes
(gpt-fast `generate.py` reports speed next to bandwidth the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tightfit.formats.files import atomic_write_bytes, atomic_write_json

PARETO_VERSION = 1
JSON_FILE, MARKDOWN_FILE, FIGURE_FILE = "pareto.json", "pareto.md", "pareto.png"


@dataclass(frozen=True)
class ParetoPoint:
    """One compressed (or the original) model.

    name:            unique label, e.g. `original (fp16)`, `uniform w3g64`, `planned 3.00 bpw`
    kind:            "original", "uniform" or "planned"
    size_mb:         bytes of the packed tensor file / 1e6 (the original: its tensors in fp16)
    bits_per_weight: of the quantized layers (None for the original)
    read_mb:         bytes of weights the engine reads per decoded token / 1e6
    decode_tok_s, prefill_tok_s: medians of the speed measurement on the fast engine
    kl, top1:        KL(original || model) per token and top-1 agreement (0 and 1 for the original)
    ppl:             perplexity on the evaluation text
    skipped:         why the point has no model (e.g. an infeasible budget); the numbers are None then
    """

    name: str
    kind: str
    size_mb: float | None = None
    bits_per_weight: float | None = None
    read_mb: float | None = None
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    kl: float | None = None
    top1: float | None = None
    ppl: float | None = None
    skipped: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("original", "uniform", "planned"):
            raise ValueError(f"pareto point kind must be original, uniform or planned, got {self.kind!r}")


@dataclass(frozen=True)
class ParetoReport:
    """settings: what every point was measured with (a resumed sweep must match them);
    bandwidth_gb_s: read bandwidth at settings' threads, probed right before the speeds were timed
    (0 until then); points in the order measured;
    machine: the CPU every point's speed was timed on (side by side, at the end of a sweep)."""

    settings: dict[str, Any]
    bandwidth_gb_s: float
    points: tuple[ParetoPoint, ...] = field(default_factory=tuple)
    version: int = PARETO_VERSION
    machine: str = ""

    def names(self) -> set[str]:
        return {p.name for p in self.points}

    def with_point(self, point: ParetoPoint) -> ParetoReport:
        if point.name in self.names():
            raise ValueError(f"the report already has a point named {point.name!r}")
        return replace(self, points=self.points + (point,))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "settings": self.settings, "bandwidth_gb_s": self.bandwidth_gb_s,
                "machine": self.machine, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ParetoReport:
        if not isinstance(d, dict) or d.get("version") != PARETO_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"pareto JSON has version {got!r}; this tightfit reads version {PARETO_VERSION}")
        return cls(settings=d["settings"], bandwidth_gb_s=float(d["bandwidth_gb_s"]),
                   points=tuple(ParetoPoint(**p) for p in d["points"]), machine=str(d.get("machine", "")))


def save_json(report: ParetoReport, folder: Path) -> Path:
    path = Path(folder) / JSON_FILE
    atomic_write_json(path, report.to_json())
    return path


def _cell(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _calibration_line(s: dict[str, Any]) -> str:
    """How the points were made: calibration text and size, sensitivity, candidates, embeddings."""
    cal = s.get("calibration") or {}
    hessians = "each point's Hessians through its quantized layers" if s.get("sequential") else "the original model's Hessians"
    return (f"Calibration: {cal.get('text')}, {cal.get('n_samples')} windows of {cal.get('seq_len')} tokens ({hessians}); "
            f"planner sensitivity {s.get('sensitivity')}; candidates {', '.join(s.get('candidates') or [])}; "
            f"embeddings {s.get('embed_format') or 'fp16'}.")


def markdown(report: ParetoReport) -> str:
    s = report.settings
    lines = [
        f"# Pareto report: {s.get('model')}",
        "",
        f"Method {s.get('method')}; KL on {s.get('eval_windows')} windows of {s.get('eval_ctx')} tokens of {s.get('eval_text')}; "
        f"decode speed on tightfit's engine, {s.get('threads')} threads, every point timed side by side (round-robin), median of "
        f"{s.get('repeats')} rounds of {s.get('new_tokens')} tokens after a {s.get('prompt_tokens')}-token prompt; read bandwidth {report.bandwidth_gb_s:.1f} GB/s "
        "(roofline = bandwidth / MB read per token).",
        "",
        _calibration_line(s),
        "",
    ]
    if report.machine:
        lines += [f"Machine: {report.machine}.", ""]
    lines += [
        "| point | size MB | bits/weight | MB read/token | decode tok/s | roofline tok/s | prefill tok/s | KL | top-1 | PPL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report.points:
        if p.skipped is not None:
            lines.append(f"| {p.name} | skipped: {p.skipped} | | | | | | | | |")
            continue
        roof = report.bandwidth_gb_s * 1e3 / p.read_mb if p.read_mb and report.bandwidth_gb_s else None
        lines.append(
            f"| {p.name} | {_cell(p.size_mb, '.2f')} | {_cell(p.bits_per_weight, '.3f')} | {_cell(p.read_mb, '.2f')} | "
            f"{_cell(p.decode_tok_s, '.1f')} | {_cell(roof, '.1f')} | {_cell(p.prefill_tok_s, '.1f')} | {_cell(p.kl, '.3g')} | "
            f"{_cell(p.top1, '.3f')} | {_cell(p.ppl, '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def save_markdown(report: ParetoReport, folder: Path) -> Path:
    path = Path(folder) / MARKDOWN_FILE
    atomic_write_bytes(path, markdown(report).encode("utf-8"))
    return path


def save_figure(report: ParetoReport, folder: Path) -> Path:
    """The two-panel PNG. Raises ImportError when matplotlib (the `bench` extra) is missing."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display needed; a library never opens windows
    import matplotlib.pyplot as plt

    done = [p for p in report.points if p.skipped is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    shown = [p for p in done if p.kl is not None and p.kl > 0]
    if shown:
        sc = left.scatter([p.size_mb for p in shown], [p.kl for p in shown], c=[p.decode_tok_s for p in shown], cmap="viridis",
                          s=50, zorder=3)
        fig.colorbar(sc, ax=left, label="decode tok/s")
        for p in shown:
            left.annotate(p.name, (p.size_mb, p.kl), fontsize=7, xytext=(4, 3), textcoords="offset points")
        left.set_yscale("log")
        left.margins(x=0.15)
    left.set_xlabel("packed size (MB)")
    left.set_ylabel("KL(original || model) per token")
    left.set_title("quality vs size (the original, KL 0, is off the log axis)", fontsize=9)
    left.grid(True, alpha=0.3)

    speed = [p for p in done if p.read_mb and p.decode_tok_s]
    if speed:
        xs = [p.read_mb for p in speed]
        right.scatter(xs, [p.decode_tok_s for p in speed], zorder=3)
        for p in speed:
            right.annotate(p.name, (p.read_mb, p.decode_tok_s), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if report.bandwidth_gb_s:
            lo, hi = 0.8 * min(xs), 1.2 * max(xs)
            grid = [lo + (hi - lo) * i / 200 for i in range(201)]
            right.plot(grid, [report.bandwidth_gb_s * 1e3 / x for x in grid], "--", color="gray",
                       label=f"roofline: {report.bandwidth_gb_s:.1f} GB/s / bytes read")
            right.legend(fontsize=8)
        right.margins(x=0.15)
    right.set_xlabel("weights read per decoded token (MB)")
    right.set_ylabel("decode tok/s")
    right.set_title(f"speed vs bytes read, {report.settings.get('threads')} threads", fontsize=9)
    right.grid(True, alpha=0.3)
    fig.suptitle(f"{report.settings.get('model')}: size, quality and speed", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(folder) / FIGURE_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path

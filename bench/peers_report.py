"""The entries of a bench/peers.py run and what its results say about them: verdicts, the best
entry per bits/weight band, the Pareto front, the Markdown report and the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from common import ENGINE_COLUMNS, machine_line, other_texts, other_texts_lines, protocol_line
from source_grid import (
    grids_from_json, held_grids, is_format, on_source_grid, recorded_grids, source_grid_caveat, source_line,
)

from tightfit.evaluate import EvalConfig

HQQ_GROUP = 64  # hqq's BaseQuantizeConfig default
SPEED_PROMPT, SPEED_NEW, SPEED_REPEATS, SPEED_THREADS = 32, 128, 3, 2
NO_MORE_BITS = 0.05  # a peer entry is "at no more bits" than a tightfit entry up to this many bits/weight more


@dataclass
class Entry:
    """One quantized model: its size, cost, scores, and how to time it (None: no CPU engine).

    kl, ppl, top1: through the engine that runs it; kl_fp32: tightfit's packed file as the
    dequantized torch model (None for peers); kl_held_back: on the held-back calibration windows;
    kl_texts: through its engine on the windows of each other evaluation text (text -> KL).
    source_grid: it can hold the source's own grid throughout, so its quality is no evidence
    (`mark_source_grid`).
    """

    peer: str
    name: str
    bits_per_weight: float
    quantize_seconds: float
    file_mb: float | None = None
    types: dict[str, int] = field(default_factory=dict)  # a file's tensors: GGML type (llama.cpp) or format -> count
    ppl: float = math.nan
    kl: float = math.nan
    top1: float = math.nan
    kl_fp32: float | None = None
    kl_held_back: float = math.nan
    kl_texts: dict[str, float] = field(default_factory=dict)
    decode_tok_s: float | None = None
    decode_runs: list[float] = field(default_factory=list)
    note: str = ""
    source_grid: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        """An entry as a results JSON holds it (keys this version does not know are dropped)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def saved_run(json_path: Path) -> tuple[dict, list[Entry]]:
    """A saved run's payload and entries, for writing its report again: which entries sit on the
    source's grid and the verdicts recomputed from the entries (the grids read from the model file
    when the run did not record them), the numbers as measured."""
    import json

    payload = json.loads(json_path.read_text())
    payload["source_grids"] = recorded_grids(payload)
    entries = mark_source_grid([Entry.from_json(e) for e in payload["entries"]], grids_from_json(payload["source_grids"]))
    payload["entries"], payload["verdicts"] = [e.to_json() for e in entries], verdicts(entries)
    return payload, entries


def grid_tensors(e: Entry, grids) -> dict[str, int]:
    """Of a file's tensors (its `types`: GGML type or tightfit format -> count), those of a type
    that can hold one of the source's `grids`."""
    return {t: n for t, n in e.types.items() if held_grids(t, grids)}


def mark_source_grid(entries: list[Entry], grids) -> list[Entry]:
    """Set `source_grid` on every entry that can hold the source's own grid throughout: a tightfit or
    HQQ format that holds it, a file (`types`) whose every tensor is of a type that holds it.
    `grids`: source_grid.SourceGrid of the source (() for a float source: nothing is marked)."""
    for e in entries:
        if e.types:
            e.source_grid = bool(grids) and sum(grid_tensors(e, grids).values()) == sum(e.types.values())
        else:
            e.source_grid = on_source_grid(e.name, grids)
    return entries


BANDS = ((2.0, 2.75), (2.75, 3.25), (3.25, 3.75), (3.75, 4.25), (4.25, 4.75), (4.75, 5.5), (5.5, 9.0))
PEERS = ("tightfit", "llama.cpp", "llama.cpp+imatrix", "HQQ")


def scored(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if not math.isnan(e.kl)]


def verdicts(entries: list[Entry]) -> list[dict]:
    """Per tightfit entry: the peer entries off the source's grid at no more bits (within
    NO_MORE_BITS), those of them with lower KL, and tightfit_wins: None (n/a) without any such peer
    entry, or when the tightfit entry is on the source's grid (`mark_source_grid` first)."""
    ok = scored(entries)
    out = []
    for t in sorted((e for e in ok if e.peer == "tightfit"), key=lambda e: e.bits_per_weight):
        rivals = [e for e in ok if e.peer != "tightfit" and not e.source_grid
                  and e.bits_per_weight <= t.bits_per_weight + NO_MORE_BITS]
        beaten = [e for e in rivals if e.kl < t.kl]
        best = min(beaten, key=lambda e: e.kl, default=None)
        out.append({
            "tightfit": t.name, "bits_per_weight": t.bits_per_weight, "kl": t.kl, "source_grid": t.source_grid,
            "rivals": len(rivals), "beaten_by": len(beaten),
            "best_rival": best and {"peer": best.peer, "name": best.name, "bits_per_weight": best.bits_per_weight, "kl": best.kl},
            "tightfit_wins": None if not rivals or t.source_grid else not beaten,
        })
    return out


def verdict_line(v: dict) -> str:
    head = f"- tightfit {v['tightfit']} ({v['bits_per_weight']:.2f} bpw, KL {v['kl']:.4f})"
    if v["best_rival"]:
        b, n = v["best_rival"], v["beaten_by"]
        text = (f"{head} is beaten by {n} of {v['rivals']} peer entr{'y' if v['rivals'] == 1 else 'ies'} at no more bits; "
                f"best: {b['peer']} {b['name']} ({b['bits_per_weight']:.2f} bpw, KL {b['kl']:.4f})")
    elif v["rivals"]:
        text = f"{head}: none of the {v['rivals']} peer entries at no more bits has lower KL"
    else:
        text = f"{head}: n/a, no peer entry at no more bits"
    return text + (" (n/a: it can hold the source's own grid, see the caveats)." if v["source_grid"] else ".")


def band_table(entries: list[Entry]) -> list[str]:
    """Per band and peer, the entry chosen on held-back KL, shown with its evaluation KL; bold:
    the lowest evaluation KL of a band where at least two peers have an entry."""
    ok = [e for e in scored(entries) if not e.source_grid]
    lines = ["| band | " + " | ".join(PEERS) + " |", "|---" * (len(PEERS) + 1) + "|"]
    for lo, hi in BANDS:
        chosen = {p: min((e for e in ok if e.peer == p and lo <= e.bits_per_weight < hi), key=lambda e: e.kl_held_back,
                         default=None) for p in PEERS}
        present = [e for e in chosen.values() if e]
        if not present:
            continue
        top = min(present, key=lambda e: e.kl) if len(present) > 1 else None
        cells = []
        for p in PEERS:
            e = chosen[p]
            cell = "-" if e is None else f"{e.name} {e.bits_per_weight:.2f} / {e.kl:.4f}"
            cells.append(f"**{cell}**" if e is not None and e is top else cell)
        lines.append(f"| {lo:.2f}-{hi:.2f} | " + " | ".join(cells) + " |")
    return lines


def pareto_front(entries: list[Entry]) -> list[Entry]:
    front, best_kl = [], math.inf
    for e in sorted((e for e in scored(entries) if not e.source_grid), key=lambda e: (e.bits_per_weight, e.kl)):
        if e.kl < best_kl:
            front.append(e)
            best_kl = e.kl
    return front


# llama.cpp's legacy block types (32 weights a block): what its K- and IQ-types (256 a block) fall
# back to, per tensor, where a row's width is not a multiple of 256.
LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")


def fallback_tensors(e: Entry) -> int:
    """How many tensors of a llama.cpp K- or IQ-type file were written in a legacy block type."""
    if not e.peer.startswith("llama.cpp") or e.name in LEGACY_TYPES:
        return 0
    return sum(n for t, n in e.types.items() if t in LEGACY_TYPES)


def peer_bullets(entries: list[Entry]) -> list[str]:
    """Caveats on the peers' entries, from the entries: llama.cpp files that fell back to legacy
    types, HQQ's storage, tightfit's SpQR entries without a kernel (none where nothing applies)."""
    out = []
    fell = [(e, n) for e in scored(entries) if (n := fallback_tensors(e))]
    if fell:
        out.append("- llama.cpp's K- and IQ-types fall back per tensor to a legacy 32-weight block type where a row's "
                   "width is not a multiple of 256; here: " + "; ".join(f"{e.peer} {e.name} {n} of {sum(e.types.values())} "
                                                                       "tensors" for e, n in fell)
                   + ". So its low-bit types land near the legacy types' bits/weight; the `types` column shows the real mix. "
                   "On a model whose widths are multiples of 256 they would not.")
    hqq = sorted((e for e in scored(entries) if e.peer == "HQQ"), key=lambda e: e.bits_per_weight)
    if hqq:
        out.append(f"- HQQ stores its codes packed in int32 words (3-bit: ten to a word) plus an fp16 scale and zero per "
                   f"{HQQ_GROUP} weights, hence " + ", ".join(f"{e.bits_per_weight:.2f} bits/weight for its {e.name}" for e in hqq)
                   + "; it optimizes a weight-space error, without data.")
    dense = [e for e in scored(entries) if e.peer == "tightfit" and "dense fp32" in e.note]
    if dense:
        out.append("- tightfit entries with layers the engine runs dense in fp32 (no kernel for their format): "
                   + ", ".join(e.name for e in dense) + "; their KL (engine) is close to KL (fp32 ref), and their tok/s "
                   "is not what a kernel would give.")
    return out


def types_note(e: Entry) -> str:
    """The 'types / note' cell: what the file's tensors are, the entry's note, and whether it sits on
    the source's grid."""
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(e.types.items(), key=lambda kv: -kv[1]))
    return "; ".join(x for x in (mix, e.note, "on the source's grid: no evidence" if e.source_grid else "") if x)


def grid_bullet(entries: list[Entry], grids) -> str:
    """The caveat on the source's own grid ('' for a float source), from the entries and the
    source's `grids`: the formats that can hold it or are favoured by it, and the files (entries
    with `types`: GGML types or tightfit formats per tensor) with tensors of a type that holds it."""
    if not grids:
        return ""
    formats = [e.name for e in entries if not e.types and e.peer in ("tightfit", "HQQ") and is_format(e.name)]
    text = source_grid_caveat(formats, grids) if formats else source_line(grids)
    files = [(e, grid_tensors(e, grids)) for e in entries if e.types]
    on = [(e, held) for e, held in files if held]
    if on:
        text += (" Files with tensors of a type that can hold it (wholly: no evidence either; partly: favoured by the "
                 "source): " + "; ".join(f"{e.peer} {e.name} ({', '.join(f'{t} x{n}' for t, n in held.items())} of "
                                         f"{sum(e.types.values())}{': wholly' if e.source_grid else ''})"
                                         for e, held in on) + ".")
    off = sorted({e.peer for e, _ in files} - {e.peer for e, _ in on})
    if off:
        text += f" No {' or '.join(off)} file has a tensor of a type that can hold it."
    return f"- Source grid: {text} Entries wholly on it are left out of the band table, the Pareto front and the verdicts."


def markdown(payload: dict, entries: list[Entry]) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    grids = grids_from_json(payload["source_grids"])
    n_held = payload["held_back_windows"]
    n_linear = max((sum(e.types.values()) for e in entries if e.types), default=None)
    others = other_texts(payload, ev)
    calib = payload["calibration"]
    lines = [
        f"# tightfit vs peers on {payload['model']} (one run)",
        "",
        machine_line(payload["machine"], SPEED_THREADS),
        "",
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} Identical token ids for every engine. "
        f"{ENGINE_COLUMNS} KL held-back: on {n_held} held-back calibration windows (never calibrated on, disjoint from "
        f"the evaluation text), what the band table chooses on. KL (fp32 ref) exists for tightfit's entries only. "
        f"Wall time {payload['wall_s'] / 60:.1f} min.",
        *other_texts_lines(payload, ev, engines="the same engines"),
        "",
        f"- **tightfit**: GPTQ from cached Hessians of the original ({calib['text']}, {calib['n_samples']} x "
        f"{calib['seq_len']} calibration tokens), packed and reloaded, "
        "scored through tightfit's engine; bits/weight from the packed tensors. Quantize s excludes the one-time Hessian "
        "collection.",
        f"- **llama.cpp** {payload['llama_cpp_version']}: `llama_model_quantize` from an F32 GGUF of the original written by "
        "tightfit's exporter; token embeddings / tied head kept F16 (as tightfit); logits from llama.cpp itself. "
        f"bits/weight = GGUF bytes of the {f'{n_linear} ' if n_linear else ''}linear tensors / their weights; `types` shows "
        "what llama.cpp "
        "actually wrote.",
        "- **llama.cpp+imatrix**: the same, with an importance matrix = diag(H)/2 of the same cached Hessians "
        "(mean squared input activation per channel over the calibration text), passed as `params.imatrix`.",
        f"- **HQQ** {payload['hqq_version']}: CPU, group size {HQQ_GROUP} (its default), float32 compute; no CPU kernel, so "
        "its KL (engine) is its dequantized torch model's and it has no decode speed; bits/weight = its packed W_q + fp16 "
        "scale and zero per group.",
        f"- decode tok/s: {SPEED_THREADS} threads, {SPEED_PROMPT}-token prompt then {SPEED_NEW} greedy tokens, median of "
        f"{SPEED_REPEATS} after a warm-up, all engines round-robin; read bandwidth {payload.get('bandwidth_gb_s') or 0:.1f} GB/s.",
        "",
        "| peer | recipe | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | KL held-back | "
        + "".join(f"KL {t} | " for t in others) + "quantize s | decode tok/s | types / note |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|---|---|",
    ]
    for peer in PEERS:
        for e in sorted((e for e in entries if e.peer == peer), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight)):
            if math.isnan(e.kl):
                lines.append(f"| {peer} | {e.name} | - | - | - | - | - | - | " + "- | " * len(others) + f"- | - | failed: {e.note} |")
                continue
            note = types_note(e)
            speed = f"{e.decode_tok_s:.0f}" if e.decode_tok_s else "-"
            fp32 = "-" if e.kl_fp32 is None else f"{e.kl_fp32:.4f}"
            domains = "".join(f"{e.kl_texts[t]:.4f} | " if t in e.kl_texts else "- | " for t in others)
            lines.append(f"| {peer} | {e.name} | {e.bits_per_weight:.3f} | {e.ppl:.3f} | {e.kl:.4f} | {fp32} | {e.top1:.3f} | "
                         f"{e.kl_held_back:.4f} | {domains}{e.quantize_seconds:.1f} | {speed} | {note} |")
    floors = payload.get("engine_floors") or {}
    if floors:
        lines += ["", "Engine floors, against the torch reference: " + "; ".join(
            f"{name} running the unquantized original scores KL {f['kl']:.1e}, top-1 {f['top1']:.3f}, PPL {f['ppl']:.3f}"
            for name, f in floors.items()) + ". Differences below these are noise."]
    lines += ["", "## Best KL per bits/weight band", "",
              f"Per band, each peer's entry with the lowest KL on the {n_held} held-back calibration windows (chosen before "
              "looking at the evaluation text), shown as bits/weight / evaluation KL (engine). **Bold**: the lowest "
              "evaluation KL of a band where at least two peers have an entry. Entries on the source's grid are left out.", "",
              *band_table(entries)]
    lines += ["", "Pareto front over every entry off the source's grid (none is both smaller and closer to the original): "
              + ", ".join(f"{e.peer} {e.name} ({e.bits_per_weight:.2f}, {e.kl:.4f})" for e in pareto_front(entries)) + "."]
    lines += ["", "## Where tightfit loses", "",
              f"Each tightfit entry against every peer entry at no more bits (up to {NO_MORE_BITS} bits/weight more), by "
              "evaluation KL (engine); n/a: no such peer entry, or the entry sits on the source's grid.", "",
              *map(verdict_line, payload["verdicts"]), "",
              "## Caveats", "",
              "- Calibration: tightfit (GPTQ) and llama.cpp+imatrix use the calibration text; llama.cpp without imatrix "
              "and HQQ are data-free.",
              *([grid_bullet(entries, grids)] if grids else []),
              *peer_bullets(entries),
              "- KL and PPL move by a few percent between window sets; small gaps are not significant.",
              ""]
    return "\n".join(lines)


def plot(entries: list[Entry], path: Path, title: str, xlabel: str = "bits/weight of the quantized linear layers (as stored)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"tightfit": ("tab:blue", "o"), "llama.cpp": ("tab:orange", "s"), "llama.cpp+imatrix": ("tab:red", "D"), "HQQ": ("tab:green", "^")}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for peer, (color, marker) in style.items():
        pts = sorted((e for e in scored(entries) if e.peer == peer), key=lambda e: e.bits_per_weight)
        if not pts:
            continue
        ax.scatter([e.bits_per_weight for e in pts], [e.kl for e in pts], color=color, marker=marker, label=peer, zorder=3)
        for e in pts:
            label = e.name + (" (source grid)" if e.source_grid else "")
            ax.annotate(label, (e.bits_per_weight, e.kl), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL(original || quantized) per token, through each engine (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

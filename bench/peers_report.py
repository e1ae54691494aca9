"""The entries of a bench/peers.py run and what its results say about them: verdicts, the best
entry per bits/weight band, the Pareto front, the Markdown report and the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from common import ENGINE_COLUMNS, machine_line, on_source_grid, protocol_line, source_grid_caveat

from tightfit.evaluate import EvalConfig

HQQ_GROUP = 64  # hqq's BaseQuantizeConfig default
SPEED_PROMPT, SPEED_NEW, SPEED_REPEATS, SPEED_THREADS = 32, 128, 3, 2
NO_MORE_BITS = 0.05  # a peer entry is "at no more bits" than a tightfit entry up to this many bits/weight more


@dataclass
class Entry:
    """One quantized model: its size, cost, scores, and how to time it (None: no CPU engine).

    kl, ppl, top1: through the engine that runs it; kl_fp32: tightfit's packed file as the
    dequantized torch model (None for peers); kl_held_back: on the held-back calibration windows.
    """

    peer: str
    name: str
    bits_per_weight: float
    quantize_seconds: float
    file_mb: float | None = None
    types: dict[str, int] = field(default_factory=dict)  # llama.cpp: GGML type -> number of linear tensors
    ppl: float = math.nan
    kl: float = math.nan
    top1: float = math.nan
    kl_fp32: float | None = None
    kl_held_back: float = math.nan
    decode_tok_s: float | None = None
    decode_runs: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def source_grid(self) -> bool:
        """A tightfit format that can hold the source's own grid: no evidence (bench/common.py)."""
        return self.peer == "tightfit" and on_source_grid(self.name)

    def to_json(self) -> dict:
        return {**self.__dict__, "source_grid": self.source_grid}


BANDS = ((2.0, 2.75), (2.75, 3.25), (3.25, 3.75), (3.75, 4.25), (4.25, 4.75), (4.75, 5.5), (5.5, 9.0))
PEERS = ("tightfit", "llama.cpp", "llama.cpp+imatrix", "HQQ")


def scored(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if not math.isnan(e.kl)]


def verdicts(entries: list[Entry]) -> list[dict]:
    """Per tightfit entry: the peer entries at no more bits (within NO_MORE_BITS), those of them
    with lower KL, and tightfit_wins: None (n/a) without any such peer entry, or on the source's grid."""
    ok = scored(entries)
    out = []
    for t in sorted((e for e in ok if e.peer == "tightfit"), key=lambda e: e.bits_per_weight):
        rivals = [e for e in ok if e.peer != "tightfit" and e.bits_per_weight <= t.bits_per_weight + NO_MORE_BITS]
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
    return text + (" (n/a: it sits on the source's Q4_1 grid, see the caveats)." if v["source_grid"] else ".")


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


def markdown(payload: dict, entries: list[Entry]) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    n_held = payload["held_back_windows"]
    lines = [
        f"# tightfit vs peers on {payload['model']} (one run)",
        "",
        machine_line(payload["machine"], SPEED_THREADS),
        "",
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} Identical token ids for every engine. "
        f"{ENGINE_COLUMNS} KL held-back: on {n_held} held-back calibration windows (never calibrated on, disjoint from "
        f"the evaluation text), what the band table chooses on. KL (fp32 ref) exists for tightfit's entries only. "
        f"Wall time {payload['wall_s'] / 60:.1f} min.",
        "",
        "- **tightfit**: GPTQ from cached Hessians of the original (64 x 512 calibration tokens), packed and reloaded, "
        "scored through tightfit's engine; bits/weight from the packed tensors. Quantize s excludes the one-time Hessian "
        "collection.",
        f"- **llama.cpp** {payload['llama_cpp_version']}: `llama_model_quantize` from an F32 GGUF of the original written by "
        "tightfit's exporter; token embeddings / tied head kept F16 (as tightfit); logits from llama.cpp itself. "
        "bits/weight = GGUF bytes of the 210 linear tensors / their weights; `types` shows what llama.cpp actually wrote: "
        "widths 576 (not a multiple of 256) make K- and IQ-types fall back per tensor.",
        "- **llama.cpp+imatrix**: the same, with an importance matrix = diag(H)/2 of the same cached Hessians "
        "(mean squared input activation per channel over the calibration text), passed as `params.imatrix`.",
        f"- **HQQ** {payload['hqq_version']}: CPU, group size {HQQ_GROUP} (its default), float32 compute; no CPU kernel, so "
        "its KL (engine) is its dequantized torch model's and it has no decode speed; bits/weight = its packed W_q + fp16 "
        "scale and zero per group.",
        f"- decode tok/s: {SPEED_THREADS} threads, {SPEED_PROMPT}-token prompt then {SPEED_NEW} greedy tokens, median of "
        f"{SPEED_REPEATS} after a warm-up, all engines round-robin; read bandwidth {payload.get('bandwidth_gb_s') or 0:.1f} GB/s.",
        "",
        "| peer | recipe | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | KL held-back | quantize s | decode tok/s | types / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for peer in PEERS:
        for e in sorted((e for e in entries if e.peer == peer), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight)):
            if math.isnan(e.kl):
                lines.append(f"| {peer} | {e.name} | - | - | - | - | - | - | - | - | failed: {e.note} |")
                continue
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(e.types.items(), key=lambda kv: -kv[1]))
            note = "; ".join(x for x in (mix, e.note, "on the source's grid: no evidence" if e.source_grid else "") if x)
            speed = f"{e.decode_tok_s:.0f}" if e.decode_tok_s else "-"
            fp32 = "-" if e.kl_fp32 is None else f"{e.kl_fp32:.4f}"
            lines.append(f"| {peer} | {e.name} | {e.bits_per_weight:.3f} | {e.ppl:.3f} | {e.kl:.4f} | {fp32} | {e.top1:.3f} | "
                         f"{e.kl_held_back:.4f} | {e.quantize_seconds:.1f} | {speed} | {note} |")
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
    grid = source_grid_caveat([e.name for e in entries if e.peer == "tightfit"])
    lines += ["", "## Where tightfit loses", "",
              f"Each tightfit entry against every peer entry at no more bits (up to {NO_MORE_BITS} bits/weight more), by "
              "evaluation KL (engine); n/a: no such peer entry, or the entry sits on the source's grid.", "",
              *map(verdict_line, payload["verdicts"]), "",
              "## Caveats", "",
              "- Calibration: tightfit (GPTQ) and llama.cpp+imatrix use the calibration text; llama.cpp without imatrix "
              "and HQQ are data-free.",
              "- The original's weights are a dequantized Q4_1 file (4-bit asymmetric, groups of 32): formats on that grid "
              "(tightfit w4g32, llama.cpp Q4_1) are left out as (near) lossless, and formats close to it (Q4_K, 4-bit "
              "asymmetric g64/g128) are favoured by the source." + (f" **{grid}**" if grid else ""),
              "- Widths of 576 (all but ffn_down's input) are not a multiple of 256: llama.cpp's K- and IQ-types fall "
              "back per tensor (mostly to IQ4_NL / Q4_0 / Q5_0), so its '2-bit' and '3-bit' types land near 4 bits/weight "
              "here; the `types` column shows the real mix. On models with widths divisible by 256 they would not.",
              "- HQQ stores 3-bit codes ten to an int32 (3.2 bits) plus fp16 scale and zero per 64 weights, hence 3.70 "
              "bits/weight for its w3g64; it optimizes a weight-space error without data, and at 2 and 3 bits on this "
              "model that is far from enough.",
              "- tightfit's SpQR entries run on the engine's dense fp32 path (no SpQR kernel yet): fp32 activations, so their "
              "KL (engine) is close to KL (fp32 ref), and their tok/s is not what a kernel would give.",
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

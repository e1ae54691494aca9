"""What bench/formats.py measures and says: the format families and their members nearest each target
bits/weight, the best tightfit entry of each size class against llama.cpp + imatrix, the issue's
two targets (met / not met / n/a), and the Markdown report (also of the bigger model's section, read
from a bench/peers_files.py run)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common import machine_line, protocol_line
from peers_report import NO_MORE_BITS, Entry, grid_bullet, pareto_front, peer_bullets, scored, types_note
from source_grid import grids_from_json, on_source_grid

from tightfit.evaluate import EvalConfig

TARGETS_BPW = (2.5, 3.0, 3.5, 4.0, 4.5)
NEAR = 0.25  # a member stands for a target within this many bits/weight; a size class is target +- NEAR
RIVAL_PEER = "llama.cpp+imatrix"
# What joins no sweep unless asked (--per-channel), and why.
LEFT_OUT = "per-channel formats (w{b}pc, nl4pc, lut4pc, ...: one scale per row, far behind a grouped format of the same bits)"
PLAN = "plan"  # the family of a packed folder given whole (a planner's mix of formats)


@dataclass(frozen=True)
class Target:
    """The issue's explicit targets: at `bpw`, a tightfit entry of its size class (and at no more bits
    than the rival, up to NO_MORE_BITS) with lower KL than llama.cpp + imatrix's `rival` type."""

    bpw: float
    rival: str


TARGETS = (Target(4.5, "IQ4_NL"), Target(3.5, "IQ3_XXS"))
BIG_PRESETS = ("IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K_M", "IQ4_XS", "Q4_K_M")  # the bigger model's rivals, with imatrix


def family(name: str) -> str:
    """A format's family: its name with the numbers that vary inside a family written as fields
    (w3g64 -> w{b}g{g}, w4g32-sym -> w{b}g{g}-sym, nl4g32 -> nl4g{g}, lut4g64-row -> lut4g{g}-row,
    spqr-w3g16-s3-o0.5 -> spqr-w{b}g{g}-s3-o{o}; per channel is a group: w3pc -> w{b}g{g}); a name
    that is no format (a plan's folder) -> PLAN."""
    from source_grid import is_format

    if not is_format(name):
        return PLAN
    name = re.sub(r"(?<![a-z])w\d+", "w{b}", name)
    name = re.sub(r"(?<=[0-9a-z}])(g\d+|pc)", "g{g}", name)
    return re.sub(r"-o\d+(\.\d+)?", "-o{o}", name)


@dataclass(frozen=True)
class Member:
    """The format of `family` nearest `target` bits/weight off the source's grid (`bpw`: its bits/weight
    on the model's linear layers, from the format table; an SpQR recipe's at its outlier cap).
    `shadowed`: a format of the family nearer the target that can hold the source's grid (no
    evidence, so not measured unless asked), else ''."""

    family: str
    target: float
    name: str
    bpw: float
    shadowed: str = ""


def format_bits(fmt, shapes) -> float:
    """bits/weight of `fmt` over linear layers of `shapes` [(N, K)], every byte of the format table."""
    return 8 * sum(fmt.nbytes(n, k).total for n, k in shapes) / sum(n * k for n, k in shapes)


def choose_members(formats, shapes, grids, *, families: set[str] | None = None, per_channel: bool = False,
                   targets=TARGETS_BPW) -> list[Member]:
    """Per family (of `formats`, fp16 scales only; `families`: those only, default all; per-channel
    members only if `per_channel`: LEFT_OUT) and target, the member nearest the target within NEAR
    off the source's `grids` (ties: the smaller). A family without a member near a target has no
    Member there."""
    by_family: dict[str, list[tuple[str, float]]] = {}
    for fmt in formats:
        if getattr(fmt, "scale_dtype", "fp16") != "fp16":
            continue
        fam = family(fmt.name)
        if (families is None or fam in families) and (per_channel or getattr(fmt, "group_size", 0) is not None):
            by_family.setdefault(fam, []).append((fmt.name, format_bits(fmt, shapes)))
    out = []
    for fam, members in by_family.items():
        for t in targets:
            near = sorted((m for m in members if abs(m[1] - t) <= NEAR), key=lambda m: (abs(m[1] - t), m[1]))
            off = [m for m in near if not on_source_grid(m[0], grids)]
            if off:
                shadow = near[0][0] if near[0] is not off[0] else ""
                out.append(Member(fam, t, off[0][0], off[0][1], shadow))
    return out


def recipes(members: list[Member], with_source_grid: bool = False) -> list[str]:
    """The formats to measure, once each, by bits/weight (the shadowed ones too if asked)."""
    names = {m.name: m.bpw for m in members}
    if with_source_grid:
        names.update({m.shadowed: m.bpw for m in members if m.shadowed})
    return sorted(names, key=lambda n: (names[n], n))


# ---- size classes, presets and targets ---------------------------------------------------------------


def in_class(e: Entry, t: float) -> bool:
    return t - NEAR <= e.bits_per_weight < t + NEAR


def selection_kl(e: Entry) -> float:
    """What a choice among entries looks at: the held-back KL (an entry without one: its evaluation KL)."""
    return e.kl if math.isnan(e.kl_held_back) else e.kl_held_back


def chosen(entries: list[Entry], peer: str, t: float, at_most: float = math.inf) -> Entry | None:
    """The scored entry of `peer` off the source's grid in the size class of `t` (and at most `at_most`
    bits/weight) with the lowest held-back KL: chosen before looking at the evaluation text."""
    pool = [e for e in scored(entries) if e.peer == peer and not e.source_grid and in_class(e, t) and e.bits_per_weight <= at_most]
    return min(pool, key=selection_kl, default=None)


def preset_entry(entries: list[Entry], peer: str, name: str) -> Entry | None:
    """`peer`'s scored entry called `name`, unless it lies on the source's grid."""
    return next((e for e in scored(entries) if e.peer == peer and e.name == name and not e.source_grid), None)


def brief(e: Entry | None) -> dict | None:
    return e and {"name": e.name, "bits_per_weight": e.bits_per_weight, "kl": e.kl}


def wins(tf: Entry | None, rival: Entry | None) -> bool | None:
    return None if tf is None or rival is None else tf.kl < rival.kl


def class_rows(entries: list[Entry], targets=TARGETS_BPW, rival_peer: str = RIVAL_PEER) -> list[dict]:
    """Per target: tightfit's entry and the rival peer's chosen in its size class; tightfit_wins None
    (n/a) where either has none."""
    out = []
    for t in targets:
        tf, rv = chosen(entries, "tightfit", t), chosen(entries, rival_peer, t)
        out.append({"target": t, "tightfit": brief(tf), "rival": brief(rv), "tightfit_wins": wins(tf, rv)})
    return out


def preset_rows(entries: list[Entry], presets, rival_peer: str = RIVAL_PEER) -> list[dict]:
    """Per preset of `rival_peer` (scored, off the source's grid): tightfit's entry at no more bits
    (up to NO_MORE_BITS more) with the lowest held-back KL, and whether its KL is lower."""
    out = []
    for name in presets:
        rv = preset_entry(entries, rival_peer, name)
        pool = [] if rv is None else [e for e in scored(entries) if e.peer == "tightfit" and not e.source_grid
                                      and e.bits_per_weight <= rv.bits_per_weight + NO_MORE_BITS]
        tf = min(pool, key=selection_kl, default=None)
        on_grid = rv is None and any(e.peer == rival_peer and e.name == name and e.source_grid for e in entries)
        out.append({"preset": name, "rival": brief(rv), "tightfit": brief(tf), "tightfit_wins": wins(tf, rv),
                    "source_grid": on_grid})
    return out


def target_rows(entries: list[Entry], targets=TARGETS, rival_peer: str = RIVAL_PEER) -> list[dict]:
    """The issue's targets: met True / False, None (n/a) without a rival or a tightfit entry."""
    out = []
    for target in targets:
        rv = preset_entry(entries, rival_peer, target.rival)
        at_most = math.inf if rv is None else rv.bits_per_weight + NO_MORE_BITS
        tf = chosen(entries, "tightfit", target.bpw, at_most)
        below = [] if rv is None else sorted(e.name for e in scored(entries) if e.peer == "tightfit" and not e.source_grid
                                             and in_class(e, target.bpw) and e.bits_per_weight <= at_most and e.kl < rv.kl)
        out.append({"bpw": target.bpw, "rival_name": target.rival, "rival": brief(rv), "tightfit": brief(tf),
                    "met": wins(tf, rv), "below": below})
    return out


# ---- Markdown ---------------------------------------------------------------------------------------


def cell(e: dict | None) -> str:
    return "-" if e is None else f"{e['name']} {e['kl']:.4f} ({e['bits_per_weight']:.2f})"


def met_text(v: bool | None) -> str:
    return "n/a" if v is None else ("met" if v else "not met")


def plan_entries(entries: list[Entry]) -> list[Entry]:
    """tightfit's plans among the entries (scored or not)."""
    return [e for e in entries if e.peer == "tightfit" and family(e.name) == PLAN]


def family_table(entries: list[Entry], members: list[dict]) -> list[str]:
    """family x target -> 'format KL (bpw)' of the member measured there ('-': no member within NEAR)."""
    by_name = {e.name: e for e in entries if e.peer == "tightfit"}
    fams = list(dict.fromkeys(m["family"] for m in members))
    lines = ["| family | " + " | ".join(f"{t}" for t in TARGETS_BPW) + " |", "|---" * (len(TARGETS_BPW) + 1) + "|"]
    for fam in fams:
        cells = []
        for t in TARGETS_BPW:
            m = next((m for m in members if m["family"] == fam and m["target"] == t), None)
            e = m and by_name.get(m["name"])
            if m is None:
                text = "-"
            elif e is None or math.isnan(e.kl):
                text = f"{m['name']}: {'failed' if e else 'not measured'}"
            else:
                text = f"{e.name} {e.kl:.4f} ({e.bits_per_weight:.2f})"
            if m and m["shadowed"]:
                s = by_name.get(m["shadowed"])
                text += f"; {m['shadowed']} on the source's grid" + (f": {s.kl:.4f}, no evidence" if s and not math.isnan(s.kl) else "")
            cells.append(text)
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    plans = plan_entries(scored(entries))
    if plans:  # the planner's mixes, in the class of each target
        cells = [" ; ".join(f"{e.name} {e.kl:.4f} ({e.bits_per_weight:.2f})" for e in plans if in_class(e, t)) or "-"
                 for t in TARGETS_BPW]
        lines.append(f"| {PLAN} (a format per layer) | " + " | ".join(cells) + " |")
    return lines


def plan_bullet(entries: list[Entry]) -> list[str]:
    """The protocol line of the plans (their notes: method, candidates, planning time), none without one."""
    plans = plan_entries(entries)
    if not plans:
        return []
    return [f"- **{PLAN}s**: the planner (`tightfit.pipeline.make_plan`, as `tightfit compress --bpw B` plans) chooses a "
            "format per linear layer under B bits/weight (HiGHS), embeddings and head fp16 as in every entry here; GPTQ "
            "from the same Hessians; " + "; ".join(f"{e.name}: {e.note}" for e in plans) + "."]


def dq_table(entries: list[Entry]) -> list[str]:
    """Each scored -dq format beside its base (the same name without -dq): bits/weight saved and KL of each."""
    by_name = {e.name: e for e in scored(entries) if e.peer == "tightfit"}
    pairs = [(by_name[n.removesuffix("-dq")], e) for n, e in by_name.items() if n.endswith("-dq") and n.removesuffix("-dq") in by_name]
    if not pairs:
        return ["No -dq format and its base were both measured."]
    lines = ["| base: KL (bpw) | -dq: KL (bpw) | bits/weight saved | KL change |", "|---|---|---|---|"]
    for b, d in sorted(pairs, key=lambda p: p[0].bits_per_weight):
        lines.append(f"| {cell(brief(b))} | {cell(brief(d))} | {b.bits_per_weight - d.bits_per_weight:.3f} | "
                     f"{100 * (d.kl / b.kl - 1):+.1f} % |")
    return lines


def class_table(rows: list[dict], rival_peer: str = RIVAL_PEER) -> list[str]:
    lines = [f"| target bpw | size class | tightfit: KL (bpw) | {rival_peer}: KL (bpw) | tightfit lower |", "|---|---|---|---|---|"]
    for r in rows:
        t = r["target"]
        lines.append(f"| {t} | {t - NEAR:.2f}-{t + NEAR:.2f} | {cell(r['tightfit'])} | {cell(r['rival'])} | "
                     f"{'n/a' if r['tightfit_wins'] is None else ('yes' if r['tightfit_wins'] else 'no')} |")
    return lines


def preset_table(rows: list[dict], rival_peer: str = RIVAL_PEER) -> list[str]:
    lines = [f"| {rival_peer} | KL (bpw) | tightfit at no more bits: KL (bpw) | tightfit lower |", "|---|---|---|---|"]
    for r in rows:
        missing = "on the source's grid: no evidence" if r.get("source_grid") else "not measured or failed"
        rv = missing if r["rival"] is None else f"{r['rival']['kl']:.4f} ({r['rival']['bits_per_weight']:.2f})"
        lines.append(f"| {r['preset']} | {rv} | {cell(r['tightfit'])} | "
                     f"{'n/a' if r['tightfit_wins'] is None else ('yes' if r['tightfit_wins'] else 'no')} |")
    return lines


def target_line(r: dict) -> str:
    head = f"- At {r['bpw']} bits/weight, below {RIVAL_PEER} {r['rival_name']}"
    if r["rival"] is None:
        return f"{head}: **n/a** ({r['rival_name']} not measured, failed, or on the source's grid)."
    rv = f"{r['rival']['kl']:.4f} at {r['rival']['bits_per_weight']:.2f} bpw"
    if r["tightfit"] is None:
        return f"{head} ({rv}): **n/a** (no tightfit entry off the source's grid in {r['bpw'] - NEAR:.2f}-{r['bpw'] + NEAR:.2f} bpw)."
    tf = r["tightfit"]
    text = (f"{head} ({rv}): **{met_text(r['met'])}**: tightfit {tf['name']} (chosen on held-back KL) {tf['kl']:.4f} at "
            f"{tf['bits_per_weight']:.2f} bpw")
    return text + (f"; entries of the class below it on the evaluation text: {', '.join(r['below'])}." if r["below"] else ".")


def big_grid_lines(big: dict, entries: list[Entry]) -> list[str]:
    """The bigger model's source-grid caveat: none for a float source, a warning when its run recorded none."""
    if big.get("source_grids") is None:
        return ["- Source grid: that run recorded no source grids and its model was not here to read them: its entries "
                "are not checked against one (a float source has none)."]
    return [grid_bullet(entries, grids_from_json(big["source_grids"]))] if big["source_grids"] else []


def big_section(big: dict | None) -> list[str]:
    """The bigger model's table, from a bench/peers_files.py run's payload (`big`), or a line saying it is absent."""
    if not big:
        return ["## The bigger model", "", "No bench/peers_files.py results given (--big): this section is empty.", ""]
    entries = [Entry.from_json(e) for e in big["entries"]]
    ev = EvalConfig.from_json(big["evaluation"])
    lines = [f"## The bigger model: {big['model']} (from {big['path']})", "",
             machine_line(big["machine"], 2), "",
             f"{protocol_line(ev, big['n_tokens'], big['original_ppl'])} Whole files: bits/weight = every tensor's bytes / "
             f"the original's {big['n_weights'] / 1e9:.3f} B parameters (embeddings and head included, unlike the section "
             "above); tightfit's entries are `tightfit compress` folders, llama.cpp's its presets with imatrix. No held-back "
             "windows there: each class's entry is chosen on the evaluation text itself.", "",
             "### Best tightfit per size class vs llama.cpp+imatrix", "", *class_table(big["classes"]), "",
             "### Each preset vs tightfit's best at no more bits", "", *preset_table(big["presets"]), "",
             *big_grid_lines(big, entries), ""]
    return lines


def scored_on(machines: list[dict] | None) -> str:
    """A sentence naming the machines a run resumed across scored its entries on (none when one)."""
    if not machines or len({(m["cpu"], tuple(m["isa"])) for m in machines}) < 2:
        return ""
    each = "; ".join(f"{m['entries']} on {m['cpu']} ({', '.join(m['isa']) or 'no AVX'})" for m in machines)
    return (f" Entries were scored on {len(machines)} machines ({each}): the same GPTQ from the same Hessians and the same "
            "windows; the engines' arithmetic differs between ISAs only in float summation order.")


def markdown(payload: dict, entries: list[Entry]) -> str:
    ev = EvalConfig.from_json(payload["evaluation"])
    grids = grids_from_json(payload["source_grids"])
    cal = payload["calibration"]
    members = payload["members"]
    tf = sorted((e for e in entries if e.peer == "tightfit"), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight))
    rv = sorted((e for e in entries if e.peer != "tightfit"), key=lambda e: (math.isnan(e.bits_per_weight), e.bits_per_weight))
    lines = [
        f"# Format families vs llama.cpp + imatrix on {payload['model']} (one run"
        + (f", partial: {len(payload['not_measured'])} entries not measured yet)" if payload.get("not_measured") else ")"), "",
        *([f"**Partial**: the run was stopped and resumes where it stopped (bench/formats.py, from "
           f"bench/results/formats-progress.json); not measured yet: {', '.join(payload['not_measured'])}. Verdicts below "
           "are over the entries measured so far.", ""] if payload.get("not_measured") else []),
        machine_line(payload["machine"], payload.get("threads")), "",
        f"{protocol_line(ev, payload['n_tokens'], payload['original_ppl'])} Windows used: {ev.n_windows} x {ev.ctx} evaluation "
        f"windows; {payload['held_back_windows']} held-back calibration windows (never calibrated on), on which each size "
        f"class's entry is chosen. Identical token ids for every engine. "
        + ("Wall time not recorded (a report of saved progress: every entry was scored by an earlier, stopped run on "
           "the same windows)" if payload["wall_s"] is None else f"Wall time {payload['wall_s'] / 60:.1f} min"
           + (f" (this run's; {payload['resumed_entries']} entries were scored by an earlier, stopped run on the same "
              "windows and resumed)" if payload.get("resumed_entries") else ""))
        + "." + scored_on(payload.get("scored_on")), "",
        f"- **tightfit**: GPTQ of every format from the same cached Hessians of the original ({cal['n_samples']} x "
        f"{cal['seq_len']} calibration tokens of {cal['text']} text), packed, reloaded and scored through tightfit's engine (int8 activations, "
        "fp16 KV cache); bits/weight from the packed linear layers. Families from the format registry; each family's "
        f"member nearest each target (within {NEAR} bits/weight, off the source's grid).",
        f"- **{RIVAL_PEER}** {payload['llama_cpp_version']}: `llama_model_quantize` from an F32 GGUF of the original, "
        "importance matrix = diag(H)/2 of the same Hessians, token embeddings / tied head F16 (as tightfit); logits from "
        "llama.cpp itself; bits/weight from the GGUF bytes of the same linear layers.", *plan_bullet(entries), "",
        "## KL by family and target bits/weight", "",
        "Cells: format, KL (engine), (bits/weight as stored). '-': the family has no member within "
        f"{NEAR} bits/weight of the target.", "", *family_table(entries, members), "",
        "## The issue's targets", "", *map(target_line, payload["targets"]), "",
        f"## Best tightfit per size class vs {RIVAL_PEER}", "",
        "Per class, each side's entry with the lowest held-back KL, compared by evaluation KL; n/a: a side has no entry "
        "there. Entries on the source's grid are left out.", "", *class_table(payload["classes"]), "",
        "### Each preset vs tightfit's best at no more bits", "",
        f"tightfit's entry with the lowest held-back KL at no more than the preset's bits/weight (+{NO_MORE_BITS}).", "",
        *preset_table(payload["presets"]), "",
        "## Double-quantized scales (-dq)", "",
        "Group scales as signed 6-bit codes under one fp16 super-scale per 256 weights of a row, beside the same format "
        "with fp16 scales (GPTQ from the same Hessians). The -dq entries join the size classes above like any format. "
        "The engine expands -dq scales to fp16 when it loads a file: the file is smaller, memory and decode speed are "
        "the base format's.", "", *dq_table(entries), "",
        "Pareto front over every entry off the source's grid (none is both smaller and closer to the original): "
        + ", ".join(f"{e.peer} {e.name} ({e.bits_per_weight:.2f}, {e.kl:.4f})" for e in pareto_front(entries)) + ".", "",
        "## Every entry", "",
        "| peer | recipe | family | bits/weight | PPL | KL (engine) | KL (fp32 ref) | top-1 | KL held-back | quantize s | types / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in tf + rv:
        fam = family(e.name) if e.peer == "tightfit" else "-"
        if math.isnan(e.kl):
            lines.append(f"| {e.peer} | {e.name} | {fam} | - | - | - | - | - | - | - | failed: {e.note} |")
            continue
        fp32 = "-" if e.kl_fp32 is None else f"{e.kl_fp32:.4f}"
        lines.append(f"| {e.peer} | {e.name} | {fam} | {e.bits_per_weight:.3f} | {e.ppl:.3f} | {e.kl:.4f} | {fp32} | "
                     f"{e.top1:.3f} | {e.kl_held_back:.4f} | {e.quantize_seconds:.1f} | {types_note(e)} |")
    floors = payload.get("engine_floors") or {}
    lines += ["", *big_section(payload.get("big")), "## Caveats", ""]
    if floors:
        lines.append("- Engine floors, against the torch reference: " + "; ".join(
            f"{name} running the unquantized original scores KL {f['kl']:.1e}" for name, f in floors.items())
            + ". Differences below these are noise.")
    if grids:
        lines.append(grid_bullet(entries, grids))
    shadowed = sorted({m["shadowed"] for m in members if m["shadowed"]})
    if shadowed:
        lines.append(f"- Formats nearer a target that can hold the source's grid ({', '.join(shadowed)}; 4-bit asymmetric "
                     "g32 and finer are the trap) stand beside their family's cell, are no evidence and join no verdict.")
    lines += [*peer_bullets(entries),
              *([] if payload.get("per_channel") else [f"- Left out of the sweep: {LEFT_OUT}."]),
              *([f"- KL (fp32 ref): the packed file dequantized into the torch model (fp32 activations), for "
                 f"{n_fp32} of {len(tf)} tightfit entries (bench/formats.py --fp32-ref; the rest '-')."]
                if 0 < (n_fp32 := sum(e.kl_fp32 is not None for e in tf)) < len(tf) else []),
              "- KL and PPL move by a few percent between window sets; small gaps are not significant.", ""]
    return "\n".join(lines)


def verdicts(payload: dict, entries: list[Entry]) -> dict:
    """The payload's computed parts, from its entries (so --report-only recomputes them)."""
    presets = list(dict.fromkeys(e.name for e in entries if e.peer == RIVAL_PEER))
    return {"classes": class_rows(entries), "presets": preset_rows(entries, presets), "targets": target_rows(entries)}


def big_payload(path, payload: dict, entries: list[Entry]) -> dict:
    """The bigger model's section from a bench/peers_files.py payload and its entries (source grids marked)."""
    keep = ("model", "machine", "evaluation", "n_tokens", "original_ppl", "n_weights", "source_grids")
    return {"path": str(path), **{k: payload[k] for k in keep}, "entries": [e.to_json() for e in entries],
            "classes": class_rows(entries), "presets": preset_rows(entries, BIG_PRESETS)}

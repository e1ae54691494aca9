"""Every format family at 2.5 / 3.0 / 3.5 / 4.0 / 4.5 bits/weight against llama.cpp + imatrix (issue:
formats), on the default model and the same held-out windows, each scored through its own engine.

    .venv/bin/python bench/formats.py [--windows 64] [--select-windows 8] [--families 'w{b}g{g},nl4g{g}']
                                      [--llama-imatrix Q2_K,...] [--with-source-grid] [--big bench/results/peers_qwen15.json]
    .venv/bin/python bench/formats.py --list          # the formats it would measure and the time it would take
    .venv/bin/python bench/formats.py --report-only   # formats.md again from formats.json, measuring nothing
    .venv/bin/python bench/formats.py --partial       # formats.md from a stopped run's saved progress

What it measures (the machinery is bench/peers_runs.py's: its Scorer, GPTQ from the cached Hessians of the
original, llama.cpp's quantizer with an importance matrix = diag(H)/2 of the same Hessians):
- the families are the format registry's (tightfit.formats.registry.FAMILY_MEMBERS, what `tightfit
  formats` lists), named by their varying fields: w{b}g{g} (uniform asymmetric), w{b}g{g}-sym,
  nl4g{g} / nf4g{g} (fixed grids), lut4g{g} / lut4g{g}-row (learned tables per tensor / per row),
  spqr-w{b}g{g}-s3-o{o}, and any family registered later (--families: some only); per-channel
  formats are left out (formats_report.LEFT_OUT; --per-channel adds them). Of each family, the
  member nearest each target bits/weight on the model's linear layers, within 0.25, off the
  source's grid: a format nearer the target that can hold the source's grid (w4g32, spqr-w4g32 on
  the Q4_1 default model: the source-grid trap) is named beside its cell and measured only with
  --with-source-grid, never in a verdict.
- llama.cpp + imatrix types around the targets (LLAMA_IMATRIX), the issue's rivals IQ4_NL and IQ3_XXS
  among them.
- formats.md: family x target -> KL (bpw); the issue's two targets, met / not met / n/a; per size
  class (target +- 0.25) tightfit's best (chosen on held-back KL) vs llama.cpp + imatrix's; each
  preset vs tightfit's best at no more bits; every entry; caveats (machine, protocol, windows,
  source grid, llama.cpp's fallbacks, engine floors).
- the bigger model's section is rendered from a bench/peers_files.py run (--big, default
  bench/results/peers_qwen15.json when present): tightfit's compress folders vs Q2_K, IQ2_XS,
  IQ3_XXS, Q3_K_M, IQ4_XS, Q4_K_M with imatrix. To refresh it, rerun bench/peers_files.py first.

Wall time on the default model (smollm2-135m, 2 threads, machine alone; `--list` prints the same
estimate for the formats it picks): the default sweep is 22 tightfit formats and 8 llama.cpp types.
GPTQ per format ~0.5-1 min uniform, ~2 min SpQR, ~3 min nl4/nf4/lut (from bench/results/peers.json and
spqr.md; the estimate uses QUANTIZE_S; the tables' time is a guess); scoring ~1 min per tightfit
entry (engine + fp32 torch, 64 + 8 windows) and ~40 s per llama.cpp entry; the reference log-probs
~2 min: `--list` says about 110 min on an AVX-512 machine; allow 2.5 h on an AVX2 one. The run saves each
entry as it is scored (bench/results/NAME-progress.json, committed: a run longer than one session resumes
from it on the next one, with the Hessians computed again from the same calibration) and resumes from it
(--fresh: start over). It measures llama.cpp's types first (minutes), then the plans (--plans: at 3.5 by
default, the planner's answer to the 3.5 target; ~10 min for the sensitivity sweep on a 2-core AVX2 machine,
cached in .cache), then
tightfit's formats by target in the order of the issue's verdicts (4.5, 3.5, then 4.0, 3.0, 2.5), so a
stopped run has its verdicts first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_runs  # noqa: E402
from common import RESULTS, SELECT_WINDOWS, machine_info, windows_help, write_results  # noqa: E402
from formats_plans import PLAN_BUDGETS, PLAN_CANDIDATES, measure_plans, plan_name  # noqa: E402
from formats_report import (  # noqa: E402
    RIVAL_PEER, Member, big_payload, choose_members, format_bits, markdown, recipes, verdicts,
)
from peers_report import SPEED_THREADS, Entry, mark_source_grid  # noqa: E402
from source_grid import grids_from_json, grids_json, recorded_grids, source_grids  # noqa: E402

from tightfit.artifacts import config_to_json  # noqa: E402
from tightfit.errors import TightfitError  # noqa: E402
from tightfit.evaluate import EvalConfig  # noqa: E402
from tightfit.formats.files import atomic_write_json  # noqa: E402
from tightfit.formats.registry import every_format, parse_format  # noqa: E402
from tightfit.model import DEFAULT_MODEL  # noqa: E402
from tightfit.pipeline import linear_layer_shapes  # noqa: E402

LLAMA_IMATRIX = ["IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K_M", "IQ4_XS", "IQ4_NL", "Q4_K_M"]
BIG = RESULTS / "peers_qwen15.json"
# The order formats are measured in: the two targets first (a run stopped part-way has its verdicts).
TARGET_ORDER = (4.5, 3.5, 4.0, 3.0, 2.5)
# Formats measured with their -dq twin (double-quantized scales), for bits/weight saved at equal KL: the
# issue's 4.5 contenders, and g16 groups, which -dq makes affordable (w3g16-dq ~3.64 bpw).
DQ_BASES = ("w4g32-sym", "nl4g32", "w3g16", "w2g16")
# Estimated GPTQ seconds per format on the default model, by format class (the uniform ones and SpQR
# measured in bench/results/peers.json and spqr.md, the tables guessed), and scoring seconds.
QUANTIZE_S = {"QuantFormat": 50, "SpQRFormat": 120, "GridFormat": 180, "LutFormat": 180}
SCORE_S, LLAMA_S, REFERENCE_S, FISHER_S = 60, 40, 120, 240
def estimate_seconds(names: list[str], n_llama: int, plans: int = 0, candidate_sets: list[list[str]] = ()) -> float:
    gptq = lambda n: QUANTIZE_S.get(type(parse_format(n)).__name__, 180)  # noqa: E731
    # plans: per set of candidates the sweep once (every candidate, the Fisher pass and scale probes ~
    # FISHER_S), then scoring each budget
    sweeps = sum(sum(gptq(c) for c in cs) + FISHER_S for cs in candidate_sets) if plans else 0
    return REFERENCE_S + sum(gptq(n) + SCORE_S for n in names) + n_llama * LLAMA_S + sweeps + plans * len(candidate_sets) * SCORE_S


def progress_path(name: str) -> Path:
    return RESULTS / f"{name}-progress.json"


class Progress:
    """The entries scored so far by a run of this model, windows and calibration, saved (atomically)
    after each one: a stopped run resumes where it stopped, on this machine or another. `key`: what
    must match to resume; `machines`: each machine that scored entries (cpu, ISA) and how many."""

    def __init__(self, path: Path, key: dict, fresh: bool = False) -> None:
        self.path, self.key = path, key
        saved = json.loads(path.read_text()) if path.is_file() and not fresh else {}
        same = saved.get("key") == key
        self.entries = [Entry.from_json(e) for e in saved.get("entries", [])] if same else []
        self.engine_floors = saved.get("engine_floors") if same else None
        self.machines: list[dict] = saved.get("machines", []) if same else []
        self.resumed = len(self.entries)  # entries carried over from an earlier, stopped run
        here = machine_info()
        self.here = {"cpu": here["cpu"], "isa": here["isa"], "entries": 0}
        if self.entries:
            print(f"resuming: {len(self.entries)} entries already scored ({path})", flush=True)

    def has(self, peer: str, name: str) -> bool:
        return any(e.peer == peer and e.name == name for e in self.entries)

    def add(self, entries: list[Entry]) -> None:
        self.entries += entries
        self.here["entries"] += len(entries)
        self.save()

    def all_machines(self) -> list[dict]:
        """Each machine (cpu, ISA) once, with the entries it scored over every run."""
        out: list[dict] = []
        for m in self.machines + ([self.here] if self.here["entries"] else []):
            same = next((o for o in out if (o["cpu"], o["isa"]) == (m["cpu"], m["isa"])), None)
            if same:
                same["entries"] += m["entries"]
            else:
                out.append(dict(m))
        return out

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"key": self.key, "engine_floors": self.engine_floors, "machines": self.all_machines(),
                                      "entries": [e.to_json() for e in self.entries]})


def measure_formats(loaded, calibration, hessians, scorer, names: list[str], out: Path, progress: Progress,
                    fp32_ref: bool = False) -> None:
    """GPTQ of every format in `names` from `hessians` (peers_runs.run_tightfit), scored through the engine
    (fp32_ref: also the dequantized torch model, a second pass); each packed folder is deleted once scored."""
    for name in names:
        if progress.has("tightfit", name):
            continue
        entries, folders = peers_runs.run_tightfit(loaded, calibration, hessians, [name], scorer, out, fp32_ref)
        progress.add(entries)
        for folder in folders.values():
            shutil.rmtree(folder)


def measure_llama(src: Path, types: list[str], imatrix, scorer, out: Path, progress: Progress) -> None:
    """llama.cpp + imatrix of every type (peers_runs.run_llama), scored through llama.cpp; each file deleted once scored."""
    for t in types:
        if progress.has(RIVAL_PEER, t):
            continue
        entries, paths = peers_runs.run_llama(src, [t], imatrix, scorer, out, RIVAL_PEER)
        progress.add(entries)
        for path in paths.values():
            path.unlink()


def read_big(path: Path | None) -> dict | None:
    """The bigger model's section from a bench/peers_files.py JSON (None: no file)."""
    if path is None or not path.is_file():
        return None
    payload = json.loads(path.read_text())
    try:
        grids = grids_from_json(recorded_grids(payload))
    except TightfitError as e:  # an older run that did not record them, and its model is not here to read
        print(f"formats: {path} records no source grids and its model cannot be read here ({type(e).__name__}): "
              "its entries are not checked against one", flush=True)
        grids = None
    entries = [Entry.from_json(e) for e in payload["entries"]]
    if grids is not None:
        mark_source_grid(entries, grids)
    root = RESULTS.parent.parent
    shown = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
    return big_payload(shown, {**payload, "source_grids": None if grids is None else grids_json(grids)}, entries)


def members_for(loaded, families: set[str] | None, per_channel: bool) -> tuple[list[Member], tuple, list]:
    """Each family's members nearest the targets on `loaded`'s linear layers, the source's grids, the shapes."""
    grids = source_grids(loaded.source)
    shapes = list(linear_layer_shapes(loaded).values())
    return choose_members(every_format(), shapes, grids, families=families, per_channel=per_channel), grids, shapes


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=EvalConfig.n_windows, help=windows_help())
    ap.add_argument("--select-windows", type=int, default=SELECT_WINDOWS,
                    help="held-back calibration windows each size class's entry is chosen on")
    ap.add_argument("--families", default="", help="comma-separated family names (as formats.md writes them, e.g. "
                                                    "'w{b}g{g},nl4g{g}'); default: every family")
    ap.add_argument("--per-channel", action="store_true", help="let per-channel formats (w3pc, nl4pc, ...) be members too")
    ap.add_argument("--llama-imatrix", default=",".join(LLAMA_IMATRIX))
    ap.add_argument("--dq", default=",".join(DQ_BASES),
                    help="formats measured beside their -dq twin (double-quantized scales); empty: none")
    ap.add_argument("--plans", default=",".join(map(str, PLAN_BUDGETS)),
                    help="bits/weight of the plans measured after llama.cpp's types (the planner's mix of --plan-candidates); "
                         "empty: none")
    ap.add_argument("--plan-candidates", action="append",
                    help="the plans' candidate formats per linear layer, comma-separated (default: "
                         f"{','.join(PLAN_CANDIDATES)}); given again, another set, each planned at every --plans budget")
    ap.add_argument("--with-source-grid", action="store_true",
                    help="also measure the formats nearer a target that can hold the source's grid (no evidence)")
    ap.add_argument("--big", type=Path, help=f"a bench/peers_files.py results JSON for the bigger model's section "
                                             f"(default: bench/results/{BIG.name} when present)")
    ap.add_argument("--name", default="formats", help="results name in bench/results/ (empty: write nothing)")
    ap.add_argument("--fp32-ref", action="store_true", help="also score each tightfit file dequantized into the torch "
                                                             "model (the KL (fp32 ref) column; a second pass per format)")
    ap.add_argument("--fresh", action="store_true", help="ignore the saved progress (bench/results/NAME-progress.json)")
    ap.add_argument("--partial", action="store_true", help="write NAME.md from the saved progress of a stopped run, "
                                                           "measuring nothing more (the rest marked not measured)")
    ap.add_argument("--list", action="store_true", help="print the formats it would measure and the estimated time")
    ap.add_argument("--report-only", action="store_true", help="write NAME.md again from NAME.json (the bigger model's "
                                                               "section from --big when given), measuring nothing")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    families = set(split(args.families)) or None
    try:
        budgets = [float(b) for b in split(args.plans)]
        candidate_sets = [split(c) for c in args.plan_candidates or [",".join(PLAN_CANDIDATES)]]
        for c in sum(candidate_sets, []):
            parse_format(c)
    except (ValueError, TightfitError) as e:
        sys.exit(f"formats: --plans / --plan-candidates: {e}")
    if args.big is not None and not args.big.is_file():
        sys.exit(f"formats: --big {args.big} is no file (a bench/peers_files.py results JSON)")
    if args.report_only:
        return report(args.name, args.big)
    if args.list:
        from tightfit.model import load_model

        members, _, shapes = members_for(load_model(args.model), families, args.per_channel)
        return print_list(members, by_target(members, recipes(members, args.with_source_grid), dq_names(split(args.dq), shapes)),
                          split(args.llama_imatrix), budgets, candidate_sets)
    import llama_cpp

    t0 = time.time()
    loaded, calib_config, eval_config, calibration, hessians, scorer = peers_runs.prepare(args.model, args.windows, args.select_windows)
    members, grids, shapes = members_for(loaded, families, args.per_channel)
    names = by_target(members, recipes(members, args.with_source_grid), dq_names(split(args.dq), shapes))
    types = split(args.llama_imatrix)
    print_list(members, names, types, budgets, candidate_sets)
    key = {"model": args.model, "source_sha256": loaded.source.sha256(), "calibration": config_to_json(calib_config),
           "evaluation": config_to_json(eval_config), "held_back_windows": args.select_windows}
    progress = Progress(progress_path(args.name or "formats"), key, args.fresh)
    if args.partial and progress.engine_floors is None:
        sys.exit(f"formats: --partial needs a run's saved progress ({progress.path}) with this model, calibration and windows")
    with tempfile.TemporaryDirectory(dir=peers_runs.CACHE) as tmp:
        if args.partial:
            t0 = None  # measure nothing: report what the saved progress holds
        else:
            f32_dir = peers_runs.CACHE / f"f32-{key['source_sha256'][:16]}"  # this model's own F32 GGUF
            f32_dir.mkdir(parents=True, exist_ok=True)
            src = peers_runs.f32_gguf(loaded, f32_dir)
            if progress.engine_floors is None:
                progress.engine_floors = peers_runs.engine_floors(loaded, src, scorer)
                progress.save()
            measure_llama(src, types, peers_runs.imatrix_entries(loaded, hessians), scorer, Path(tmp), progress)
            for candidates in candidate_sets:
                measure_plans(args.model, loaded, calibration, hessians, scorer, budgets, candidates, Path(tmp),
                              progress, args.fp32_ref)
            measure_formats(loaded, calibration, hessians, scorer, names, Path(tmp), progress, args.fp32_ref)
    plans = [plan_name(b, candidates) for candidates in candidate_sets for b in budgets]
    wanted = set(names) | set(types) | set(plans)
    entries = mark_source_grid([e for e in progress.entries if e.name in wanted], grids)
    missing = [n for n in [*types, *names, *plans] if not any(e.name == n for e in entries)]
    payload = {
        "machine": machine_info(), "threads": SPEED_THREADS, **key, "source_grids": grids_json(grids),
        "n_tokens": scorer.count, "original_ppl": scorer.reference_ppl, "llama_cpp_version": llama_cpp.__version__,
        "engine_floors": progress.engine_floors, "per_channel": args.per_channel, "members": [m.__dict__ for m in members],
        "entries": [e.to_json() for e in entries], "wall_s": None if t0 is None else round(time.time() - t0, 1),
        "not_measured": missing,
        "resumed_entries": progress.resumed, "scored_on": progress.all_machines(), "big": read_big(args.big or BIG),
    }
    payload.update(verdicts(payload, entries))
    md = markdown(payload, entries)
    print(md)
    if args.name:
        print("wrote", *write_results(args.name, payload, md))
    return payload


def dq_names(bases: list[str], shapes) -> dict[str, float]:
    """Each base format and its -dq twin -> bits/weight on linear layers of `shapes` (a bad name or one
    with no twin: exit with why)."""
    out = {}
    for b in bases:
        for name in (b, f"{b}-dq"):
            try:
                out[name] = format_bits(parse_format(name), shapes)
            except TightfitError as e:
                sys.exit(f"formats: --dq {b}: {e}")
    return out


def by_target(members: list[Member], names: list[str], extra: dict[str, float] | None = None) -> list[str]:
    """`names` and then the `extra` formats (name -> bits/weight) not among them, in the order they are
    measured: by the first target of TARGET_ORDER they serve (an extra: the target nearest its
    bits/weight), then as given."""
    extra = extra or {}
    names = names + [n for n in extra if n not in names]
    rank = {}
    for m in members:
        r = TARGET_ORDER.index(m.target) if m.target in TARGET_ORDER else len(TARGET_ORDER)
        for n in (m.name, m.shadowed):
            if n:
                rank[n] = min(rank.get(n, r), r)
    for n in names:
        if n not in rank and n in extra:
            rank[n] = TARGET_ORDER.index(min(TARGET_ORDER, key=lambda t: abs(t - extra[n])))
    return sorted(names, key=lambda n: rank.get(n, len(TARGET_ORDER)))


def print_list(members: list[Member], names: list[str], types: list[str], plans: list[float] = (),
               candidate_sets: list[list[str]] = ()) -> None:
    for m in members:
        print(f"  {m.family:<24} {m.target}: {m.name} ({m.bpw:.3f} bpw)" + (f", {m.shadowed} on the source's grid" if m.shadowed else ""))
    minutes = estimate_seconds(names, len(types), len(plans), candidate_sets) / 60
    plan_text = (f", plans at {', '.join(f'{b:g}' for b in plans)} bits/weight from "
                 + " and from ".join(", ".join(cs) for cs in candidate_sets)) if plans else ""
    print(f"{len(names)} tightfit formats ({', '.join(names)}), {len(types)} {RIVAL_PEER} types{plan_text}: about {minutes:.0f} min",
          flush=True)


def report(name: str, big: Path | None) -> dict:
    """NAME.md again from NAME.json: source grids, verdicts and targets recomputed from the entries;
    the bigger model's section read again from `big` when given, else as saved."""
    json_path = RESULTS / f"{name}.json"
    if not json_path.is_file():
        sys.exit(f"formats: --report-only needs {json_path}: run bench/formats.py first")
    payload = json.loads(json_path.read_text())
    entries = mark_source_grid([Entry.from_json(e) for e in payload["entries"]], grids_from_json(payload["source_grids"]))
    payload["entries"] = [e.to_json() for e in entries]
    payload.update(verdicts(payload, entries))
    if big is not None:
        payload["big"] = read_big(big)
    md = markdown(payload, entries)
    print(md)
    print("wrote", *write_results(name, payload, md))
    return payload


if __name__ == "__main__":
    import torch

    torch.manual_seed(0)
    main()

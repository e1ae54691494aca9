"""`tightfit plan`, `profile` and `pareto`, and the planner flags that `compress` shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from tightfit.cli.common import (
    EVAL_TEXT_HELP,
    _add_calibration_flags,
    _add_embed_flag,
    _calibration_config,
    _float_list,
    _latency_ms,
    _positive_int,
    _size,
    _status,
)
from tightfit.errors import TightfitError


def _add_planner_flags(p: argparse.ArgumentParser) -> None:
    from tightfit.pipeline import DEFAULT_CANDIDATES
    from tightfit.runtime.engine_config import DEFAULT_KV_BITS, KV_BITS

    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help=f"planner: comma-separated candidate formats per linear layer (default {','.join(DEFAULT_CANDIDATES)})")
    _add_sensitivity_flag(p)
    p.add_argument("--work", type=Path, default=None,
                   help="planner: cache folder for Hessians, Fisher statistics, sensitivities and kernel timings (default .tightfit-cache/)")
    p.add_argument("--max-latency", type=_latency_ms, default=None,
                   help="planner: predicted decode time per token on this machine, e.g. 8ms or 750us; alone or with "
                        "--bpw/--max-size. Profiles the kernels at --threads (global flag; cached in --work)")
    p.add_argument("--predict-latency", action="store_true",
                   help="planner: profile this machine and print each layer's predicted decode ms, without a latency limit")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="planner: with --max-latency/--predict-latency, the tokens already in the KV cache when a token "
                        "is decoded: the attention's share of the time grows with it (default 32, a short chat turn)")
    p.add_argument("--kv", type=int, choices=KV_BITS, default=DEFAULT_KV_BITS, dest="kv_bits",
                   help="planner: with --max-latency/--predict-latency, the KV cache width the model will run with "
                        f"(generate/chat/serve --kv; default {DEFAULT_KV_BITS})")


def _add_sensitivity_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sensitivity", choices=("fisher", "measured", "proxy"), default="fisher",
                   help="planner: how each layer's damage in each format is scored. fisher (default): the KL increase "
                        "predicted from the Fisher information of the layer's outputs and its GPTQ error (one forward and "
                        "backward over 8 calibration windows), scaled per layer kind and format to the KL measured with "
                        "a third of the layers of that kind in that format at a time on a held-back window, the embeddings measured there "
                        "(minutes); measured: the KL increase on a held-back window "
                        "with only that layer quantized (one forward per layer and format: 20+ min for a 135M model); "
                        "proxy: the GPTQ objective alone (fastest, ranks layers poorly; embeddings stay fp16)")


def _candidates(text: str, flag: str) -> tuple[str, ...]:
    from tightfit.formats.registry import parse_format

    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    if not formats:
        raise TightfitError(f"{flag} needs at least one format")
    for f in formats:
        parse_format(f)
    return formats


def _embed_formats(args) -> tuple[str, ...]:
    """The planner's embedding candidates: the one --embed-format pins, else the defaults."""
    from tightfit.artifacts import parse_choice
    from tightfit.pipeline import DEFAULT_EMBED_CANDIDATES

    if args.embed_format is None:
        return DEFAULT_EMBED_CANDIDATES
    return (parse_choice(args.embed_format).name,)


def _plan_request(args, budget) -> "PlanRequest":
    from tightfit.pipeline import PlanRequest

    from tightfit.runtime.engine_config import DEFAULT_KV_BITS

    work = args.work or Path(".tightfit-cache")
    profile = None
    if args.max_latency is not None or args.predict_latency:
        from tightfit.runtime.engine import default_threads
        from tightfit.stages.profile import ProfileConfig

        context = {} if args.context is None else {"fixed_prompt": args.context}
        profile = ProfileConfig(threads=args.threads or default_threads(), kv_bits=args.kv_bits, **context)
    elif args.context is not None or args.kv_bits != DEFAULT_KV_BITS:
        raise TightfitError("--context and --kv describe the decode that --max-latency or --predict-latency times; "
                            "give one of those too")
    return PlanRequest(model=args.model, budget=budget, work=work, formats=_candidates(args.candidates, "--candidates"),
                       embed_formats=_embed_formats(args), sensitivity=args.sensitivity,
                       calibration=_calibration_config(args), profile=profile)


def _budget(args, loaded) -> "Budget":
    """--bpw applies to the plan's layers; --max-size to the whole file (`file_budget` takes the
    tensors outside the plan and the file header off first)."""
    from tightfit.pipeline import file_budget, pinned_embeddings
    from tightfit.stages.allocate import Budget

    if args.bpw is None and args.max_size is None and args.max_latency is None:
        raise TightfitError("the planner needs a budget: --bpw, --max-size or --max-latency (latency combines with either size)")
    if args.bpw is not None:
        if not 0 < args.bpw < 32:
            raise TightfitError(f"--bpw must lie between 0 and 32, got {args.bpw}")
        return Budget(max_bpw=args.bpw, max_latency_ms=args.max_latency)
    if args.max_size is None:
        return Budget(max_latency_ms=args.max_latency)
    return file_budget(loaded, args.max_size, args.max_latency, pinned_embeddings(_embed_formats(args), args.sensitivity))


def _print_plan(report) -> None:
    from collections import Counter

    from tightfit.stages.sensitivity import METHOD_TEXT, probes_text

    plan, table, latency = report.plan, report.sensitivity, report.latency
    ms_head = f" {'ms':>8}" if latency is not None else ""
    print(f"{'layer':<40} {'format':<10} {'bytes':>9} {'bpw':>6} {'damage':>10}{ms_head}")
    for name, fmt in plan.formats.items():
        n, k = table.shapes[name]
        choice = next(c for c in report.choices[name] if c.fmt == fmt)
        ms = f" {choice.latency_ms:>8.4f}" if latency is not None else ""
        print(f"{name:<40} {fmt.name:<10} {choice.nbytes:>9} {8 * choice.nbytes / (n * k):>6.2f} {choice.sensitivity:>10.2e}{ms}")
    mix = ", ".join(f"{f} x{c}" for f, c in Counter(f.name for f in plan.formats.values()).most_common())
    fixed = plan.budget.fixed_bytes
    outside = f" + {fixed / 1e6:.2f} MB outside the plan (norms, file header)" if fixed else ""
    print(f"plan for {plan.budget.describe()}: {plan.bits_per_weight:.3f} bits/weight, {plan.total_bytes / 1e6:.2f} MB of "
          f"planned layers{outside}; {mix}")
    outer = {n: f for n, f in plan.formats.items() if n not in table.proxy} or plan.pinned
    how = "" if not plan.pinned else ", pinned outside the plan (--embed-format, or the proxy: fp16)"
    tied = " (tied to the head: one decision)" if len(outer) == 1 else ""
    print("embeddings and head: " + ", ".join(f"{n} {f.name}" for n, f in outer.items()) + tied + how)
    unit = "nats/token" if table.method != "proxy" else "(no unit)"
    print(f"damage = {METHOD_TEXT[table.method]}; predicted total {plan.predicted_loss:.4g} {unit}")
    if table.probes:
        print(f"  ({probes_text(table.probes)})")
    if report.calibration is not None:
        print(f"calibrated on {report.calibration.config.text} ({report.calibration.describe()})")
    if latency is not None and plan.predicted_latency_ms is not None:
        fixed_ms = plan.budget.fixed_latency_ms
        print(f"predicted decode {plan.predicted_latency_ms:.3f} ms/token ({1e3 / plan.predicted_latency_ms:.1f} tok/s): "
              f"layers and head {plan.predicted_latency_ms - fixed_ms:.3f} ms + the rest (attention, norms) {fixed_ms:.3f} ms "
              f"at {latency.context} cached positions, KV{latency.kv_bits}; {latency.threads} threads on {latency.cpu}")
    agreement = table.rank_agreement()
    if agreement:
        print("proxy vs measured rank agreement (Spearman): " + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()))


def add_parsers(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="choose one format per layer under a size and/or latency budget and write the plan as JSON",
        description="Calibrate, collect each layer's Hessian and the Fisher information of its outputs, score every "
        "layer in every candidate format (by default the KL increase predicted from its GPTQ error and the Fisher "
        "information; see --sensitivity), then solve an integer program (HiGHS) for the plan with the least predicted "
        "damage within the budget. The token embeddings and an untied head are layers of the plan too (fp16, "
        "w8g32-sym, w6g32, w5g32, w4g32-sym, w3g32, w3g64, w3g128 or w2g64; --embed-format pins them). Measurements "
        "are cached in --work, so further budgets are instant. `tightfit compress MODEL --plan PLAN.json` applies it.",
        epilog="example:\n  tightfit plan smollm2-135m --bpw 3.0 --out plan-3.0.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--bpw", type=float, help="average bits per weight of the plan's layers, embeddings and head included (e.g. 3.0)")
    budget.add_argument("--max-size", type=_size, help="size of the whole packed tensor file, e.g. 60MB")
    pl.add_argument("--out", type=Path, required=True, help="where to write the plan JSON")
    _add_calibration_flags(pl)
    _add_embed_flag(pl)
    _add_planner_flags(pl)

    pr = sub.add_parser(
        "profile",
        help="time tightfit's kernels for every layer shape of MODEL in every candidate format on this machine",
        description="For each distinct linear-layer shape of MODEL and each format (the planner's candidates plus "
        "--formats), time one decode (1 row) and one prefill (64 rows) matmul of the kernel the engine runs for it: "
        "a warm-up, then the median of 5 timed calls at fixed threads (SpQR formats on the engine's SpQR kernel: "
        "quantized statistics decoded per group, outliers added as a sparse pass). Calls cycle through copies of the matrix larger than the "
        "cache, so weights stream from memory as in a real decode step. Then the whole model decodes on the engine once "
        "per format: its phase timers scale each format's kernel times to what they cost in context, and what is not a "
        "linear layer or the head (attention, norms) is the fixed part; the head (the token embeddings when tied) is "
        "timed in each embedding candidate. Also measures the read bandwidth. Timings are cached per "
        "machine, thread count and kernel version in --work: a second run is instant.",
        epilog="example:\n  tightfit profile smollm2-135m --threads 2 --out latency.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder")
    pr.add_argument("--formats", default="", help="comma-separated formats to time besides the planner's default candidates")
    pr.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's thread count)")
    pr.add_argument("--out", type=Path, default=None, help="also write the latency table as JSON to this file")
    pr.add_argument("--work", type=Path, default=None, help="cache folder of the timings (default .tightfit-cache/)")
    _add_embed_flag(pr)

    pa = sub.add_parser(
        "pareto",
        help="size, decode speed and KL of MODEL compressed at several budgets: JSON, Markdown and a figure",
        description="Compress MODEL in every candidate format uniformly and with the planner at each --budgets "
        "bits/weight, then measure each packed model's size, decode tok/s on the fast engine and KL to the original "
        "(plus the original itself in fp16). Writes DIR/pareto.json after every point (a rerun skips points already "
        "there), DIR/pareto.md and DIR/pareto.png (needs matplotlib: pip install 'tightfit[bench]'). The packed "
        "models stay in DIR/models/.",
        epilog="example:\n  tightfit pareto smollm2-135m --budgets 2.5,3,3.5,4 --method rtn --out pareto-smollm2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pa.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder")
    pa.add_argument("--budgets", default="2.5,3,3.5,4", help="comma-separated bits/weight budgets of the planned points (default 2.5,3,3.5,4)")
    pa.add_argument("--out", type=Path, required=True, help="output folder")
    pa.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="quantizer of every point (default gptq; rtn is faster)")
    _add_embed_flag(pa)
    pa.add_argument("--sequential", action="store_true",
                    help="gptq: collect each point's Hessians through its already-quantized layers, as `compress` does "
                         "(about 4x slower per point); default: the original model's Hessians, collected once into --work")
    pa.add_argument("--eval-windows", type=_positive_int, default=None, help="evaluation windows for the KL (default 8)")
    pa.add_argument("--text", default="wiki", help=EVAL_TEXT_HELP)
    pa.add_argument("--ctx", type=_positive_int, default=512, help="tokens per evaluation window (default 512)")
    pa.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens decoded per speed run (default 64)")
    pa.add_argument("--repeats", type=_positive_int, default=3, help="timed speed runs; the median is reported (default 3)")
    pa.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's thread count)")
    _add_calibration_flags(pa)
    pa.add_argument("--candidates", default=None, help="comma-separated candidate formats, each also a uniform point (default: the planner's)")
    _add_sensitivity_flag(pa)
    pa.add_argument("--work", type=Path, default=None, help="planner cache folder (default .tightfit-cache/)")


def _cmd_plan(args) -> int:
    from tightfit.formats.files import atomic_write_json
    from tightfit.model import load_model
    from tightfit.pipeline import make_plan

    loaded = load_model(args.model)
    report = make_plan(_plan_request(args, _budget(args, loaded)), loaded, on_stage=_status)
    _print_plan(report)
    atomic_write_json(args.out, report.plan.to_json())
    print(f"plan written to {args.out}")
    return 0


def _cmd_profile(args) -> int:
    from tightfit.artifacts import format_or_none, parse_choice
    from tightfit.formats.registry import parse_format
    from tightfit.model import load_model
    from tightfit.pipeline import DEFAULT_CANDIDATES, DEFAULT_EMBED_CANDIDATES, LATENCY_CACHE_FILE, linear_layer_shapes, profile_model
    from tightfit.runtime.engine import default_threads
    from tightfit.stages.profile import DENSE_KERNEL, ProfileConfig

    names = list(DEFAULT_CANDIDATES) + [f.strip() for f in args.formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(parse_format(f) for f in names))
    head_formats = [parse_choice(f) for f in DEFAULT_EMBED_CANDIDATES]
    embed = None if args.embed_format is None else format_or_none(parse_choice(args.embed_format))
    config = ProfileConfig(threads=args.threads or default_threads(), embed_format=None if embed is None else embed.name)
    work = args.work or Path(".tightfit-cache")
    _status(f"loading {args.model}")
    loaded = load_model(args.model)
    table = profile_model(loaded, formats, config, work, on_stage=_status, head_formats=head_formats)
    count = {}
    for shape in linear_layer_shapes(loaded).values():
        count[shape] = count.get(shape, 0) + 1
    print(f"{'shape NxK':<12} {'layers':>6} {'format':<20} {'kernel':<12} {'decode ms':>10} {'GB/s':>6} {'in model':>9} {'prefill ms':>11}")
    rows = [(e, count[e.shape], table.decode_ms(e.shape, e.fmt)) for e in table.entries
            if e.shape in count and parse_choice(e.fmt) in formats]
    rows += [(table.entry(table.head, f), "head", table.head_ms(f)) for f in head_formats]
    for e, layers, in_model in rows:
        nbytes = 4 * e.shape[0] * e.shape[1] if e.kernel == DENSE_KERNEL else parse_choice(e.fmt).nbytes(*e.shape).total
        print(f"{e.shape[0]:>5}x{e.shape[1]:<6} {layers:>6} {e.fmt:<20} {e.kernel:<12} "
              f"{e.decode_ms:>10.4f} {nbytes / e.decode_ms / 1e6:>6.1f} {in_model:>9.4f} {e.prefill_ms:>11.4f}")
    print(f"decode = {table.decode_m} row, prefill = {table.prefill_m} rows per call; median of {config.repeats} timed calls "
          f"after a warm-up, weights streamed from memory; GB/s = bytes of the layer read per decode call; in model = "
          f"decode ms x the format's in-context scale (the engine's own timers in a whole-model decode)")
    if table.context_scale:
        print("in-context scale  " + ", ".join(f"{k} {v:.2f}" for k, v in table.context_scale.items()) + f", head {table.head_scale:.2f}")
    if any(e.kernel == DENSE_KERNEL for e in table.entries):
        print(f"formats of kernel {DENSE_KERNEL} have no fast kernel: the engine runs them as dense fp32, and that is what is timed")
    print(f"read bandwidth    {table.bandwidth_gb_s:8.1f} GB/s ({table.threads} threads, {table.cpu})")
    print(f"whole model       {table.model_decode_ms:8.3f} ms/token decode in {table.fixed_format} (short context)")
    print(f"fixed part        {table.fixed_ms:8.3f} ms/token (attention, norms, embedding lookup, waits = whole model - its "
          "layers and head, median over the formats)")
    print(f"kernel            sha256 {table.kernel_sha256[:16]}...; timings cached in {work / LATENCY_CACHE_FILE}")
    if args.out is not None:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.out, table.to_json())
        print(f"latency table written to {args.out}")
    return 0


def _cmd_pareto(args) -> int:
    from tightfit import report as report_mod
    from tightfit.artifacts import parse_choice
    from tightfit.evaluate import FAST_WINDOWS, EvalConfig
    from tightfit.model import load_model
    from tightfit.pipeline import DEFAULT_CANDIDATES, ParetoRequest, pareto
    from tightfit.runtime.engine import default_threads

    budgets = _float_list(args.budgets, "--budgets")
    formats = _candidates(args.candidates or ",".join(DEFAULT_CANDIDATES), "--candidates")
    embed = None if args.embed_format is None else parse_choice(args.embed_format).name
    request = ParetoRequest(
        model=args.model, out=args.out, work=args.work or Path(".tightfit-cache"), threads=args.threads or default_threads(),
        budgets=budgets, formats=formats, method=args.method, calibration=_calibration_config(args),
        evaluation=EvalConfig(text=args.text, n_windows=args.eval_windows or FAST_WINDOWS, ctx=args.ctx),
        sensitivity=args.sensitivity, sequential=args.sequential, new_tokens=args.new_tokens, repeats=args.repeats,
        embed_format=embed,
    )
    _status(f"loading {args.model}")
    report = pareto(request, load_model(args.model), on_stage=_status)
    print(report_mod.markdown(report), end="")
    written = [report_mod.save_json(report, args.out), report_mod.save_markdown(report, args.out)]
    try:
        written.append(report_mod.save_figure(report, args.out))
    except ImportError:
        print("note: matplotlib is not installed, so no figure (pip install 'tightfit[bench]'); JSON and Markdown written")
    print("written: " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {"plan": _cmd_plan, "profile": _cmd_profile, "pareto": _cmd_pareto}

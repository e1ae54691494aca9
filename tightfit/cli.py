"""The `tightfit` command. The only place that parses flags, prints for people, or exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from tightfit import __version__
from tightfit.errors import TightfitError

EXAMPLES = """\
examples:
  tightfit compress smollm2-135m --format w3g64 --method gptq --out out/smollm2-w3g64
  tightfit compress smollm2-135m --bpw 3.0 --out out/smollm2-3.0     (mixed precision, planned)
  tightfit plan smollm2-135m --max-size 80MB --out plan.json
  tightfit plan smollm2-135m --bpw 4.0 --max-latency 8ms --out plan.json   (size and speed on this machine)
  tightfit profile smollm2-135m --threads 2
  tightfit pareto smollm2-135m --budgets 2.5,3,3.5,4 --method rtn --out pareto-smollm2
  tightfit eval out/smollm2-w3g64 --fast
  tightfit info out/smollm2-w3g64 --layers
  tightfit formats
"""

FORMAT_HELP = (
    "quantization format of every linear layer in the decoder blocks: "
    "w{bits}g{group} or w{bits}pc (per channel), bits in 2,3,4,5,6,8, group in 16,32,64,128; "
    "optional suffixes -sym (symmetric grid; default asymmetric with a zero point) and -bf16 "
    "(scale dtype; default fp16). Example: w3g64, w4g128-sym, w8pc. "
    "Or SpQR: spqr-w{bits}g{group}-s{stat_bits}-o{outlier_percent}, e.g. spqr-w3g16-s3-o1.0 "
    "(3-bit codes in groups of 16, scales and zeros quantized to 3 bits, at most 1%% of weights kept exact). "
    "`tightfit formats` lists them with their bits/weight."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="wiki", help="evaluation text: 'wiki' (built in, its held-out part), a .txt or .jsonl file (default: wiki)")
    p.add_argument("--windows", type=_positive_int, default=None, help="number of evaluation windows (default 64)")
    p.add_argument("--ctx", type=_positive_int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--fast", action="store_true", help="8 windows instead of 64: a quick look, not the protocol")


def _size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size like 60MB, 1.5GB or 800KiB, got {text!r}")
    unit = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}[m.group(2) or "b"]
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _latency_ms(text: str) -> float:
    """'8ms', '8.5 ms', '750us' (or µs), '0.01s' -> milliseconds; a unit is required."""
    import math
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|us|µs|s)\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a latency per token with its unit, like 8ms, 8.5ms or 750us, got {text!r}")
    value = float(m.group(1)) * {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}[m.group(2)]
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"latency must be positive, got {text!r}")
    return value


def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-text", default="wiki", help="calibration text: 'wiki' (built in, its calibration part), a .txt or .jsonl file (default: wiki)")
    p.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration windows (default 64)")
    p.add_argument("--calib-len", type=_positive_int, default=None, help="tokens per calibration window (default 512)")


def _calibration_config(args) -> "CalibrationConfig":
    from tightfit.artifacts import CalibrationConfig

    defaults = CalibrationConfig()
    return CalibrationConfig(text=args.calib_text, n_samples=args.calib_samples or defaults.n_samples,
                             seq_len=args.calib_len or defaults.seq_len)


def _add_embed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed-format", default=None,
                   help="also quantize the token embeddings (and an untied output head) to this format with "
                        "round-to-nearest, e.g. w8g64 or w6g64; default: keep them in fp16")


def _add_planner_flags(p: argparse.ArgumentParser) -> None:
    from tightfit.pipeline import DEFAULT_CANDIDATES

    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help=f"planner: comma-separated candidate formats per layer (default {','.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--slice-windows", type=int, default=1,
                   help="planner: held-back calibration windows for the measured sensitivity; 0 uses the Hessian proxy only (default 1)")
    p.add_argument("--work", type=Path, default=None,
                   help="planner: cache folder for Hessians, sensitivities and kernel timings (default .tightfit-cache/)")
    p.add_argument("--max-latency", type=_latency_ms, default=None,
                   help="planner: predicted decode time per token on this machine, e.g. 8ms or 750us; alone or with "
                        "--bpw/--max-size. Profiles the kernels at --threads (global flag; cached in --work)")
    p.add_argument("--predict-latency", action="store_true",
                   help="planner: profile this machine and print each layer's predicted decode ms, without a latency limit")
    p.add_argument("--refine", type=int, default=0, metavar="GENERATIONS",
                   help="planner: after the integer program, search around its plan for GENERATIONS rounds on the real KL "
                        "of whole plans (EvoPress: layer errors do not simply add up); about 10-20 s per round for a "
                        "135M model on 2 cores, e.g. --refine 24 (default 0: off)")
    p.add_argument("--refine-windows", type=_positive_int, default=4,
                   help="planner: held-back calibration windows on which --refine measures KL (default 4)")


def _plan_request(args, budget) -> "PlanRequest":
    from tightfit.pipeline import PlanRequest

    if args.slice_windows < 0:
        raise TightfitError(f"--slice-windows must be 0 or more, got {args.slice_windows}")
    if args.refine < 0:
        raise TightfitError(f"--refine must be 0 (off) or a number of generations, got {args.refine}")
    formats = tuple(f.strip() for f in args.candidates.split(",") if f.strip())
    from tightfit.formats.registry import parse_format

    for f in formats:
        parse_format(f)
    work = args.work or Path(".tightfit-cache")
    profile = None
    if args.max_latency is not None or args.predict_latency:
        from tightfit.runtime.engine import default_threads
        from tightfit.stages.profile import ProfileConfig

        profile = ProfileConfig(threads=args.threads or default_threads(), embed_format=getattr(args, "embed_format", None))
    refine = None
    if args.refine:
        from tightfit.algorithms.evopress import EvolutionConfig

        refine = EvolutionConfig(generations=args.refine)
    return PlanRequest(model=args.model, budget=budget, work=work, formats=formats, slice_windows=args.slice_windows,
                       calibration=_calibration_config(args), profile=profile, refine=refine,
                       refine_windows=args.refine_windows)


def _budget(args, loaded) -> "Budget":
    """--bpw applies to the quantized layers; --max-size to the whole file, so the unquantized
    tensors (kept in fp16) and the file header are taken off first."""
    from tightfit.errors import InfeasibleBudget
    from tightfit.formats.registry import parse_format
    from tightfit.model import get_module
    from tightfit.stages.allocate import Budget
    from tightfit.stages.quantize import embedding_layers, kept_tensors

    if args.bpw is None and args.max_size is None and args.max_latency is None:
        raise TightfitError("the planner needs a budget: --bpw, --max-size or --max-latency (latency combines with either size)")
    if args.bpw is not None:
        if not 0 < args.bpw < 32:
            raise TightfitError(f"--bpw must lie between 0 and 32, got {args.bpw}")
        return Budget(max_bpw=args.bpw, max_latency_ms=args.max_latency)
    if args.max_size is None:
        return Budget(max_latency_ms=args.max_latency)
    weights = {f"{loaded.arch.blocks}.{i}.{n}.weight" for i in range(loaded.model.config.num_hidden_layers) for n in loaded.arch.linear_names}
    fixed = HEADER_ALLOWANCE
    if args.embed_format is not None:
        fmt = parse_format(args.embed_format)
        for name in embedding_layers(loaded.model, loaded.arch):
            weights.add(f"{name}.weight")
            fixed += fmt.nbytes(*get_module(loaded.model, name).weight.shape).total
    fixed += sum(t.numel() * t.element_size() for t in kept_tensors(loaded.model, weights, "fp16").values())
    if args.max_size <= fixed:
        raise InfeasibleBudget(
            f"--max-size {args.max_size / 1e6:.1f} MB cannot be met: the unquantized tensors (embeddings, norms) alone "
            f"take {fixed / 1e6:.1f} MB"
        )
    return Budget(max_bytes=args.max_size - fixed, max_latency_ms=args.max_latency)


HEADER_ALLOWANCE = 200_000  # bytes of safetensors header reserved when budgeting a whole file


def _print_plan(report) -> None:
    plan, table, latency = report.plan, report.sensitivity, report.latency
    ms_head = f" {'ms':>8}" if latency is not None else ""
    print(f"{'layer':<40} {'format':<10} {'bytes':>9} {'bpw':>6} {'damage':>10}{ms_head}")
    for name, fmt in plan.formats.items():
        n, k = table.shapes[name]
        b = table.nbytes[name][fmt.name]
        ms = f" {latency.decode_ms((n, k), fmt):>8.4f}" if latency is not None else ""
        print(f"{name:<40} {fmt.name:<10} {b:>9} {8 * b / (n * k):>6.2f} {table.damage(name, fmt):>10.2e}{ms}")
    from collections import Counter

    mix = ", ".join(f"{f} x{c}" for f, c in Counter(f.name for f in plan.formats.values()).most_common())
    what = "KL increase on held-back text" if table.measured is not None else "Hessian proxy"
    print(f"plan for {plan.budget.describe()}: {plan.bits_per_weight:.3f} bits/weight, {plan.total_bytes / 1e6:.2f} MB of quantized layers; {mix}")
    print(f"damage = {what}; predicted total {plan.predicted_loss:.4g}")
    if latency is not None and plan.predicted_latency_ms is not None:
        fixed = plan.budget.fixed_latency_ms
        print(f"predicted decode {plan.predicted_latency_ms:.3f} ms/token ({1e3 / plan.predicted_latency_ms:.1f} tok/s): "
              f"layers {plan.predicted_latency_ms - fixed:.3f} ms + the rest (attention, norms, head) {fixed:.3f} ms; "
              f"{latency.threads} threads on {latency.cpu}")
    agreement = table.rank_agreement()
    if agreement:
        print("proxy vs measured rank agreement (Spearman): " + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()))
    r = report.refinement
    if r is not None:
        moved = sum(report.milp_plan.formats[n] != f for n, f in plan.formats.items())
        screen, full = r.evaluations
        print(f"refined (EvoPress, {len(r.history)} generations, {screen} + {full} plans scored): KL on held-back text "
              f"{r.start_loss:.4g} (integer program's plan) -> {r.loss:.4g}, {moved} layers changed format")


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


def _status(message: str) -> None:
    print(f"tightfit: {message}", file=sys.stderr, flush=True)


def _eval_config(args) -> "EvalConfig":
    from tightfit.evaluate import FAST_WINDOWS, EvalConfig

    windows = args.windows or (FAST_WINDOWS if args.fast else EvalConfig.n_windows)
    return EvalConfig(text=args.text, n_windows=windows, ctx=args.ctx)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tightfit",
        description="Compress a causal language model to fit a device, then evaluate it against the original.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tightfit {__version__}")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compress",
        help="quantize a model, pack it, and evaluate it against the original",
        description="Quantize every linear layer of MODEL's decoder blocks, write a packed model to --out, "
        "then evaluate it against MODEL (perplexity, KL, top-1 agreement). A killed run resumes from its "
        "last finished block when started again with the same arguments.",
        epilog="example:\n  tightfit compress smollm2-135m --format w3g64 --method gptq --out out/smollm2-w3g64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder (config.json + *.safetensors)")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--format", help=FORMAT_HELP)
    target.add_argument("--bpw", type=float, help="mixed precision: average bits per weight of the quantized layers, every overhead counted (e.g. 3.0); runs the planner")
    target.add_argument("--max-size", type=_size, help="mixed precision: size of the whole packed tensor file, e.g. 60MB or 0.5GB (MB = 10^6 bytes); runs the planner")
    target.add_argument("--plan", type=Path, help="mixed precision: a plan JSON written by `tightfit plan`")
    c.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq: error compensation from calibration Hessians (default); rtn: round to nearest with a clipping search")
    c.add_argument("--out", required=True, type=Path, help="output folder of the packed model (replaced atomically)")
    _add_calibration_flags(c)
    _add_embed_flag(c)
    c.add_argument("--damp", type=float, default=None, help="GPTQ dampening as a fraction of the mean Hessian diagonal (default 0.01)")
    c.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in their natural order")
    c.add_argument("--no-eval", action="store_true", help="skip the evaluation after packing")
    c.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    _add_planner_flags(c)
    _add_eval_flags(c)

    pl = sub.add_parser(
        "plan",
        help="choose one format per layer under a size and/or latency budget and write the plan as JSON",
        description="Calibrate, collect each layer's Hessian, measure every layer's sensitivity to every candidate "
        "format (the GPTQ proxy, and the KL increase on held-back text when only that layer is quantized), then solve "
        "an integer program (HiGHS) for the plan with the least predicted damage within the budget. Measurements are "
        "cached in --work, so further budgets are instant. `tightfit compress MODEL --plan PLAN.json` applies it.",
        epilog="example:\n  tightfit plan smollm2-135m --bpw 3.0 --out plan-3.0.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--bpw", type=float, help="average bits per weight of the quantized layers (e.g. 3.0)")
    budget.add_argument("--max-size", type=_size, help="size of the whole packed tensor file, e.g. 60MB")
    pl.add_argument("--out", type=Path, required=True, help="where to write the plan JSON")
    _add_calibration_flags(pl)
    _add_embed_flag(pl)
    _add_planner_flags(pl)

    e = sub.add_parser(
        "eval",
        help="perplexity, KL and top-1 agreement of a packed (or original) model",
        description="Evaluate PATH on the fixed protocol (held-out wiki text, 512-token windows, BOS first). "
        "With a reference model (--against, or by default the source named in a packed model's manifest) "
        "also reports KL(original || PATH) per token and top-1 agreement.",
        epilog="example:\n  tightfit eval out/smollm2-w3g64 --against smollm2-135m --fast",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("path", help="a packed model folder, or any model source")
    e.add_argument("--against", default=None, help="reference model (default: the packed model's source if found)")
    e.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")
    _add_eval_flags(e)

    i = sub.add_parser(
        "info",
        help="what a packed model holds: source, formats, bits/weight, sizes",
        epilog="example:\n  tightfit info out/smollm2-w3g64 --layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("path", help="a packed model folder")
    i.add_argument("--layers", action="store_true", help="one line per quantized layer")
    i.add_argument("--json", action="store_true", help="print the manifest summary as JSON")

    f = sub.add_parser("formats", help="list the quantization formats and their bits/weight")
    f.add_argument("--shape", default="576x1536", help="layer shape OUTxIN for the byte figures (default 576x1536)")

    x = sub.add_parser(
        "export",
        help="write a packed model for another runtime: GGUF (llama.cpp) or compressed-tensors (transformers, vLLM)",
        description="Write the packed model at PATH as --to gguf (one .gguf file for llama.cpp) or --to compressed-tensors "
        "(a folder in the pack-quantized layout that transformers and vLLM load). Each layer goes to the target type "
        "that holds its weights exactly where one exists, else to one of equal or higher precision; a table says which.",
        epilog="examples:\n  tightfit export out/smollm2-w4g32 --to gguf smollm2-w4g32.gguf\n"
        "  tightfit export out/smollm2-w4g32 --to compressed-tensors out/smollm2-w4g32-ct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument("path", help="a packed model folder")
    x.add_argument("--to", required=True, metavar="TARGET", help="gguf or compressed-tensors")
    x.add_argument("out", type=Path, help="output: a .gguf file (gguf) or a new or empty folder (compressed-tensors)")
    x.add_argument("--json", type=Path, default=None, help="also write the per-tensor mapping as JSON to this file")

    g = sub.add_parser(
        "generate",
        help="continue a prompt with a packed model, streaming the text",
        description="Tokenize PROMPT (with BOS), generate token by token and stream the text to stdout; "
        "timings go to stderr. Greedy with --temperature 0.",
        epilog='example:\n  tightfit generate out/smollm2-w3g64 "The capital of France is" --max-tokens 32 --temperature 0',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("path", help="a packed model folder")
    g.add_argument("prompt", help="the text to continue")
    _add_sampling_flags(g)
    _add_backend_flags(g)

    ch = sub.add_parser(
        "chat",
        help="talk to a packed model (its chat template), line by line on stdin",
        description="Read one user message per line from stdin and stream the replies to stdout. The conversation "
        "stays in the KV cache: each turn prefills only what is new. Commands: /reset (new conversation), /exit.",
        epilog="example:\n  tightfit chat out/smollm2-instruct-w4g32 --system 'You are terse.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ch.add_argument("path", help="a packed model folder whose tokenizer has a chat template")
    ch.add_argument("--system", default=None, help="a system message at the start of every conversation")
    _add_sampling_flags(ch)
    _add_backend_flags(ch)

    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, streaming)",
        description="Serve PATH over HTTP with OpenAI's API. Requests run one at a time on one backend; at most "
        "--max-queue wait, later ones get 503. The model is named after the folder (see GET /v1/models).",
        epilog="example:\n  tightfit serve out/smollm2-w3g64 --port 8000\n"
        "  curl localhost:8000/v1/completions -d '{\"model\": \"smollm2-w3g64\", \"prompt\": \"Hello\", \"max_tokens\": 16}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sv.add_argument("path", help="a packed model folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    sv.add_argument("--max-queue", type=_positive_int, default=8, help="requests that may wait while one runs (default 8)")
    sv.add_argument("--model-name", default=None, help="the model's name in the API (default: the folder name)")
    _add_backend_flags(sv)

    pr = sub.add_parser(
        "profile",
        help="time tightfit's kernels for every layer shape of MODEL in every candidate format on this machine",
        description="For each distinct linear-layer shape of MODEL and each format (the planner's candidates plus "
        "--formats), time one decode (1 row) and one prefill (64 rows) matmul of the kernel the engine runs for it: "
        "a warm-up, then the median of 5 timed calls at fixed threads. SpQR formats have no fast kernel yet: the engine "
        "runs them as dense fp32, so they are timed as such. Also measures the read bandwidth and the decode time of "
        "everything but the linear layers (the whole model on the engine minus its layers). Timings are cached per "
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
    pa.add_argument("--text", default="wiki", help="evaluation text: 'wiki' (built in, its held-out part), a .txt or .jsonl file (default: wiki)")
    pa.add_argument("--ctx", type=_positive_int, default=512, help="tokens per evaluation window (default 512)")
    pa.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens decoded per speed run (default 64)")
    pa.add_argument("--repeats", type=_positive_int, default=3, help="timed speed runs; the median is reported (default 3)")
    pa.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's thread count)")
    _add_calibration_flags(pa)
    pa.add_argument("--candidates", default=None, help="comma-separated candidate formats, each also a uniform point (default: the planner's)")
    pa.add_argument("--slice-windows", type=int, default=1, help="planner: held-back windows for the measured sensitivity (default 1)")
    pa.add_argument("--work", type=Path, default=None, help="planner cache folder (default .tightfit-cache/)")

    b = sub.add_parser(
        "bench",
        help="measure prefill and decode speed of a packed model on this machine, with the roofline",
        description="Prefill a random prompt, then decode greedily; report medians over --repeats runs (after one "
        "warm-up), the peak memory, the machine's read bandwidth measured in the same process, and the decode "
        "roofline: bandwidth / weight bytes read per token.",
        epilog="example:\n  tightfit bench out/smollm2-w4g32 --threads 2 --prompt-tokens 256 --new-tokens 128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("path", help="a packed model folder")
    b.add_argument("--prompt-tokens", type=_positive_int, default=256, help="prompt length to prefill (default 256)")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens to decode (default 128)")
    b.add_argument("--repeats", type=_positive_int, default=5, help="timed runs; the median is reported (default 5)")
    b.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    _add_backend_flags(b)
    return parser


def _fmt(x, spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if x is None else format(x, spec)


def _result_table(rows: list[dict]) -> str:
    head = f"{'model':<28} {'size MB':>8} {'bpw(q)':>7} {'bpw(all)':>8} {'PPL':>8} {'KL':>8} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<28} {_fmt(r.get('size_mb'), '8.2f')} {_fmt(r.get('bpw'), '7.3f')} {_fmt(r.get('bpw_all'), '8.3f')} "
            f"{_fmt(r.get('ppl'), '8.3f')} {_fmt(r.get('kl'), '8.4f')} {_fmt(r.get('top1'), '7.3f')}"
        )
    return "\n".join(lines)


def _cmd_compress(args) -> int:
    from tightfit.artifacts import CalibrationConfig, QuantizeConfig
    from collections import Counter

    from tightfit.formats.registry import parse_format
    from tightfit.model import load_model
    from tightfit.pipeline import CompressRequest, compress, make_plan
    from tightfit.stages.allocate import Plan

    given = [flag for flag, v in (("--format", args.format), ("--plan", args.plan)) if v is not None]
    if given and (args.max_latency is not None or args.predict_latency):
        flag = "--max-latency" if args.max_latency is not None else "--predict-latency"
        raise TightfitError(f"{flag} is a planner budget; it does not combine with {given[0]} (use it with or instead of --bpw/--max-size)")
    if not given and args.bpw is None and args.max_size is None and args.max_latency is None:
        raise TightfitError("compress needs one of --format, --bpw, --max-size, --max-latency or --plan")
    loaded = plan = None
    if args.format is not None:
        fmt = parse_format(args.format)
    else:
        if args.plan is not None:
            try:
                plan = Plan.from_json(json.loads(args.plan.read_text()))
            except (OSError, ValueError, TightfitError) as e:
                raise TightfitError(f"cannot read plan {args.plan}: {e}") from None
        _status(f"loading {args.model}")
        loaded = load_model(args.model)
        if plan is None:
            planned = make_plan(_plan_request(args, _budget(args, loaded)), loaded, on_stage=_status)
            _print_plan(planned)
            plan = planned.plan
        fmt = Counter(plan.formats.values()).most_common(1)[0][0]
    calibration = _calibration_config(args)
    qdefaults = QuantizeConfig(fmt=fmt)
    qconfig = dataclasses.replace(
        qdefaults, method=args.method, damp=qdefaults.damp if args.damp is None else args.damp,
        act_order=not args.no_act_order, plan=None if plan is None else dict(plan.formats),
        embed_format=None if args.embed_format is None else parse_format(args.embed_format),
    )
    if not 0 < qconfig.damp < 1:
        raise TightfitError(f"--damp must lie between 0 and 1, got {qconfig.damp}")
    request = CompressRequest(
        model=args.model, out=args.out, quantize=qconfig, calibration=calibration,
        evaluation=None if args.no_eval else _eval_config(args),
    )
    report = compress(request, loaded, on_stage=_status)
    s = report.summary
    rows = []
    ev = report.evaluation
    if ev is not None:
        rows.append({"name": f"original ({args.model})"[:28], "ppl": ev.reference_ppl})
    label = fmt.name if plan is None else f"mixed {plan.bits_per_weight:.2f}b"
    rows.append({
        "name": f"{label} {args.method}", "size_mb": s.file_bytes / 1e6, "bpw": s.bits_per_weight,
        "bpw_all": s.model_bits_per_weight, "ppl": ev and ev.ppl, "kl": ev and ev.kl, "top1": ev and ev.top1,
    })
    print(f"packed model written to {report.out}")
    print(_result_table(rows))
    if ev is not None:
        print(f"({ev.n_tokens} tokens scored; times: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items()) + ")")
    if args.json:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, {
            "out": str(report.out), "format": fmt.name, "method": args.method,
            "summary": {**dataclasses.asdict(s), "bits_per_weight": s.bits_per_weight, "model_bits_per_weight": s.model_bits_per_weight},
            "evaluation": None if ev is None else dataclasses.asdict(ev), "seconds": report.seconds,
        })
    return 0


def _cmd_eval(args) -> int:
    from tightfit.evaluate import eval_windows, evaluate
    from tightfit.model import load_model
    from tightfit.pipeline import ModelSummary, default_reference, evaluate_packed, is_packed, packed_file_bytes

    config = _eval_config(args)
    if is_packed(args.path):
        against = args.against or default_reference(Path(args.path))
        if against is None:
            print("note: the source model was not found; reporting perplexity only (use --against)", file=sys.stderr)
        reference = load_model(against) if against else None
        from tightfit.formats.packed import load_packed

        packed = load_packed(Path(args.path))
        result = evaluate_packed(Path(args.path), reference, config, packed=packed)
        summary = ModelSummary.of(packed, packed_file_bytes(Path(args.path)))
        row = {"name": Path(args.path).name[:28], "size_mb": summary.file_bytes / 1e6, "bpw": summary.bits_per_weight,
               "bpw_all": summary.model_bits_per_weight}
    else:
        loaded = load_model(args.path)
        reference = load_model(args.against) if args.against else None
        windows = eval_windows(loaded.tokenizer, config)
        result = evaluate(loaded.model, windows, reference=None if reference is None else reference.model, batch_size=config.batch_size)
        row = {"name": str(args.path)[:28]}
    rows = [{"name": f"reference ({reference.source.name})"[:28], "ppl": result.reference_ppl}] if reference else []
    rows.append({**row, "ppl": result.ppl, "kl": result.kl, "top1": result.top1})
    print(_result_table(rows))
    print(f"({result.n_tokens} tokens in {config.n_windows} windows of {config.ctx}, text {config.text}, {result.seconds:.0f}s)")
    if args.json:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, {"evaluation": dataclasses.asdict(config), "result": dataclasses.asdict(result)})
    return 0


def _cmd_info(args) -> int:
    from collections import Counter

    from tightfit.formats.packed import load_packed, read_manifest
    from tightfit.pipeline import ModelSummary, packed_file_bytes

    path = Path(args.path)
    manifest = read_manifest(path)
    packed = load_packed(path)
    summary = ModelSummary.of(packed, packed_file_bytes(path))
    if args.json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "layers"} | {"bits_per_weight": summary.bits_per_weight,
                          "model_bits_per_weight": summary.model_bits_per_weight}, indent=2))
        return 0
    src = manifest.get("source", {})
    print(f"packed model   {path}  (format v{manifest['format_version']}, tightfit {manifest['tightfit_version']})")
    print(f"source         {src.get('name')}  sha256 {str(src.get('sha256'))[:16]}...  architecture {manifest.get('architecture')}")
    q = manifest.get("quantize", {})
    print(f"method         {q.get('method')}  formats " + ", ".join(f"{f} x{n}" for f, n in Counter(e['format'] for e in manifest['layers'].values()).items()))
    print(f"quantized      {summary.quantized_weights:,} weights in {len(packed.layers)} layers, {summary.quantized_bytes:,} bytes "
          f"-> {summary.bits_per_weight:.4f} bits/weight")
    print(f"whole file     {summary.file_bytes:,} bytes for {summary.total_weights:,} weights -> {summary.model_bits_per_weight:.4f} bits/weight "
          f"(unquantized tensors in {q.get('keep_dtype')})")
    if args.layers:
        print(f"\n{'layer':<44} {'format':<12} {'shape':>11} {'bytes':>9} {'bpw':>7}")
        for name, t in packed.layers.items():
            b = t.nbytes().total
            print(f"{name:<44} {t.fmt.name:<12} {t.shape[0]:>5}x{t.shape[1]:<5} {b:>9} {8 * b / (t.shape[0] * t.shape[1]):>7.3f}")
    return 0


def _cmd_formats(args) -> int:
    from tightfit.formats import BITS, GROUP_SIZES, QuantFormat
    from tightfit.formats.spqr import SPQR_RECIPES

    try:
        n, k = (int(v) for v in args.shape.lower().split("x"))
        QuantFormat(bits=BITS[0], group_size=None).nbytes(n, k)
    except (ValueError, TightfitError):
        raise TightfitError(f"--shape must be two positive whole numbers like 576x1536, got {args.shape!r}") from None
    print(f"bits/weight for a {n}x{k} layer (codes + scales + zeros, every byte counted)")
    print(f"{'format':<16} {'bpw':>7} {'bytes':>10}")
    for bits in BITS:
        for group in GROUP_SIZES:
            for sym in (False, True):
                fmt = QuantFormat(bits=bits, group_size=group, symmetric=sym)
                print(f"{fmt.name:<16} {fmt.bits_per_weight(n, k):>7.3f} {fmt.nbytes(n, k).total:>10}")
    print(f"\nSpQR recipes (bytes at the outlier cap; a quantized layer reports its real outlier count)")
    print(f"{'format':<22} {'bpw':>7} {'bytes':>10}")
    for fmt in SPQR_RECIPES:
        print(f"{fmt.name:<22} {fmt.bits_per_weight(n, k):>7.3f} {fmt.nbytes(n, k).total:>10}")
    return 0


def _print_export(report) -> None:
    print(f"{'tensor':<44} {'format':<12} {'written as':<22} {'exact':<5} {'max |err|':>9}  note")
    for t in report.tensors:
        if t.source_format.startswith(("w", "spqr")):
            print(f"{t.name:<44} {t.source_format:<12} {t.target_type:<22} {'yes' if t.exact else 'no':<5} "
                  f"{t.max_abs_error:>9.2e}  {t.note}")
    kept = [t for t in report.tensors if not t.source_format.startswith(("w", "spqr"))]
    if kept:
        types = ", ".join(sorted({f"{t.source_format} -> {t.target_type}" for t in kept}))
        print(f"+ {len(kept)} unquantized tensors written unchanged ({types})")
    n_approx = len(report.approximate)
    verdict = "every tensor exact" if n_approx == 0 else f"{n_approx} tensor(s) approximate (see 'no' rows)"
    print(f"{report.target} ({report.architecture}) written to {report.path}: {report.nbytes / 1e6:.2f} MB, {verdict}")


def _cmd_export(args) -> int:
    from tightfit.errors import ExportError
    from tightfit.export import EXPORTERS

    target = args.to.strip().lower()
    if target not in EXPORTERS:
        raise ExportError(f"--to must be one of {', '.join(EXPORTERS)}, got {args.to!r}")
    report = EXPORTERS[target](Path(args.path), args.out)
    _print_export(report)
    if args.json:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, {"target": report.target, "path": str(report.path), "architecture": report.architecture,
                                      "bytes": report.nbytes, "tensors": [dataclasses.asdict(t) for t in report.tensors]})
    return 0


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from tightfit.runtime.generate import SamplingConfig

    d = SamplingConfig()
    p.add_argument("--max-tokens", type=_positive_int, default=None, help=f"most tokens to generate (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature, 0 = greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens, 0 = off (default off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this probability, 1 = off (default off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL penalty on tokens seen before, 1 = off (default off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "torch", "fast"), default="auto",
                   help="fast: tightfit's compiled CPU engine; torch: the transformers reference; auto: fast where it "
                        "supports the model (default auto)")
    p.add_argument("--max-positions", type=_positive_int, default=None,
                   help="KV cache capacity in tokens, prompt included (default: the model's context length; "
                        "the fast engine caps it at 4096)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: torch's thread count, normally one per core)")


def _sampling_config(args) -> "SamplingConfig":
    from tightfit.runtime.generate import SamplingConfig

    given = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "stop": None if args.stop is None else tuple(args.stop)}
    return dataclasses.replace(SamplingConfig(), **{k: v for k, v in given.items() if v is not None})


def _open_backend(path: Path, engine: str, max_positions: int | None, threads: int | None = None) -> "Backend":
    """The compiled engine where it supports the model (engine auto|fast), else the torch reference."""
    from tightfit.runtime.engine import open_backend

    return open_backend(path, engine=engine, max_positions=max_positions, threads=threads)


def _cmd_profile(args) -> int:
    from tightfit.formats.registry import parse_format
    from tightfit.formats.table import QuantFormat
    from tightfit.model import load_model
    from tightfit.pipeline import DEFAULT_CANDIDATES, LATENCY_CACHE_FILE, linear_layer_shapes, profile_model
    from tightfit.runtime.engine import default_threads
    from tightfit.stages.profile import DENSE_KERNEL, ProfileConfig

    names = list(DEFAULT_CANDIDATES) + [f.strip() for f in args.formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(parse_format(f) for f in names))
    if args.embed_format is not None:
        parse_format(args.embed_format)
    config = ProfileConfig(threads=args.threads or default_threads(), embed_format=args.embed_format)
    work = args.work or Path(".tightfit-cache")
    _status(f"loading {args.model}")
    loaded = load_model(args.model)
    table = profile_model(loaded, formats, config, work, on_stage=_status)
    layers = linear_layer_shapes(loaded)
    count = {}
    for shape in layers.values():
        count[shape] = count.get(shape, 0) + 1
    print(f"{'shape NxK':<12} {'layers':>6} {'format':<20} {'kernel':<12} {'decode ms':>10} {'GB/s':>6} {'prefill ms':>11}")
    for e in table.entries:
        fmt = parse_format(e.fmt)
        nbytes = fmt.nbytes(*e.shape).total if isinstance(fmt, QuantFormat) else 4 * e.shape[0] * e.shape[1]
        print(f"{e.shape[0]:>5}x{e.shape[1]:<6} {count[e.shape]:>6} {e.fmt:<20} {e.kernel:<12} {e.decode_ms:>10.4f} "
              f"{nbytes / e.decode_ms / 1e6:>6.1f} {e.prefill_ms:>11.4f}")
    print(f"decode = {table.decode_m} row, prefill = {table.prefill_m} rows per call; median of {config.repeats} timed calls "
          f"after a warm-up; GB/s = bytes of the layer read per decode call")
    if any(e.kernel == DENSE_KERNEL for e in table.entries):
        print("SpQR formats have no fast kernel yet: the engine runs them as dense fp32, and that is what is timed")
    print(f"read bandwidth    {table.bandwidth_gb_s:8.1f} GB/s ({table.threads} threads, {table.cpu})")
    print(f"whole model       {table.model_decode_ms:8.3f} ms/token decode in {table.fixed_format} (short context)")
    print(f"fixed part        {table.fixed_ms:8.3f} ms/token (attention, norms, embeddings, head = whole model - its layers)")
    print(f"kernel            sha256 {table.kernel_sha256[:16]}...; timings cached in {work / LATENCY_CACHE_FILE}")
    if args.out is not None:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.out, table.to_json())
        print(f"latency table written to {args.out}")
    return 0


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    import math

    values = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise TightfitError(f"{flag} must be comma-separated numbers like 2.5,3,3.5, got {text!r}") from None
        if not (math.isfinite(v) and 0 < v < 32):
            raise TightfitError(f"{flag}: each budget must lie between 0 and 32 bits/weight, got {part.strip()!r}")
        values.append(v)
    return tuple(dict.fromkeys(values))


def _cmd_pareto(args) -> int:
    from tightfit import report as report_mod
    from tightfit.evaluate import FAST_WINDOWS, EvalConfig
    from tightfit.formats.registry import parse_format
    from tightfit.model import load_model
    from tightfit.pipeline import DEFAULT_CANDIDATES, ParetoRequest, pareto
    from tightfit.runtime.engine import default_threads

    budgets = _float_list(args.budgets, "--budgets")
    formats = tuple(f.strip() for f in (args.candidates or ",".join(DEFAULT_CANDIDATES)).split(",") if f.strip())
    for f in [*formats, *([args.embed_format] if args.embed_format else [])]:
        parse_format(f)
    if args.slice_windows < 0:
        raise TightfitError(f"--slice-windows must be 0 or more, got {args.slice_windows}")
    request = ParetoRequest(
        model=args.model, out=args.out, work=args.work or Path(".tightfit-cache"), threads=args.threads or default_threads(),
        budgets=budgets, formats=formats, method=args.method, calibration=_calibration_config(args),
        evaluation=EvalConfig(text=args.text, n_windows=args.eval_windows or FAST_WINDOWS, ctx=args.ctx),
        slice_windows=args.slice_windows, sequential=args.sequential, new_tokens=args.new_tokens, repeats=args.repeats,
        embed_format=args.embed_format,
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


def _cmd_bench(args) -> int:
    from tightfit.runtime.engine import FastBackend, default_threads
    from tightfit.runtime.speed import measure_bandwidth, measure_speed

    threads = args.threads or default_threads()
    positions = args.max_positions or args.prompt_tokens + args.new_tokens
    _status(f"loading {args.path} ({args.engine} engine, {threads} threads)")
    backend = _open_backend(Path(args.path), args.engine, positions, threads)
    fast = isinstance(backend, FastBackend)
    weight_bytes = backend.weight_bytes if fast else 0
    _status("measuring read bandwidth")
    bandwidth = measure_bandwidth(threads)
    _status(f"timing {args.repeats} runs: prefill {args.prompt_tokens} tokens, decode {args.new_tokens}")
    r = measure_speed(backend, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                      threads=threads, weight_bytes=weight_bytes, bandwidth_gb_s=bandwidth)
    print(f"engine            {'fast' if fast else 'torch'}, {threads} threads")
    print(f"prefill           {r.prefill_tok_s:8.1f} tok/s  ({args.prompt_tokens} tokens, median of {args.repeats})")
    print(f"decode            {r.decode_tok_s:8.1f} tok/s  ({r.decode_ms:.2f} ms/token)")
    print(f"peak memory       {r.peak_rss_mb:8.1f} MB")
    print(f"read bandwidth    {bandwidth:8.1f} GB/s (measured now, {threads} threads)")
    if fast:
        print(f"weights/token     {weight_bytes / 1e6:8.1f} MB")
        print(f"roofline          {r.roofline_tok_s:8.1f} tok/s  -> decode at {100 * r.roofline_fraction:.0f} % of it")
        if backend.slow_layers:
            print(f"note: {len(backend.slow_layers)} layers run dense (no fast kernel for their format yet), "
                  f"e.g. {backend.slow_layers[0]}")
    if args.json is not None:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, r.to_json())
    return 0


def _open_text_model(args) -> tuple:
    """(backend, tokenizer, eos ids) of the packed model at args.path."""
    from tightfit.runtime.text import eos_token_ids, load_tokenizer

    _status(f"loading {args.path} ({args.engine} engine)")
    backend = _open_backend(Path(args.path), args.engine, args.max_positions, args.threads)
    tokenizer = load_tokenizer(Path(args.path))
    return backend, tokenizer, eos_token_ids(Path(args.path), tokenizer)


def _print_stream(stream) -> None:
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _print_speed(result) -> None:
    _status(f"{result.prompt_tokens} prompt tokens ({result.reused_tokens} cached) in {result.prefill_seconds:.2f}s, "
            f"{result.completion_tokens} generated in {result.decode_seconds:.2f}s "
            f"({result.decode_tokens_per_second:.1f} tokens/s), finish: {result.finish_reason}")


def _cmd_generate(args) -> int:
    from tightfit.runtime.generate import generate
    from tightfit.runtime.text import text_prompt_ids

    config = _sampling_config(args)
    backend, tokenizer, eos = _open_text_model(args)
    stream = generate(backend, tokenizer, text_prompt_ids(tokenizer, args.prompt), config, eos_token_ids=eos)
    _print_stream(stream)
    print()
    _print_speed(stream.result)
    return 0


def _cmd_chat(args) -> int:
    config = _sampling_config(args)
    backend, tokenizer, eos = _open_text_model(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message; /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    try:
        _chat_loop(config, backend, tokenizer, eos, start, interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def _chat_loop(config, backend, tokenizer, eos, start: list[dict], interactive: bool) -> None:
    from tightfit.runtime.generate import generate
    from tightfit.runtime.text import chat_prompt_ids

    messages, cached = list(start), None
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages, cached = list(start), None
            _status("new conversation")
            continue
        if not line.strip():
            continue
        turn = messages + [{"role": "user", "content": line}]
        ids = chat_prompt_ids(tokenizer, turn)
        if len(ids) >= backend.max_positions:
            _status(f"the conversation ({len(ids)} tokens) no longer fits the {backend.max_positions}-token cache; /reset to start over")
            continue
        stream = generate(backend, tokenizer, ids, config, eos_token_ids=eos, cached=cached)
        _print_stream(stream)
        print(flush=True)
        messages, cached = turn + [{"role": "assistant", "content": stream.result.text}], stream.result.cached_ids
        if interactive:
            _print_speed(stream.result)


def _cmd_serve(args) -> int:
    from tightfit.runtime.server import OpenAIServer, ServedModel

    backend, tokenizer, eos = _open_text_model(args)
    name = args.model_name or Path(args.path).resolve().name
    try:
        server = OpenAIServer(ServedModel(name, backend, tokenizer, eos), host=args.host, port=args.port,
                              max_queue=args.max_queue, log=_status)
    except OSError as e:
        raise TightfitError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.address
    _status(f"serving '{name}' on http://{host}:{port}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _status("stopped")
    finally:
        server.close()
    return 0


COMMANDS = {"compress": _cmd_compress, "plan": _cmd_plan, "eval": _cmd_eval, "info": _cmd_info, "formats": _cmd_formats,
            "export": _cmd_export, "generate": _cmd_generate, "chat": _cmd_chat, "serve": _cmd_serve, "bench": _cmd_bench,
            "profile": _cmd_profile, "pareto": _cmd_pareto}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. an already quantized input GGUF) as one line, like the stage messages."""
    print(f"tightfit: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():  # restores the previous handler on the way out
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except TightfitError as e:
        print(f"tightfit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tightfit: interrupted; finished blocks are kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `tightfit` command. The only place that parses flags, prints for people, or exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from tightfit import __version__
from tightfit.errors import TightfitError

EXAMPLES = """\
examples:
  tightfit compress smollm2-135m --format w3g64 --method gptq --out out/smollm2-w3g64
  tightfit compress smollm2-135m --bpw 3.0 --out out/smollm2-3.0     (mixed precision, planned)
  tightfit plan smollm2-135m --max-size 80MB --out plan.json
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
    p.add_argument("--work", type=Path, default=None, help="planner: cache folder for Hessians and sensitivities (default .tightfit-cache/)")


def _plan_request(args, budget) -> "PlanRequest":
    from tightfit.pipeline import PlanRequest

    if args.slice_windows < 0:
        raise TightfitError(f"--slice-windows must be 0 or more, got {args.slice_windows}")
    formats = tuple(f.strip() for f in args.candidates.split(",") if f.strip())
    from tightfit.formats.registry import parse_format

    for f in formats:
        parse_format(f)
    work = args.work or Path(".tightfit-cache")
    return PlanRequest(model=args.model, budget=budget, work=work, formats=formats, slice_windows=args.slice_windows,
                       calibration=_calibration_config(args))


def _budget(args, loaded) -> "Budget":
    """--bpw applies to the quantized layers; --max-size to the whole file, so the unquantized
    tensors (kept in fp16) and the file header are taken off first."""
    from tightfit.errors import InfeasibleBudget
    from tightfit.formats.registry import parse_format
    from tightfit.model import get_module
    from tightfit.stages.allocate import Budget
    from tightfit.stages.quantize import embedding_layers, kept_tensors

    if args.bpw is not None:
        if not 0 < args.bpw < 32:
            raise TightfitError(f"--bpw must lie between 0 and 32, got {args.bpw}")
        return Budget(max_bpw=args.bpw)
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
    return Budget(max_bytes=args.max_size - fixed)


HEADER_ALLOWANCE = 200_000  # bytes of safetensors header reserved when budgeting a whole file


def _print_plan(report) -> None:
    plan, table = report.plan, report.sensitivity
    print(f"{'layer':<40} {'format':<10} {'bytes':>9} {'bpw':>6} {'damage':>10}")
    for name, fmt in plan.formats.items():
        n, k = table.shapes[name]
        b = table.nbytes[name][fmt.name]
        print(f"{name:<40} {fmt.name:<10} {b:>9} {8 * b / (n * k):>6.2f} {table.damage(name, fmt):>10.2e}")
    from collections import Counter

    mix = ", ".join(f"{f} x{c}" for f, c in Counter(f.name for f in plan.formats.values()).most_common())
    what = "KL increase on held-back text" if table.measured is not None else "Hessian proxy"
    print(f"plan for {plan.budget.describe()}: {plan.bits_per_weight:.3f} bits/weight, {plan.total_bytes / 1e6:.2f} MB of quantized layers; {mix}")
    print(f"damage = {what}; predicted total {plan.predicted_loss:.4g}")
    agreement = table.rank_agreement()
    if agreement:
        print("proxy vs measured rank agreement (Spearman): " + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()))


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
    target = c.add_mutually_exclusive_group(required=True)
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
        help="choose one format per layer under a size budget and write the plan as JSON",
        description="Calibrate, collect each layer's Hessian, measure every layer's sensitivity to every candidate "
        "format (the GPTQ proxy, and the KL increase on held-back text when only that layer is quantized), then solve "
        "an integer program (HiGHS) for the plan with the least predicted damage within the budget. Measurements are "
        "cached in --work, so further budgets are instant. `tightfit compress MODEL --plan PLAN.json` applies it.",
        epilog="example:\n  tightfit plan smollm2-135m --bpw 3.0 --out plan-3.0.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("model", help="'smollm2-135m' (built in), a .gguf file, or a transformers folder")
    budget = pl.add_mutually_exclusive_group(required=True)
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


COMMANDS = {"compress": _cmd_compress, "plan": _cmd_plan, "eval": _cmd_eval, "info": _cmd_info, "formats": _cmd_formats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except TightfitError as e:
        print(f"tightfit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tightfit: interrupted; finished blocks are kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

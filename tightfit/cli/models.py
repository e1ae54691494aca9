"""`tightfit compress`, `eval`, `info`, `formats` and `export`: making, measuring and converting packed models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import sys
from pathlib import Path

from tightfit.cli.common import (
    FORMAT_HELP,
    _add_calibration_flags,
    _add_embed_flag,
    _add_eval_flags,
    _add_kv_flag,
    _add_smooth_attention_flag,
    _calibration_config,
    _eval_config,
    _fmt,
    _positive_int,
    _size,
    _status,
    _text_line,
)
from tightfit.cli.planner import _add_planner_flags, _budget, _candidates, _plan_request, _print_plan
from tightfit.errors import KernelUnavailable, TightfitError


ENGINE_HELP = ("what computes {what} logits: torch (default), the transformers reference with the packed weights "
               "dequantized and fp32 activations; fast, tightfit's compiled engine as `tightfit generate` runs it "
               "(int8 activations, fp16 KV cache; packed models only). The reference is always torch fp32")


def add_parsers(sub) -> None:
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
    target.add_argument("--bpw", type=float, help="mixed precision: average bits per weight of the planned layers (linear layers, "
                        "embeddings and head), every overhead counted (e.g. 3.0); runs the planner")
    target.add_argument("--max-size", type=_size, help="mixed precision: size of the whole packed tensor file, e.g. 60MB or 0.5GB (MB = 10^6 bytes); runs the planner")
    target.add_argument("--plan", type=Path, help="mixed precision: a plan JSON written by `tightfit plan`")
    c.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq: error compensation from calibration Hessians (default); rtn: round to nearest with a clipping search")
    c.add_argument("--out", required=True, type=Path, help="output folder of the packed model (replaced atomically)")
    _add_calibration_flags(c)
    _add_embed_flag(c)
    c.add_argument("--damp", type=float, default=None, help="GPTQ dampening as a fraction of the mean Hessian diagonal (default 0.01)")
    c.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in their natural order")
    _add_smooth_attention_flag(c)
    c.add_argument("--no-eval", action="store_true", help="skip the evaluation after packing")
    c.add_argument("--eval-engine", choices=("torch", "fast"), default=None,
                   help=ENGINE_HELP.format(what="the packed model's") + " (default: torch; fast for a model big enough to be "
                   "read one block at a time, which torch would hold whole)")
    c.add_argument("--first-blocks", type=_positive_int, default=None, metavar="N",
                   help="compress only the first N decoder blocks, a truncated model: to try a big model's whole path in "
                        "minutes (the result is not a usable model)")
    c.add_argument("--sequential", action="store_true",
                   help="with a budget: GPTQ collects its Hessians again, block by block through the already-quantized "
                        "layers (about 7x slower quantization); default: the original model's Hessians that the planner "
                        "collected (cached in --work)")
    c.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    _add_planner_flags(c)
    _add_eval_flags(c, eval_alias=True)

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
    e.add_argument("--engine", choices=("torch", "fast"), default="torch", help=ENGINE_HELP.format(what="PATH's"))
    _add_kv_flag(e)
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
    from collections import Counter

    from tightfit.artifacts import QuantizeConfig, Unquantized, format_or_none, parse_choice
    from tightfit.formats.registry import parse_format
    from tightfit.model import keep_first_blocks, load_model, open_weights, streams_by_default
    from tightfit.model.memory import memory_budget
    from tightfit.pipeline import CompressRequest, compress, make_plan
    from tightfit.pipeline.footprint import CompressSettings, CompressShapes, check_compress_memory, packed_bytes_per_weight
    from tightfit.pipeline.planning import original_hessians
    from tightfit.stages.allocate import Plan
    from tightfit.runtime.engine_config import DEFAULT_KV_BITS
    from tightfit.stages.quantize import check_smooth_attention

    given = [flag for flag, v in (("--format", args.format), ("--plan", args.plan)) if v is not None]
    if given and (args.max_latency is not None or args.predict_latency):
        flag = "--max-latency" if args.max_latency is not None else "--predict-latency"
        raise TightfitError(f"{flag} is a planner budget; it does not combine with {given[0]} (use it with or instead of --bpw/--max-size)")
    if given and (args.context is not None or args.kv_bits != DEFAULT_KV_BITS):
        raise TightfitError(f"--context and --kv describe the decode a planner's latency budget is for; they do not combine with {given[0]}")
    if not given and args.bpw is None and args.max_size is None and args.max_latency is None:
        raise TightfitError("compress needs one of --format, --bpw, --max-size, --max-latency or --plan")
    loaded = plan = hessians = ready = None
    if args.sequential and (args.format is not None or args.plan is not None):
        raise TightfitError("--sequential applies to planned compression (--bpw, --max-size, --max-latency): "
                            "--format and --plan always collect Hessians block by block")
    if args.format is not None:
        fmt = parse_format(args.format)
    if args.plan is not None:
        try:
            plan = Plan.from_json(json.loads(args.plan.read_text()))
        except (OSError, ValueError, TightfitError) as e:
            raise TightfitError(f"cannot read plan {args.plan}: {e}") from None
    calibration = _calibration_config(args)  # a bad --calib-text fails before the model loads
    weights = open_weights(args.model)
    streamed = streams_by_default(weights)
    if args.first_blocks is not None:
        weights = keep_first_blocks(weights, args.first_blocks)
    eval_engine = args.eval_engine or ("fast" if streamed else "torch")
    planned = args.format is None and plan is None
    used = ([fmt] if args.format is not None
            else [c for c in plan.formats.values() if not isinstance(c, Unquantized)] if plan is not None
            else [parse_format(f) for f in _candidates(args.candidates, "--candidates")])
    shapes = CompressShapes.of(weights, streamed=streamed)
    check_compress_memory(shapes, CompressSettings(
        calibration=calibration, evaluation=None if args.no_eval else _eval_config(args), method=args.method,
        planned=planned, original_hessians=planned and not args.sequential, eval_engine=eval_engine,
        packed_bytes_per_weight=packed_bytes_per_weight(used, shapes) if used else None,
        smooth_attention=args.smooth_attention is not None), memory_budget())
    _status(f"loading {args.model}")
    load_start = time.perf_counter()
    loaded = load_model(weights, streamed=streamed)
    load_seconds = time.perf_counter() - load_start
    if args.smooth_attention is not None:  # before any planning or calibration
        check_smooth_attention(loaded.arch)
    if loaded.streamed:
        _status(f"{args.model} is read one decoder block at a time (fp32 weights "
                f"{loaded.weights.nbytes() / 1e9:.1f} GB): only one block is in memory at once")
    if args.format is None:
        if plan is None:
            plan_request = _plan_request(args, _budget(args, loaded))
            planned = make_plan(plan_request, loaded, on_stage=_status)
            _print_plan(planned)
            plan = planned.plan
            if args.method == "gptq" and not args.sequential:
                hessians = original_hessians(loaded, plan_request.calibration, plan_request.work, True, _status)
                ready = planned.ready  # the sensitivity sweep's GPTQ results of the chosen formats, when it ran now
        fmt = Counter(plan.quantized.values()).most_common(1)[0][0]
    embed = None if args.embed_format is None else format_or_none(parse_choice(args.embed_format))
    layers = None
    if plan is not None:
        layers = plan.quantized
        if args.embed_format is not None:  # pins the embeddings and head, whatever the plan says
            layers = {n: f for n, f in layers.items() if n not in (loaded.arch.embeddings, loaded.arch.head)}
    qdefaults = QuantizeConfig(fmt=fmt)
    qconfig = dataclasses.replace(
        qdefaults, method=args.method, damp=qdefaults.damp if args.damp is None else args.damp,
        act_order=not args.no_act_order, plan=layers, embed_format=embed, smooth_attention=args.smooth_attention,
    )
    if not 0 < qconfig.damp < 1:
        raise TightfitError(f"--damp must lie between 0 and 1, got {qconfig.damp}")
    request = CompressRequest(
        model=args.model, out=args.out, quantize=qconfig, calibration=calibration,
        evaluation=None if args.no_eval else _eval_config(args),
        eval_engine=eval_engine,
    )
    report = compress(request, loaded, on_stage=_status, hessians=hessians, ready=ready)
    report.seconds["load"] = load_seconds
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
        print(f"({ev.n_tokens} tokens of {_text_line(args.text)} scored; times: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items()) + ")")
    if args.json:
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, {
            "out": str(report.out), "format": fmt.name, "method": args.method,
            "summary": {**dataclasses.asdict(s), "bits_per_weight": s.bits_per_weight, "model_bits_per_weight": s.model_bits_per_weight},
            "evaluation": None if ev is None else dataclasses.asdict(ev), "seconds": report.seconds,
        })
    return 0


def _cmd_eval(args) -> int:
    from tightfit.evaluate import eval_windows, evaluate, reference_for
    from tightfit.model import load_model
    from tightfit.pipeline import ModelSummary, default_reference, evaluate_packed, is_packed, packed_file_bytes
    from tightfit.runtime.engine_config import DEFAULT_KV_BITS

    config = _eval_config(args)
    if is_packed(args.path):
        against = args.against or default_reference(Path(args.path))
        if against is None:
            print("note: the source model was not found; reporting perplexity only (use --against)", file=sys.stderr)
        reference = load_model(against) if against else None
        from tightfit.formats.packed import load_packed

        packed = load_packed(Path(args.path))
        result = evaluate_packed(Path(args.path), reference, config, packed=packed, engine=args.engine,
                                 kv_bits=args.kv_bits)
        summary = ModelSummary.of(packed, packed_file_bytes(Path(args.path)))
        row = {"name": Path(args.path).name[:28], "size_mb": summary.file_bytes / 1e6, "bpw": summary.bits_per_weight,
               "bpw_all": summary.model_bits_per_weight}
    else:
        if args.engine != "torch":
            raise KernelUnavailable(f"the {args.engine} engine scores packed models only; pack {args.path} with "
                                    "`tightfit compress` or use --engine torch")
        if args.kv_bits != DEFAULT_KV_BITS:
            raise KernelUnavailable(f"a {args.kv_bits}-bit KV cache runs on the fast engine only, which scores packed "
                                    f"models only; use --kv {DEFAULT_KV_BITS}")
        loaded = load_model(args.path, streamed=False)  # a candidate runs whole
        reference = load_model(args.against) if args.against else None
        windows = eval_windows(loaded.tokenizer, config)
        against = None if reference is None else reference_for(reference, windows, batch_size=config.batch_size)
        result = evaluate(loaded.model, windows, reference=against, batch_size=config.batch_size)
        row = {"name": str(args.path)[:28]}
    rows = [{"name": f"reference ({reference.source.name})"[:28], "ppl": result.reference_ppl}] if reference else []
    rows.append({**row, "ppl": result.ppl, "kl": result.kl, "top1": result.top1})
    print(_result_table(rows))
    print(f"({result.n_tokens} tokens in {config.n_windows} windows of {config.ctx}, text {_text_line(config.text)}, "
          f"scored by the {args.engine} engine, {result.seconds:.0f}s)")
    if args.json:
        from tightfit.data import load_text
        from tightfit.formats.files import atomic_write_json

        atomic_write_json(args.json, {"evaluation": dataclasses.asdict(config), "text": load_text(config.text).record(),
                                      "engine": args.engine, "result": dataclasses.asdict(result)})
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
    if q.get("smooth_attention") is not None:
        print(f"SmoothAttention alpha {q['smooth_attention']}: key scales folded into the query and key projections")
    if args.layers:
        print(f"\n{'layer':<44} {'format':<12} {'shape':>11} {'bytes':>9} {'bpw':>7}")
        for name, t in packed.layers.items():
            b = t.nbytes().total
            print(f"{name:<44} {t.fmt.name:<12} {t.shape[0]:>5}x{t.shape[1]:<5} {b:>9} {8 * b / (t.shape[0] * t.shape[1]):>7.3f}")
    return 0


def _cmd_formats(args) -> int:
    from tightfit.formats import BITS, QuantFormat
    from tightfit.formats.grid import GRIDS, all_grid_formats
    from tightfit.formats.lut import all_lut_formats
    from tightfit.formats.spqr import SPQR_RECIPES
    from tightfit.formats.table import DQ, all_formats, with_dq

    try:
        n, k = (int(v) for v in args.shape.lower().split("x"))
        QuantFormat(bits=BITS[0], group_size=None).nbytes(n, k)
    except (ValueError, TightfitError):
        raise TightfitError(f"--shape must be two positive whole numbers like 576x1536, got {args.shape!r}") from None

    def table(title: str, formats, width: int = 16) -> None:
        print(title)
        print(f"{'format':<{width}} {'bpw':>7} {'bytes':>10}")
        for fmt in formats:
            print(f"{fmt.name:<{width}} {fmt.bits_per_weight(n, k):>7.3f} {fmt.nbytes(n, k).total:>10}")

    def fp16(formats):
        return [f for f in formats if f.scale_dtype == "fp16"]

    table(f"bits/weight for a {n}x{k} layer (codes + scales + zeros, every byte counted)", fp16(all_formats()))
    table(f"\nfixed non-uniform 4-bit grids, one signed scale per group ({', '.join(GRIDS)})", fp16(all_grid_formats()))
    table("\nlearned b-bit tables (2^b int8 levels fitted per layer, or per row with -row; table bytes counted)",
          fp16(all_lut_formats()))
    table(f"\ndouble-quantized scales (-dq): {DQ.code_bits}-bit scale codes under one fp16 super-scale per "
          f"{DQ.super_block} weights", with_dq(all_formats() + all_grid_formats() + all_lut_formats()))
    table("\nSpQR recipes (bytes at the outlier cap; a quantized layer reports its real outlier count)", SPQR_RECIPES,
          width=22)
    return 0


def _print_export(report) -> None:
    from tightfit.formats.grid import GRIDS
    from tightfit.formats.lut import LUT_PREFIX

    quantized = ("w", "spqr", LUT_PREFIX, *GRIDS)  # how our format names begin (kept tensors carry a dtype)
    print(f"{'tensor':<44} {'format':<12} {'written as':<22} {'exact':<5} {'max |err|':>9}  note")
    for t in report.tensors:
        if t.source_format.startswith(quantized):
            print(f"{t.name:<44} {t.source_format:<12} {t.target_type:<22} {'yes' if t.exact else 'no':<5} "
                  f"{t.max_abs_error:>9.2e}  {t.note}")
    kept = [t for t in report.tensors if not t.source_format.startswith(quantized)]
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


COMMANDS = {"compress": _cmd_compress, "eval": _cmd_eval, "info": _cmd_info, "formats": _cmd_formats,
            "export": _cmd_export}

"""Flag types, shared flags and small helpers that several `tightfit` commands use."""

from __future__ import annotations

import argparse
import sys

from tightfit.errors import TightfitError

EXAMPLES = """\
examples:
  tightfit compress smollm2-135m --format w3g64 --method gptq --out out/smollm2-w3g64
  tightfit compress smollm2-135m --bpw 3.0 --out out/smollm2-3.0     (mixed precision, planned)
  tightfit compress smollm2-135m --max-size 70MB --out out/smollm2-70mb  (the whole file, embeddings planned too)
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
    "Or a fixed non-uniform 4-bit grid with one signed scale per group: {grid}g{group} or {grid}pc, grid nl4 "
    "(llama.cpp IQ4_NL's levels) or nf4 (NormalFloat4), optional -bf16, e.g. nl4g32 (4.5 bits/weight). "
    "Or a learned table (2^bits int8 levels fitted to each layer by Hessian-weighted k-means), bits 2, 3 or 4: "
    "lut{bits}g{group} or lut{bits}pc, optional -row (a table per output row) and -bf16, e.g. lut4g32, lut3g64-row, "
    "lut2g32. "
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


EVAL_TEXT_HELP = ("evaluation text, its held-out part: 'wiki' (built in: Wikipedia intros), 'code' (built in: Python "
                  "source of this interpreter's standard library, a fixed selection of files), a .txt or .jsonl file "
                  "(default: wiki)")
# The command line's calibration text: half Wikipedia intros, half Python source (the library's
# CalibrationConfig default stays wiki; the quality benchmarks take this one). Chosen by the worse of the
# two domains' KL (issue 17): bench/results/calibration.md (every choice, one run) on smollm2-135m, the
# 1.5B model's 3.5 plan in compress_qwen15-bpw3.5-wikicode.md.
DEFAULT_CALIB_TEXT = "wiki,code"
CALIB_TEXT_HELP = ("calibration text, its calibration part: 'wiki', 'code', a .txt or .jsonl file, or a mix with shares: "
                   "'wiki,code' (half each), 'wiki:0.75,code:0.25', 'wiki,self:2048' (2048 tokens the model samples "
                   "itself, cached in the work folder; the rest wiki). A share has a decimal point, a whole number "
                   "counts tokens. Default wiki,code: calibrated on one domain, plans and GPTQ fit it and lose 2-3x "
                   "more on the other (smollm2-135m, 3.5 bits/weight: KL on code 1.51 calibrated on wiki, 0.52 on "
                   "wiki,code, at 0.57 -> 0.67 on wiki; bench/results/calibration.md)")


def _add_eval_flags(p: argparse.ArgumentParser, *, eval_alias: bool = False) -> None:
    """eval_alias: --eval-text names --text too (compress, where --calib-text sits beside it)."""
    names = ("--text", "--eval-text") if eval_alias else ("--text",)
    p.add_argument(*names, dest="text", default="wiki", help=EVAL_TEXT_HELP)
    p.add_argument("--windows", type=_positive_int, default=None, help="number of evaluation windows (default 64)")
    p.add_argument("--ctx", type=_positive_int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--fast", action="store_true", help="8 windows instead of 64: a quick look, not the protocol")


def _add_kv_flag(p: argparse.ArgumentParser) -> None:
    from tightfit.runtime.engine_config import DEFAULT_KV_BITS, KV_BITS

    p.add_argument("--kv", type=int, choices=KV_BITS, default=DEFAULT_KV_BITS, dest="kv_bits",
                   help="KV cache width in bits: 16 (fp16), or 8 / 4 (codes with fp16 scales: per token in groups "
                        "of 32 along the head, but 4-bit keys per channel over blocks of 16 positions; fast engine "
                        f"only) (default {DEFAULT_KV_BITS})")


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def _add_smooth_attention_flag(p: argparse.ArgumentParser) -> None:
    from tightfit.algorithms.smooth_attention import DEFAULT_ALPHA

    p.add_argument("--smooth-attention", type=_alpha, nargs="?", const=DEFAULT_ALPHA, default=None, metavar="ALPHA",
                   help="SmoothAttention (QServe) for a 4-bit KV cache (--kv 4): per-channel key scales max|K|^ALPHA "
                        "from the calibration windows (RoPE pairs sharing one) are folded into q_proj/k_proj and their "
                        "biases before quantization: the outputs are unchanged, the keys' channels flatter. ALPHA in "
                        f"[0, 1] (default {DEFAULT_ALPHA} when the flag is given bare); off by default; recorded in "
                        "the manifest. Not for models with q/k norms or fused q/k projections")


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
    p.add_argument("--calib-text", default=DEFAULT_CALIB_TEXT, help=CALIB_TEXT_HELP)
    p.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration windows (default 64)")
    p.add_argument("--calib-len", type=_positive_int, default=None, help="tokens per calibration window (default 512)")
    p.add_argument("--calib-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="precision of the calibration forwards (the inputs whose Hessians GPTQ uses, the Fisher pass, "
                        "the planner's scale probes; the Hessians themselves accumulate in fp64): bf16 (torch "
                        "autocast, about 2x faster forwards where the CPU has native bf16) or fp32. auto (default): "
                        "bf16 on CPUs with AVX-512 BF16 or AMX, else fp32. On smollm2-135m --max-size 70MB the two "
                        "gave KL 0.2356 (bf16) and 0.2359 (fp32)")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): --calib-dtype auto's bf16.
    Elsewhere bf16 autocast is emulated, slower than fp32."""
    from tightfit.runtime.kernels.build import cpu_fingerprint

    flags = cpu_fingerprint().rpartition("|")[2].split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _calibration_config(args) -> "CalibrationConfig":
    from tightfit.artifacts import CalibrationConfig
    from tightfit.data import parse_mix

    defaults = CalibrationConfig()
    dtype = args.calib_dtype if args.calib_dtype in ("fp32", "bf16") else ("bf16" if native_bf16() else "fp32")
    if args.calib_dtype == "bf16" and not native_bf16():
        import warnings

        warnings.warn("--calib-dtype bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): torch emulates it, about "
                      "5x slower than fp32 (measured on an AVX2 EPYC); --calib-dtype auto picks fp32 here")
    config = CalibrationConfig(text=str(parse_mix(args.calib_text)), n_samples=args.calib_samples or defaults.n_samples,
                               seq_len=args.calib_len or defaults.seq_len, forward_dtype=dtype)
    parse_mix(config.text).windows(config.n_samples, config.seq_len)  # a mix that does not fit fails before any work
    return config


def _text_line(spec: str) -> str:
    """'code (CPython 3.11.7 standard library, 123 files under ..., sha256 77527c97e28a9733...)'."""
    from tightfit.data import load_text

    record = load_text(spec).record()
    return f"{spec} ({record['origin'] + ', ' if record['origin'] else ''}sha256 {record['sha256'][:16]}...)"


def _add_embed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed-format", default=None,
                   help="the format of the token embeddings (and an untied output head), rounded to nearest, e.g. "
                        "w8g32-sym, or fp16 (unquantized). With the planner it pins them; default: the plan chooses "
                        "among fp16, w8g32-sym, w6g32, w5g32, w4g32-sym. With --format the default is fp16")


def _status(message: str) -> None:
    print(f"tightfit: {message}", file=sys.stderr, flush=True)


def _eval_config(args) -> "EvalConfig":
    from tightfit.evaluate import FAST_WINDOWS, EvalConfig

    windows = args.windows or (FAST_WINDOWS if args.fast else EvalConfig.n_windows)
    return EvalConfig(text=args.text, n_windows=windows, ctx=args.ctx)


def _fmt(x, spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if x is None else format(x, spec)


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

"""`tightfit generate`, `chat`, `serve` and `bench`: running a packed model."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from tightfit.cli.common import _add_kv_flag, _positive_int, _status
from tightfit.errors import TightfitError


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


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
    _add_kv_flag(p)


def _sampling_config(args) -> "SamplingConfig":
    from tightfit.runtime.generate import SamplingConfig

    given = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "stop": None if args.stop is None else tuple(args.stop)}
    return dataclasses.replace(SamplingConfig(), **{k: v for k, v in given.items() if v is not None})


def _open_backend(path: Path, engine: str, max_positions: int | None, threads: int | None, kv_bits: int) -> "Backend":
    """The compiled engine where it supports the model (engine auto|fast), else the torch reference."""
    from tightfit.runtime.engine import open_backend

    return open_backend(path, engine=engine, max_positions=max_positions, threads=threads, kv_bits=kv_bits)


def add_parsers(sub) -> None:
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

    from tightfit.runtime.server import ServerLimits

    limits = ServerLimits()
    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, streaming)",
        description="Serve PATH over HTTP with OpenAI's API. Requests run one at a time on one backend; at most "
        "--max-queue wait, later ones get 503; beyond --max-connections open connections, 429. A client that "
        "disconnects cancels its request. The model is named after the folder (see GET /v1/models).",
        epilog="example:\n  tightfit serve out/smollm2-w3g64 --port 8000\n"
        "  curl localhost:8000/v1/completions -d '{\"model\": \"smollm2-w3g64\", \"prompt\": \"Hello\", \"max_tokens\": 16}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sv.add_argument("path", help="a packed model folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    sv.add_argument("--max-queue", type=_positive_int, default=limits.max_queue,
                    help=f"requests that may wait while one runs (default {limits.max_queue})")
    sv.add_argument("--max-connections", type=_positive_int, default=limits.max_connections,
                    help=f"open connections at most; one more is answered 429 at once (default {limits.max_connections})")
    sv.add_argument("--request-timeout", type=_positive_seconds, default=limits.request_timeout,
                    help="seconds from a request's arrival to its last token: a request still waiting then gets 503, "
                         f"one running ends there with finish_reason 'length' (default {limits.request_timeout:g})")
    sv.add_argument("--model-name", default=None, help="the model's name in the API (default: the folder name)")
    _add_backend_flags(sv)

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


def _open_text_model(args) -> tuple:
    """(backend, tokenizer, eos ids) of the packed model at args.path."""
    from tightfit.runtime.text import eos_token_ids, load_tokenizer

    _status(f"loading {args.path} ({args.engine} engine)")
    backend = _open_backend(Path(args.path), args.engine, args.max_positions, args.threads, args.kv_bits)
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
    import signal

    from tightfit.runtime.server import OpenAIServer, ServedModel, ServerLimits

    backend, tokenizer, eos = _open_text_model(args)
    name = args.model_name or Path(args.path).resolve().name
    try:
        server = OpenAIServer(ServedModel(name, backend, tokenizer, eos), host=args.host, port=args.port,
                              limits=ServerLimits(max_queue=args.max_queue, max_connections=args.max_connections,
                                                  request_timeout=args.request_timeout), log=_status)
    except OSError as e:
        raise TightfitError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.address
    _status(f"serving '{name}' on http://{host}:{port}/v1 (Ctrl-C stops)")
    # Ctrl-C and SIGTERM stop it cleanly, also when it was started with SIGINT ignored (a background
    # job of a script: Python then never turns SIGINT into KeyboardInterrupt on its own).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _status("stopped")
    finally:
        server.close()
    return 0


def _cmd_bench(args) -> int:
    from tightfit.runtime.engine import FastBackend, default_threads
    from tightfit.runtime.speed import BandwidthProbe, measure_speed

    threads = args.threads or default_threads()
    positions = args.max_positions or args.prompt_tokens + args.new_tokens
    _status(f"loading {args.path} ({args.engine} engine, {threads} threads)")
    backend = _open_backend(Path(args.path), args.engine, positions, threads, args.kv_bits)
    fast = isinstance(backend, FastBackend)
    weight_bytes = backend.weight_bytes if fast else 0
    probe = BandwidthProbe(threads) if fast else None
    _status(f"timing {args.repeats} runs: prefill {args.prompt_tokens} tokens, decode {args.new_tokens}"
            + (", the read bandwidth measured before each" if fast else ""))
    r = measure_speed(backend, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                      threads=threads, weight_bytes=weight_bytes, probe=probe)
    print(f"engine            {'fast' if fast else 'torch'}, {threads} threads")
    print(f"prefill           {r.prefill_tok_s:8.1f} tok/s  ({args.prompt_tokens} tokens, median of {args.repeats})")
    print(f"decode            {r.decode_tok_s:8.1f} tok/s  ({r.decode_ms:.2f} ms/token)")
    print(f"peak memory       {r.peak_rss_mb:8.1f} MB")
    if fast:
        print(f"read bandwidth    {r.bandwidth_gb_s:8.1f} GB/s (median of {len(r.bandwidth_runs)} probes, one before each run, "
              f"{min(r.bandwidth_runs):.1f}-{max(r.bandwidth_runs):.1f}; {threads} threads)")
        print(f"kv cache          {backend.kv_bits} bits, {backend.kv_bytes_per_token} bytes/token (codes + scales, "
              f"all layers; {backend.kv_bytes / 1e6:.1f} MB allocated)")
        print(f"weights/token     {weight_bytes / 1e6:8.1f} MB")
        print(f"roofline          {r.roofline_tok_s:8.1f} tok/s  -> decode at {100 * r.roofline_fraction:.0f} % of it "
              "(median of the runs, each against its own probe)")
        if backend.slow_layers:
            print(f"note: {len(backend.slow_layers)} layers run dense (no fast kernel for their format yet), "
                  f"e.g. {backend.slow_layers[0]}")
    if args.json is not None:
        from tightfit.formats.files import atomic_write_json

        kv = {"kv_bits": backend.kv_bits, "kv_bytes_per_token": backend.kv_bytes_per_token} if fast else {}
        atomic_write_json(args.json, {**r.to_json(), **kv})
    return 0


COMMANDS = {"generate": _cmd_generate, "chat": _cmd_chat, "serve": _cmd_serve, "bench": _cmd_bench}

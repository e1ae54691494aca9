"""The `tightfit` command. The only place that parses flags, prints for people, or exits."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from tightfit import __version__
from tightfit.cli import models, planner, running
from tightfit.cli.common import EXAMPLES, _latency_ms, _positive_int
from tightfit.errors import TightfitError

__all__ = ["COMMANDS", "build_parser", "main", "_latency_ms"]


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
    for module in (models, planner, running):
        module.add_parsers(sub)
    return parser


COMMANDS = {**models.COMMANDS, **planner.COMMANDS, **running.COMMANDS}


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

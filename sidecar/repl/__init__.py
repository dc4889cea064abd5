"""`localmlx repl`: try the sidecar by hand, in shorthand or raw JSON-RPC.

Only the argument definitions live here, so `localmlx serve` does not import the REPL.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--no-load`, and the sidecar's setting flags (passed on to it)."""
    from ..settings import add_setting_flags

    parser.add_argument("--model", default=None,
                        help="model to load and chat with (default: the sidecar's default, demo)")
    parser.add_argument("--no-load", action="store_true",
                        help="do not load the model at start-up (the first request loads it)")
    add_setting_flags(parser)


def run(args: argparse.Namespace) -> int:
    from .main import run as run_repl

    return run_repl(args)


def main(argv: Any = None) -> int:
    from .main import main as repl_main

    return repl_main(argv)

"""`localmlx repl`: try the sidecar by hand, in shorthand or raw JSON-RPC.

Every `localmlx` command builds the REPL's parser (arguments.py), so the REPL itself (main.py)
is imported only when it runs: it imports jsonschema and the rest, which `serve` never needs.
"""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import add_arguments

__all__ = ["add_arguments", "main", "run"]


def run(args: argparse.Namespace) -> int:
    from .main import run as run_repl  # on use: see above

    return run_repl(args)


def main(argv: Any = None) -> int:
    from .main import main as repl_main  # on use: see above

    return repl_main(argv)

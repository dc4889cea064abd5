"""`localmlx repl`'s command line: its flags, the sidecar's setting flags, and the help text."""

from __future__ import annotations

import argparse

from ..settings import add_setting_flags

DESCRIPTION = """\
Chat with a model through a real sidecar, or drive the sidecar by hand. Plain lines are turns
of one conversation (/new starts over, /oneshot: each line alone); /commands (/help lists
them); a line starting with { or [ is sent as raw JSON-RPC, exactly as typed."""

EPILOG = """\
keys (on a terminal):
  Enter            send the line (Esc Enter: a newline in it)
  Tab, Up/Down     complete commands, methods and models; history
  Ctrl-C           cancel the reply in flight ($/cancelRequest); again: stop waiting for it;
                   at the prompt: drop the line
  Ctrl-D           at the prompt: exit (as /bye, /quit, exit, quit); while a reply streams:
                   cancel it, then exit
  What is typed while a reply streams is not echoed; it waits at the next prompt.

history file: ~/.localmlx/repl_history ($LOCALMLX_REPL_HISTORY overrides it)

scripted (stdin not a terminal): one command a line, # starts a comment; answers on stdout,
notes, progress and errors (each naming its input line) on stderr, no colour or bars;
--json prints one JSON object per line instead: {"line", "input", "ok", "result" | "error"}.

exit status: 0 every line succeeded (at a terminal: always, once started); 1 a line failed,
the model is not on disk, or the sidecar exited; 2 usage; 130 interrupted."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--no-load`, `--oneshot`, `--json`, the sidecar's setting flags (passed on
    to it), and the help text on keys, history and exit status."""
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None,
                        help="model to load and chat with (default: the sidecar's default, demo)")
    parser.add_argument("--no-load", action="store_true",
                        help="do not load the model at start-up (the first request loads it)")
    parser.add_argument("--oneshot", action="store_true",
                        help="each plain line is a chat of its own, not a turn of one conversation")
    parser.add_argument("--json", action="store_true",
                        help="scripted: one JSON object per input line on stdout (what it came to)")
    add_setting_flags(parser)

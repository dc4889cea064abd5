"""`localmlx repl`: try the sidecar by hand.

Spawns a real sidecar child (the same client and protocol as `localmlx demo` and Wooster),
loads the model, then reads lines: `/commands` (see /help), raw JSON-RPC (lines starting
with `{` or `[`, sent as typed, replies pretty-printed), or plain text, which is a chat
turn (a fresh one-turn chat, or a turn of one conversation in `/chat` mode).

On a terminal: line editing, history (~/.localmlx/repl_history, or $LOCALMLX_REPL_HISTORY),
tab completion, colour, a progress bar for loads; Ctrl-C cancels the request in flight,
Ctrl-D exits. With stdin not a terminal it reads commands line by line and prints plain
text: answers to stdout, notes and summaries to stderr; the exit status is 1 when any
command failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import __version__
from . import repl_format as fmt
from .client import SidecarExited, sidecar_command
from .repl_commands import QuitRepl, load_model, refresh_model_names, run_line
from .repl_session import ReplSession
from .repl_state import ReplState
from .repl_wire import ReplClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--no-load`, and the sidecar's setting flags (passed on to it)."""
    from .settings import add_setting_flags

    parser.add_argument("--model", default=None,
                        help="model to load and chat with (default: the sidecar's default, demo)")
    parser.add_argument("--no-load", action="store_true",
                        help="do not load the model at start-up (the first request loads it)")
    add_setting_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localmlx repl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def sidecar_env(args: argparse.Namespace) -> dict[str, str]:
    """The setting flags given, as the LOCALMLX_* variables the sidecar reads."""
    from .settings import _fields

    env = {}
    for f, setting in _fields():
        value = getattr(args, f.name, None)
        if value is not None:
            env[setting.env] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return env


def _interactive() -> bool:
    return sys.stdin.isatty()


def _make_io(state: ReplState) -> tuple[Any, Any]:
    if _interactive():
        from .repl_input import TerminalInput
        from .repl_output import RichOutput

        return TerminalInput(state), RichOutput()
    from .repl_input import ScriptInput
    from .repl_output import PlainOutput

    return ScriptInput(), PlainOutput()


def _start(session: ReplSession, args: argparse.Namespace) -> bool:
    """initialize, learn the methods and models, load the model. False: no session."""
    state, client = session.state, session.client
    result = session.request("initialize", {"protocolVersion": 1, "clientInfo": {
        "name": "localmlx-repl", "version": __version__}})
    if result is None:
        return False
    session.output.info(fmt.banner(result["serverInfo"], client.process.pid))
    state.server_defaults = result.get("defaults", {})
    state.model = args.model or state.server_defaults.get("model", "demo")
    state.methods = sorted({*result["capabilities"]["methods"], *_client_notifications()})
    refresh_model_names(session)
    if not args.no_load:
        load_model(session, state.model)
    return True


def _client_notifications() -> list[str]:
    from .schema import protocol_schema

    notifications = protocol_schema().get("notifications", {})
    return [name for name, spec in notifications.items() if spec.get("direction") == "client"]


def _loop(session: ReplSession, reader: Any) -> None:
    while True:
        session.show_late()
        session.check_alive()
        try:
            line = reader.read(session.state)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in any shell
            if not _interactive():
                raise
            continue
        try:
            run_line(session, line)
        except KeyboardInterrupt:  # between waits: the command is dropped, the session goes on
            session.output.end_text()
            session.failed("interrupted")


def run(args: argparse.Namespace) -> int:
    state = ReplState()
    reader, output = _make_io(state)
    try:
        client = ReplClient(sidecar_command(), env=sidecar_env(args))
    except OSError as exc:
        output.error(f"cannot start the sidecar: {exc}")
        return 1
    session = ReplSession(client, output, state)
    if getattr(reader, "history_note", None):
        output.info(reader.history_note)
    code = 0
    try:
        if not _start(session, args):
            return 1
        if _interactive():
            output.info("Type /help for commands; plain text chats with the model; Ctrl-D exits.")
        _loop(session, reader)
    except (EOFError, QuitRepl):
        pass
    except KeyboardInterrupt:
        code = 130
    except (SidecarExited, OSError) as exc:  # OSError: a broken pipe to it
        output.error(str(exc))
        output.lines([f"  sidecar: {line}" for line in list(client.stderr_lines)[-10:]])
        code = 1
    finally:
        output.end_text()
        session.close()
    if code == 0 and state.had_errors and not _interactive():
        code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

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

from .. import __version__
from . import formatting as fmt
from ..client import SidecarExited, sidecar_command
from ..settings import env_from_args
from .commands import QuitRepl, load_model, refresh_model_names, run_line
from .session import ReplSession
from .state import ReplState
from .wire import ReplClient
from . import add_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localmlx repl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def _interactive() -> bool:
    return sys.stdin.isatty()


def _make_io(state: ReplState) -> tuple[Any, Any]:
    if _interactive():
        from .prompt import TerminalInput
        from .output import RichOutput

        return TerminalInput(state), RichOutput()
    from .prompt import ScriptInput
    from .output import PlainOutput

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
    from ..schema import protocol_schema

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
        client = ReplClient(sidecar_command(), env=env_from_args(args))
    except OSError as exc:
        output.error(f"cannot start the sidecar: {exc}")
        return 1
    session = ReplSession(client, output, state)
    if getattr(reader, "history_note", None):
        output.info(reader.history_note)
    try:
        code = _serve(session, reader, args)
    finally:
        output.end_text()
        _close(session)
    if code == 0 and state.had_errors and not _interactive():
        return 1
    return code


def _serve(session: ReplSession, reader: Any, args: argparse.Namespace) -> int:
    """Start-up, then the loop: how it ended, as an exit status."""
    client, output = session.client, session.output
    try:
        if not _start(session, args):
            return 1
        if _interactive():
            output.info("Type /help for commands; plain text chats with the model; Ctrl-D exits.")
        _loop(session, reader)
    except (EOFError, QuitRepl):
        return 0
    except KeyboardInterrupt:
        return 130
    except (SidecarExited, BrokenPipeError) as exc:
        if client.alive and not isinstance(exc, SidecarExited):
            raise  # our own stdout went away, not the sidecar
        output.error(f"the sidecar exited (code {client.wait_or_kill()})")
        for line in list(client.stderr_lines)[-10:]:
            output.info(f"  sidecar: {line}")
        return 1
    return 0


def _close(session: ReplSession) -> None:
    try:
        session.close()
    except KeyboardInterrupt:  # impatient: no clean shutdown, but still reaped
        session.client.process.kill()
        session.client.process.wait()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

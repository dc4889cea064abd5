"""`localmlx repl`: try the sidecar by hand.

Spawns a real sidecar child (the same client and protocol as `localmlx demo` and Wooster),
loads the model (offering to download one that is not on disk), then reads lines:
`/commands` (see /help), raw JSON-RPC (lines starting with `{` or `[`, sent as typed,
replies pretty-printed), or plain text: a turn of one conversation (`/new` starts over,
`/oneshot` makes each line a chat of its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..client import SidecarExited, sidecar_command
from ..protocol_defs import MODEL_NOT_FOUND, PROTOCOL_VERSION
from ..schema import protocol_schema
from ..settings import env_from_args
from . import formatting as fmt
from .arguments import add_arguments
from .commands import QuitRepl, download, load, refresh_model_names, run_line
from .output import PlainOutput
from .prompt import ScriptInput
from .session import ReplSession
from .state import ReplState
from .wire import ReplClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localmlx repl")
    add_arguments(parser)
    return parser


def _interactive() -> bool:
    return sys.stdin.isatty()


def _make_io(state: ReplState, json_lines: bool) -> tuple[Any, Any]:
    if _interactive():
        from .terminal import RichOutput, TerminalInput  # only here: a script never imports rich, prompt_toolkit

        return TerminalInput(state), RichOutput()
    # --json: stdout carries only the JSON lines; what would be printed there goes to stderr
    return ScriptInput(), PlainOutput(out=sys.stderr if json_lines else None)


def _start(session: ReplSession, reader: Any, args: argparse.Namespace) -> bool:
    """initialize, learn the methods and models, load the model. False: no session."""
    state, client = session.state, session.client
    result = session.request("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {
        "name": "localmlx-repl", "version": __version__}})
    if result is None:
        return False
    session.output.info(fmt.banner(result["serverInfo"], client.process.pid))
    state.server_defaults = result.get("defaults", {})
    state.max_line_bytes = result.get("limits", {}).get("maxLineBytes")  # what an /image must fit in
    state.model = args.model or state.server_defaults.get("model", "demo")
    state.methods = sorted({*result["capabilities"]["methods"], *_client_notifications()})
    state.chat_mode = not args.oneshot
    refresh_model_names(session)
    if not args.no_load and not load(session, state.model) and \
            (session.error or {}).get("code") == MODEL_NOT_FOUND:
        return _offer_download(session, reader, state.model)
    if state.model == "demo":
        session.output.info(fmt.DEMO_NOTE)
    return True


def _offer_download(session: ReplSession, reader: Any, model: str) -> bool:
    """A model that is not on disk: say how to get it; on a terminal, offer to fetch it now."""
    output = session.output
    if "/" not in model or Path(model).expanduser().exists():
        output.info("/models (or `localmlx models list`) shows the models on disk")
        return False
    how = f"localmlx models pull {model}"
    if not _interactive():
        output.info(f"{model} is not on disk: `{how}` downloads it (or /pull {model} in the REPL)")
        return False
    if not reader.confirm(f"{model} is not on disk. Download it from the Hugging Face Hub now? [y/N] "):
        output.info(f"not downloaded: `{how}` fetches it later")
        return False
    return download(session, model) and load(session, model)


def _client_notifications() -> list[str]:
    notifications = protocol_schema().get("notifications", {})
    return [name for name, spec in notifications.items() if spec.get("direction") == "client"]


def _loop(session: ReplSession, reader: Any, json_lines: bool) -> None:
    while True:
        session.show_late()
        session.check_alive()
        try:
            line = reader.read(session.state)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in any shell
            if not _interactive():
                raise
            continue
        session.begin_line(getattr(reader, "line_number", None))
        try:
            run_line(session, line)
        except KeyboardInterrupt:  # between waits: the command is dropped, the session goes on
            session.client.abandon_pending()
            session.output.progress_done()
            session.output.end_text()
            session.failed("interrupted")
        if json_lines and line.strip():
            _print_json_line(session, reader.line_number, line)
        if session.quit_requested:  # Ctrl-D while the reply streamed
            raise EOFError


def _print_json_line(session: ReplSession, number: int, line: str) -> None:
    """`--json`: what one input line came to, as one JSON object on stdout."""
    record = {"line": number, "input": line, "ok": session.error is None}
    record.update({"error": session.error} if session.error is not None else {"result": session.result})
    sys.stdout.write(json.dumps(record) + "\n")  # ASCII: a line that was not UTF-8 cannot break it
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    if args.json and _interactive():
        print("localmlx repl: --json is for scripts (stdin not a terminal)", file=sys.stderr)
        return 2
    state = ReplState()
    reader, output = _make_io(state, args.json)
    try:
        client = ReplClient(sidecar_command(), env=env_from_args(args))
    except OSError as exc:
        output.error(f"cannot start the sidecar: {exc}")
        return 1
    session = ReplSession(client, output, state)
    session.keys = reader.keys
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
        if not _start(session, reader, args):
            return 1
        if _interactive():
            output.info("Plain text chats with the model (the conversation is kept; /new starts over). "
                        "/help lists commands; Ctrl-C cancels a reply; Ctrl-D or /bye exits.")
        _loop(session, reader, args.json)
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

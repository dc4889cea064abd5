"""Where typed lines come from: a prompt_toolkit prompt on a terminal (line editing,
persistent history, tab completion), or stdin line by line when scripted.

Both raise EOFError at the end (Ctrl-D) and KeyboardInterrupt for Ctrl-C at the prompt.
While a reply streams, `TypeAhead` keeps the terminal from echoing what is typed into it.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from .commands import command_names, completion_kind, is_raw_json
from .state import ReplState, setting_names

HISTORY_ENV = "LOCALMLX_REPL_HISTORY"
_METHOD_IN_JSON = re.compile(r'"method"\s*:\s*"([^"]*)$')


def history_path() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or "~/.localmlx/repl_history").expanduser()


def candidates(text: str, state: ReplState) -> tuple[str, list[str]]:
    """What the text before the cursor could become: (the prefix being completed, words)."""
    if is_raw_json(text):
        match = _METHOD_IN_JSON.search(text)
        return (match.group(1), state.methods) if match else ("", [])
    if not text.startswith("/"):
        return "", []
    name, space, arg = text[1:].partition(" ")
    if not space:
        return text, ["/" + n for n in command_names()]
    if " " in arg:  # only the first argument completes
        return "", []
    kind = completion_kind(name)
    words = {"model": state.model_names, "setting": setting_names(), "method": state.methods,
             "command": command_names()}.get(kind, []) if isinstance(kind, str) else list(kind or ())
    return arg, words


def matching(prefix: str, words: Iterable[str]) -> list[str]:
    return sorted({w for w in words if w.startswith(prefix)})


class ScriptInput:
    """stdin, one command a line; `#` lines are comments. Bytes that are not UTF-8 survive
    as surrogate escapes, so a raw line reaches the sidecar exactly as it was written."""

    keys = None  # nothing is typed while a reply streams

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream or sys.stdin.buffer
        self.line_number = 0  # of the line last read, counting comments and blank lines

    def read(self, state: ReplState) -> str:
        while True:
            line = self.stream.readline().decode("utf-8", "surrogateescape")
            if not line:
                raise EOFError
            self.line_number += 1
            if not line.lstrip().startswith("#"):
                return line.rstrip("\r\n")


_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|.)?")


class TypeAhead:
    """While a reply streams: the terminal neither echoes keys nor waits for Enter (Ctrl-C
    still interrupts). Typed text is kept for the next prompt (Enter, arrows and other keys
    are dropped, so nothing runs unseen); `poll()` reads it and counts the Ctrl-Ds."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self.eofs = 0
        self._saved: Any = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __enter__(self) -> "TypeAhead":
        import termios

        self.eofs = 0
        try:
            self._saved = termios.tcgetattr(self.fd)
        except termios.error:
            return self
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ECHO | termios.ICANON)
        mode[3] |= termios.NOFLSH  # Ctrl-C must not throw away what was typed ahead
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        import termios

        if self._saved is not None:
            self.poll()
            termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            self._saved = None

    def poll(self) -> int:
        """Take in what was typed; how many Ctrl-Ds so far."""
        while self._saved is not None and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 4096)
            if not data:
                break
            self._take(self._decoder.decode(data))
        return self.eofs

    def _take(self, typed: str) -> None:
        for char in _ESCAPE_SEQUENCE.sub("", typed):
            if char == "\x04":
                self.eofs += 1
            elif char in "\x7f\x08":
                self.text = self.text[:-1]
            elif char == "\x15":  # Ctrl-U
                self.text = ""
            elif char.isprintable():
                self.text += char


class TerminalInput:
    def __init__(self, state: ReplState) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.styles import Style

        self.history_note: str | None = None
        self.keys = TypeAhead(sys.stdin.fileno())
        self.session: Any = PromptSession(
            history=self._history(), completer=_completer(state),
            complete_while_typing=False, auto_suggest=AutoSuggestFromHistory(),
            key_bindings=_key_bindings(),
            style=Style.from_dict({"model": "ansicyan bold", "mode": "ansiyellow"}))

    def _history(self) -> Any:
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        except OSError as exc:
            self.history_note = f"history not saved ({path}: {exc.strerror})"
            return InMemoryHistory()
        return FileHistory(str(path))

    def read(self, state: ReplState) -> str:
        model, _, mode = state.prompt_label().partition(" ")
        message = [("class:model", model)] + ([("class:mode", " " + mode)] if mode else []) + [("", "> ")]
        typed, self.keys.text = self.keys.text, ""
        return self.session.prompt(message, default=typed)

    def confirm(self, question: str) -> bool:
        """A y/N question, outside the history; Ctrl-C or Ctrl-D is no."""
        from prompt_toolkit import prompt

        try:
            return prompt(question).strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False


def _completer(state: ReplState) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class ReplCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Completion]:
            prefix, words = candidates(document.text_before_cursor, state)
            for word in matching(prefix, words):
                yield Completion(word, start_position=-len(prefix))

    return ReplCompleter()


def _key_bindings() -> Any:
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return bindings

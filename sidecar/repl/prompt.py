"""Where typed lines come from when scripted (stdin line by line), and the completion a
terminal offers (terminal.TerminalInput: line editing, persistent history, tab completion).

Both inputs raise EOFError at the end (Ctrl-D) and KeyboardInterrupt for Ctrl-C at the prompt.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .commands import PROFILE_ACTIONS, command_names, completion_kind, is_raw_json
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
    kind = completion_kind(name)
    if kind == "path":  # the whole argument, a path with spaces, else its last word
        words = path_candidates(arg)
        if words or " " not in arg:
            return arg, words
        prefix = arg.rpartition(" ")[2]
        return prefix, path_candidates(prefix)
    if " " in arg:  # only the first argument completes, and the profile after `/profile use|rm|save`
        action, _, rest = arg.partition(" ")
        named = kind == "profile" and action in PROFILE_ACTIONS and " " not in rest
        return (rest, state.profile_names) if named else ("", [])
    words = {"model": [*state.model_names, *state.profile_names], "setting": setting_names(),
             "method": state.methods, "command": command_names(),
             "profile": [*PROFILE_ACTIONS, *state.profile_names]}.get(kind, []) \
        if isinstance(kind, str) else list(kind or ())
    return arg, words


def path_candidates(prefix: str) -> list[str]:
    """The files and folders `prefix` may go on to name, as typed (`~/Pic` -> `~/Pictures/`);
    hidden ones only once a `.` is typed."""
    head, _, start = prefix.rpartition("/")
    folder = Path((head or "/") if prefix.startswith("/") else head or ".").expanduser()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    lead = f"{head}/" if "/" in prefix else ""
    return [f"{lead}{e.name}{'/' if _is_dir(e) else ''}" for e in entries
            if e.name.startswith(start) and (start.startswith(".") or not e.name.startswith("."))]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


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

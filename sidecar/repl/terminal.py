"""The REPL at a terminal: prompt_toolkit reads the lines (editing, persistent history, tab
completion) and rich prints the replies (word-wrapped, a spinner until the first token,
reasoning dimmed, progress bars). Imported only when stdin is a terminal: a script never pays
for rich and prompt_toolkit.

While a reply streams, `TypeAhead` keeps the terminal from echoing what is typed into it.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import sys
import termios
from collections.abc import Iterable
from typing import Any

from prompt_toolkit import PromptSession, prompt
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.json import JSON
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import formatting as fmt
from .output import ARROWS, wire_text
from .prompt import candidates, history_path, matching
from .state import ReplState

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

    def __enter__(self) -> TypeAhead:
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
        self.history_note: str | None = None
        self.keys = TypeAhead(sys.stdin.fileno())
        self.session: Any = PromptSession(
            history=self._history(), completer=_completer(state),
            complete_while_typing=False, auto_suggest=AutoSuggestFromHistory(),
            key_bindings=_key_bindings(),
            style=Style.from_dict({"model": "ansicyan bold", "mode": "ansiyellow"}))

    def _history(self) -> Any:
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
        return str(self.session.prompt(message, default=typed))

    def confirm(self, question: str) -> bool:
        """A y/N question, outside the history; Ctrl-C or Ctrl-D is no."""
        try:
            return prompt(question).strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False


def _completer(state: ReplState) -> Any:
    class ReplCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Completion]:
            prefix, words = candidates(document.text_before_cursor, state)
            for word in matching(prefix, words):
                yield Completion(word, start_position=-len(prefix))

    return ReplCompleter()


def _key_bindings() -> Any:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


class RichOutput:
    def __init__(self, console: Any = None) -> None:
        self.console = console or Console(highlight=False)
        self._progress: Any = None
        self._task: Any = None
        self._mid_line = False
        self._reasoning = False  # the streamed text on screen is reasoning
        self._spinning = False  # the progress display is the spinner before the first token
        self._wrap: fmt.WordWrap | None = None  # the streamed text's line, on a terminal

    def at_line(self, number: int | None) -> None:
        pass

    def _stream(self, chunk: str) -> str:
        """Streamed text as it goes on screen: word-wrapped to the terminal's width."""
        if not self.console.is_terminal:
            self._mid_line = not chunk.endswith("\n")
            return chunk
        if self._wrap is None:
            self._wrap = fmt.WordWrap(self.console.width)
        text = self._wrap.feed(chunk)
        self._mid_line = not self._wrap.at_line_start
        return text

    def _print(self, *renderables: Any, **kwargs: Any) -> None:
        if self._wrap is not None:  # the word held back, then a fresh line
            self.console.file.write(self._wrap.flush())
            self._wrap = None
        if self._mid_line:
            self.console.file.write("\n")
            self._mid_line = False
        self._reasoning = False
        self.console.print(*renderables, **kwargs)

    def info(self, text: str) -> None:
        self._print(text, style="cyan", markup=False)

    def summary(self, text: str) -> None:
        self._print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        self._print(f"error: {text}", style="bold red", markup=False)

    def rpc_error(self, error: dict[str, Any]) -> None:
        first, *rest = fmt.error_lines(error)
        self._print(first, style="bold red", markup=False)
        for line in rest:
            self._print(line, style="red", markup=False)

    def text(self, chunk: str) -> None:
        self.progress_done()
        if self._reasoning:  # the answer starts on a line of its own, below the reasoning
            self._print("")
        self.console.file.write(self._stream(fmt.visible(chunk)))
        self.console.file.flush()

    def reasoning(self, chunk: str) -> None:
        """Streamed reasoning: dimmed, after a `thinking:` label, apart from the answer."""
        self.progress_done()
        if not self._reasoning:
            self._print(Text("thinking:", style="dim bold"))
            self._reasoning = True
        self.console.print(Text(self._stream(fmt.visible(chunk)), style="dim italic"), end="", soft_wrap=True)

    def tool_call(self, call: dict[str, Any]) -> None:
        self.progress_done()
        self._print(Text(fmt.tool_call_line(call), style="bold red" if call.get("error") else "bold yellow"))

    def end_text(self) -> None:
        if self._mid_line:
            self._print("")
        self._wrap = None

    def value(self, value: Any) -> None:
        self._print(JSON.from_data(value, indent=2, ensure_ascii=False), soft_wrap=True)

    def notification(self, value: Any) -> None:
        self._print(JSON.from_data(value, indent=None, ensure_ascii=False), soft_wrap=True)

    def traffic(self, direction: str, value: Any) -> None:
        arrow = Text(ARROWS[direction] + " ", style="bold magenta" if direction == "out" else "bold green")
        body = JSONHighlighter()(Text(wire_text(value)))  # the bytes as they travel, coloured
        self._print(arrow + body, soft_wrap=True)

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self._print(line, markup=False)

    def table(self, table: fmt.Table) -> None:
        headers, rows = table
        view = Table(*headers, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            view.add_row(*row)
        self._print(view)

    def waiting(self, what: str) -> None:
        """A spinner and the time taken, until the first token (or progress) arrives."""
        if not self.console.is_terminal:
            return
        self.progress_done()
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        self._task = self._progress.add_task(what, total=None)
        self._progress.start()
        self._spinning = True

    def progress(self, params: dict[str, Any]) -> None:
        if self._spinning or not self.console.is_terminal:
            self.progress_done()
        if not self.console.is_terminal:
            return
        phase = str(params.get("phase", ""))
        fields = {"description": "processing prompt" if phase == "prefill" else phase,
                  "completed": params.get("completed", 0),
                  "total": params.get("total"),
                  "detail": fmt.training_progress(params)}  # fine-tuning: losses, tokens/s, ETA
        if self._progress is None:
            self._start_progress(params.get("unit") == "bytes", fields)
        else:
            self._progress.update(self._task, **fields)

    def _start_progress(self, in_bytes: bool, fields: dict[str, Any]) -> None:
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description:<12}"), BarColumn()]
        columns += [DownloadColumn(), TransferSpeedColumn()] if in_bytes else [MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[detail]}")]
        self._progress = Progress(*columns, console=self.console, transient=True)
        self._task = self._progress.add_task(**fields)
        self._progress.start()

    def progress_done(self) -> None:
        self._spinning = False
        if self._progress is not None:
            progress, self._progress = self._progress, None
            progress.stop()

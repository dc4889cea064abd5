"""What the REPL prints: coloured with rich on a terminal, plain text when scripted.

Both outputs have the same methods. The plain one writes the answers (model text, tool
calls, JSON, tables) to stdout and everything about them (notes, summaries, progress,
errors, a model's reasoning) to stderr, so `... | localmlx repl > out.txt` keeps just the
answers; its errors name the input line they come from. On a terminal replies are
word-wrapped, a spinner turns until the first token, reasoning is dimmed and set apart from
the answer that follows; spinners and progress bars are drawn only there.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from . import formatting as fmt

ARROWS = {"out": "→", "in": "←"}


class PlainOutput:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._phase: str | None = None
        self._mid_line = False
        self._mid_reasoning = False  # streamed reasoning on stderr, its line not ended yet
        self._where = ""  # "line 3: ", what error messages start with

    def at_line(self, number: int | None) -> None:
        self._where = "" if number is None else f"line {number}: "

    def waiting(self, what: str) -> None:
        pass

    def _end_lines(self) -> None:
        if self._mid_line:  # never glue a note onto streamed text
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
        if self._mid_reasoning:
            self.err.write("\n")
            self.err.flush()
            self._mid_reasoning = False

    def _write(self, stream: TextIO, text: str) -> None:
        self._end_lines()
        stream.write(text + "\n")
        stream.flush()

    def info(self, text: str) -> None:
        self._write(self.err, text)

    def summary(self, text: str) -> None:
        self._write(self.err, text)

    def error(self, text: str) -> None:
        self._write(self.err, f"{self._where}error: {text}")

    def rpc_error(self, error: dict[str, Any]) -> None:
        first, *rest = fmt.error_lines(error)
        for line in [self._where + first, *rest]:
            self._write(self.err, line)

    def text(self, chunk: str) -> None:
        if self._mid_reasoning:
            self._end_lines()
        self.out.write(chunk)
        self.out.flush()
        self._mid_line = not chunk.endswith("\n")

    def reasoning(self, chunk: str) -> None:
        """Streamed reasoning, on stderr, each of its lines after `[reasoning] `."""
        for piece in chunk.splitlines(keepends=True):
            if not self._mid_reasoning:
                self._end_lines()
                self.err.write("[reasoning] ")
            self.err.write(piece)
            self._mid_reasoning = not piece.endswith("\n")
        self.err.flush()

    def tool_call(self, call: dict[str, Any]) -> None:
        self._write(self.out, fmt.tool_call_line(call))

    def end_text(self) -> None:
        if self._mid_line or self._mid_reasoning:
            self._end_lines()

    def value(self, value: Any) -> None:
        self._write(self.out, json.dumps(value, indent=2, ensure_ascii=False))

    def notification(self, value: Any) -> None:
        self._write(self.out, fmt.compact_json(value))

    def traffic(self, direction: str, value: Any) -> None:
        self._write(self.out, f"{ARROWS[direction]} {_wire_text(value)}")

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self._write(self.out, line)

    def table(self, table: fmt.Table) -> None:
        self.lines(fmt.plain_table(table))

    def progress(self, params: dict[str, Any]) -> None:
        if params.get("phase") != self._phase:  # one line per phase is plenty for a log
            self._phase = params.get("phase")
            total = params.get("total")
            self._write(self.err, f"  {self._phase}: {params.get('completed')}"
                                  f"{'' if total is None else f'/{total}'} {params.get('unit', '')}")

    def progress_done(self) -> None:
        self._phase = None


class RichOutput:
    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

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
        from rich.text import Text

        self.progress_done()
        if not self._reasoning:
            self._print(Text("thinking:", style="dim bold"))
            self._reasoning = True
        self.console.print(Text(self._stream(fmt.visible(chunk)), style="dim italic"), end="", soft_wrap=True)

    def tool_call(self, call: dict[str, Any]) -> None:
        from rich.text import Text

        self.progress_done()
        self._print(Text(fmt.tool_call_line(call), style="bold red" if call.get("error") else "bold yellow"))

    def end_text(self) -> None:
        if self._mid_line:
            self._print("")
        self._wrap = None

    def value(self, value: Any) -> None:
        from rich.json import JSON

        self._print(JSON.from_data(value, indent=2, ensure_ascii=False), soft_wrap=True)

    def notification(self, value: Any) -> None:
        from rich.json import JSON

        self._print(JSON.from_data(value, indent=None, ensure_ascii=False), soft_wrap=True)

    def traffic(self, direction: str, value: Any) -> None:
        from rich.highlighter import JSONHighlighter
        from rich.text import Text

        arrow = Text(ARROWS[direction] + " ", style="bold magenta" if direction == "out" else "bold green")
        body = JSONHighlighter()(Text(_wire_text(value)))  # the bytes as they travel, coloured
        self._print(arrow + body, soft_wrap=True)

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self._print(line, markup=False)

    def table(self, table: fmt.Table) -> None:
        from rich.table import Table

        headers, rows = table
        view = Table(*headers, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            view.add_row(*row)
        self._print(view)

    def waiting(self, what: str) -> None:
        """A spinner and the time taken, until the first token (or progress) arrives."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
                  "total": params.get("total")}
        if self._progress is None:
            self._start_progress(params.get("unit") == "bytes", fields)
        else:
            self._progress.update(self._task, **fields)

    def _start_progress(self, in_bytes: bool, fields: dict[str, Any]) -> None:
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

        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description:<12}"), BarColumn()]
        columns += [DownloadColumn(), TransferSpeedColumn()] if in_bytes else [MofNCompleteColumn()]
        columns.append(TimeElapsedColumn())
        self._progress = Progress(*columns, console=self.console, transient=True)
        self._task = self._progress.add_task(**fields)
        self._progress.start()

    def progress_done(self) -> None:
        self._spinning = False
        if self._progress is not None:
            progress, self._progress = self._progress, None
            progress.stop()


def _wire_text(value: Any) -> str:
    """A message as it travels: bytes are shown as sent, without the newline."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\r\n")
    return fmt.compact_json(value)

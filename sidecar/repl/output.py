"""What the REPL prints when scripted: plain text (on a terminal, terminal.RichOutput prints
the same with rich).

Both outputs have the same methods. The plain one writes the answers (model text, tool
calls, JSON, tables) to stdout and everything about them (notes, summaries, progress,
errors, a model's reasoning) to stderr, so `... | localmlx repl > out.txt` keeps just the
answers; its errors name the input line they come from. On a terminal replies are
word-wrapped, a spinner turns until the first token, reasoning is dimmed and set apart from
the answer that follows; spinners and progress bars are drawn only there.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

from . import formatting as fmt

ARROWS = {"out": "→", "in": "←"}


class PlainOutput:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._phase: str | None = None
        self._val_loss: float | None = None  # fine-tuning: the validation loss last shown
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
        self._write(self.out, f"{ARROWS[direction]} {wire_text(value)}")

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
        elif params.get("unit") == "iteration" and (params.get("valLoss") != self._val_loss  # fine-tuning:
                                                   or params.get("completed") == params.get("total")):
            self._val_loss = params.get("valLoss")  # a line per evaluation, and the last
            self._write(self.err, f"  iteration {params.get('completed')}/{params.get('total')}: "
                                  f"{fmt.training_progress(params)}")

    def progress_done(self) -> None:
        self._phase = None
        self._val_loss = None


def wire_text(value: Any) -> str:
    """A message as it travels: bytes are shown as sent, without the newline, but for the
    payload of a long data URL (an `/image`: megabytes of base64 say nothing on a screen)."""
    if isinstance(value, bytes):
        return _elide_data_urls(value.decode("utf-8", "replace").rstrip("\r\n"))
    return _elide_data_urls(fmt.compact_json(value))


_DATA_URL = re.compile(r"(data:[\w.+/-]*;base64,[A-Za-z0-9+/]{24})([A-Za-z0-9+/=]{40,})")


def _elide_data_urls(text: str) -> str:
    """`data:image/png;base64,iVBORw0KGgo…` then how much was left out, still a JSON string."""
    return _DATA_URL.sub(lambda m: f"{m.group(1)}…[{len(m.group(2))} more base64 characters]", text)

"""NDJSON over raw file descriptors: the stdout guard, line framing, one reader and one writer.

Knows nothing of JSON-RPC or models: bytes in, lines out; messages in, bytes out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("localmlx.transport")


def claim_stdout() -> int:
    """Keep the real stdout for the wire and point fd 1 at stderr.

    Must run before anything (MLX, mlx-lm, a C library, a child process) can print:
    afterwards a stray print lands in the log, never on the wire.
    """
    sys.stdout.flush()
    wire_fd = os.dup(1)  # non-inheritable: child processes never see the wire
    os.dup2(2, 1)
    return wire_fd


@dataclass(frozen=True)
class OversizedLine:
    """A line that passed the size cap; its head is kept to recover the request id."""

    head: bytes
    limit: int


class LineFramer:
    """Splits a byte stream on b"\\n" before any decoding, with a cap on line length.

    An oversized line is reported once, as soon as it passes the cap, and the rest of it
    is discarded up to its newline; the stream then goes on.
    """

    HEAD_BYTES = 4096

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | OversizedLine]:
        frames: list[bytes | OversizedLine] = []
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
            else:
                self._take(bytes(self._buffer[start:end]), frames)
            start = end + 1
        del self._buffer[:start]
        if self._discarding:
            self._buffer.clear()
        elif len(self._buffer) > self.max_line_bytes + self._buffer.endswith(b"\r"):  # \r\n may be split
            frames.append(OversizedLine(bytes(self._buffer[: self.HEAD_BYTES]), self.max_line_bytes))
            self._buffer.clear()
            self._discarding = True
        return frames

    def finish(self) -> list[bytes | OversizedLine]:
        """At end of input: an unterminated last line still counts."""
        frames: list[bytes | OversizedLine] = []
        if not self._discarding and self._buffer:
            self._take(bytes(self._buffer), frames)
        self._buffer.clear()
        return frames

    def _take(self, line: bytes, frames: list[bytes | OversizedLine]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line_bytes:
            frames.append(OversizedLine(line[: self.HEAD_BYTES], self.max_line_bytes))
        elif line.strip():
            frames.append(line)


def _exact_number(value: Any) -> Any:
    """orjson's hook for the types it does not know: a JsonNumber id goes out as its text."""
    text = getattr(value, "text", None)
    if type(value).__name__ == "JsonNumber" and isinstance(text, str):
        return orjson.Fragment(text)
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_message(message: Any) -> bytes:
    """One wire line. Lone surrogates (which a JS client may send and we may echo) are
    not valid UTF-8, so those messages fall back to ASCII-escaped JSON."""
    try:
        return orjson.dumps(message, default=_exact_number, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        pass
    numbers: list[str] = []

    def placeholder(value: Any) -> str:
        numbers.append(value.text)
        return f"\x00{len(numbers) - 1}\x00"

    text = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=placeholder)
    for index, number in enumerate(numbers):
        text = text.replace(f'"\\u0000{index}\\u0000"', number)
    return (text + "\n").encode()


class InputGate:
    """Bounds what is read from stdin ahead of being handled: lines handed to the session
    but not yet dispatched (a few dozen, up to `max_bytes`), and answers the client has not
    read yet (`output` backlog). Past either bound the reader stops reading, and the
    client's writes wait in the OS pipe instead of piling up in our memory."""

    OUTPUT_BACKLOG_BYTES = 16 << 20

    def __init__(self, max_lines: int, max_bytes: int, output: Any = None) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._output = output  # an Outbox: `wait_until_below(bytes)`
        self._changed = threading.Condition()
        self.lines = 0
        self.bytes = 0

    def enter(self, size: int) -> Callable[[], None]:
        """Wait for a place (one line of `size` bytes); returns its release, callable once."""
        if self._output is not None:
            self._output.wait_until_below(self.OUTPUT_BACKLOG_BYTES)
        with self._changed:
            while self.lines and (self.lines >= self.max_lines or self.bytes + size > self.max_bytes):
                self._changed.wait()
            self.lines += 1
            self.bytes += size
        released = False

        def release() -> None:
            nonlocal released
            with self._changed:
                if released:
                    return
                released = True
                self.lines -= 1
                self.bytes -= size
                self._changed.notify()

        return release


def _frame_size(frame: bytes | OversizedLine) -> int:
    return len(frame.head) if isinstance(frame, OversizedLine) else len(frame)


def start_line_reader(
    fd: int,
    framer: LineFramer,
    gate: InputGate,
    on_frame: Callable[[bytes | OversizedLine, Callable[[], None]], None],
    on_eof: Callable[[], None],
) -> threading.Thread:
    """Blocking reads on a daemon thread: works for pipes, files and ttys alike, and
    never stalls the event loop. Each frame is handed over with its place in `gate`, to
    release once answered. Callbacks run on this thread; callers hop to their loop."""

    def run() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                for frame in framer.feed(chunk):
                    on_frame(frame, gate.enter(_frame_size(frame)))
            for frame in framer.finish():
                on_frame(frame, gate.enter(_frame_size(frame)))
        except OSError as exc:
            log.warning("stdin read failed: %s", exc)
        except RuntimeError:  # the loop closed under us: the process is ending
            return
        on_eof()

    thread = threading.Thread(target=run, name="wire-reader", daemon=True)
    thread.start()
    return thread

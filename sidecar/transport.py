"""NDJSON over raw file descriptors: the stdout guard, line framing, one reader and one writer.

Knows nothing of JSON-RPC or models: bytes in, lines out; messages in, bytes out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

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
        elif len(self._buffer) > self.max_line_bytes:
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


def encode_message(message: Any) -> bytes:
    """One wire line. Lone surrogates (which a JS client may send and we may echo) are
    not valid UTF-8, so those messages fall back to ASCII-escaped JSON."""
    try:
        return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def start_line_reader(
    fd: int,
    framer: LineFramer,
    on_frame: Callable[[bytes | OversizedLine], None],
    on_eof: Callable[[], None],
) -> threading.Thread:
    """Blocking reads on a daemon thread: works for pipes, files and ttys alike, and
    never stalls the event loop. Callbacks run on this thread; callers hop to their loop."""

    def run() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                for frame in framer.feed(chunk):
                    on_frame(frame)
            for frame in framer.finish():
                on_frame(frame)
        except OSError as exc:
            log.warning("stdin read failed: %s", exc)
        except RuntimeError:  # the loop closed under us: the process is ending
            return
        on_eof()

    thread = threading.Thread(target=run, name="wire-reader", daemon=True)
    thread.start()
    return thread

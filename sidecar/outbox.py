"""The one writer of the wire: every outbound message goes through one queue and one thread.

Producers never block. Messages are encoded on the caller's thread and queued in order.
A streaming generation writes its text into a `ChunkStream`: while the stream waits in the
queue its text keeps joining, so a client that reads slowly receives fewer, longer chunks
(`seq` stays contiguous, no text is lost) instead of stalling the engine. A stream whose
unsent text passes `stream_limit_bytes` reports `over_limit`, and the engine parks that one
request until the client has read it down (see PROTOCOL.md, "Back-pressure").

The writer is a Python thread: woken, it still needs the GIL, which the engine thread holds
while it builds its next step (a few ms of Python, or the whole 5 ms switch interval). So
the engine, between turns, hands the writer the GIL (`hand_over`): if lines wait and the
writer sleeps, it blocks for the moment the writer takes them. A writer that is busy writing
(a slow client) is never waited for.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .jsonrpc import RequestId
from .transport import encode_message

log = logging.getLogger("localmlx.outbox")

CHUNK_METHOD = "generate/chunk"


class ChunkStream:
    """`generate/chunk` notifications for one request, coalesced while the wire is busy.

    A chunk carries one channel: `text` (the answer), `reasoning`, or `toolCalls`. Pieces of
    the same channel in a row join into one chunk; a change of channel starts the next, so
    the order of answer, reasoning and calls survives coalescing."""

    def __init__(self, outbox: Outbox, request_id: RequestId, limit_bytes: int) -> None:
        self._outbox = outbox
        self.request_id = request_id
        self.limit_bytes = limit_bytes
        self._pending: list[tuple[str, list[Any]]] = []  # runs of (channel, pieces)
        self._pending_bytes = 0
        self._queued = False
        self.seq = 0  # chunks taken by the writer so far

    def write(self, text: str, channel: str = "text") -> None:
        if text:
            self._outbox._add_to_stream(self, channel, [text], len(text))

    def write_tool_calls(self, calls: list[dict[str, Any]]) -> None:
        if calls:
            size = sum(len(c["function"]["arguments"]) + len(c["function"]["name"]) + 64 for c in calls)
            self._outbox._add_to_stream(self, "toolCalls", calls, size)

    def write_whole(self, text: str) -> None:
        """One chunk exactly as given, never joined with others (replaying recorded chunks)."""
        self._outbox._add_whole_chunk(self, text)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def over_limit(self) -> bool:
        return self._pending_bytes > self.limit_bytes

    @property
    def drained(self) -> bool:
        """Read down to half the limit: a parked request may go on."""
        return self._pending_bytes <= self.limit_bytes // 2

    def _take_chunk(self) -> bytes:
        """Called with the outbox lock held: one chunk line per run of one channel."""
        lines = [self._encode("".join(pieces) if channel != "toolCalls" else pieces, channel)
                 for channel, pieces in self._pending]
        self._pending = []
        self._pending_bytes = 0
        self._queued = False
        return b"".join(lines)

    def _encode(self, payload: Any, channel: str = "text") -> bytes:
        params = {"requestId": self.request_id, "seq": self.seq, channel: payload}
        self.seq += 1
        return encode_message({"jsonrpc": "2.0", "method": CHUNK_METHOD, "params": params})


class Outbox:
    """Ordered, non-blocking output to one fd, drained by a writer thread.

    `on_drain` runs on the writer thread whenever a stream's text was taken, so the engine
    can resume a request it parked for back-pressure.
    """

    MAX_WRITE_BYTES = 1 << 20  # one os.write gathers queued lines up to this size
    HAND_OVER_S = 0.001  # the most the engine waits for a sleeping writer to take its lines (~50 µs idle)

    def __init__(self, fd: int, on_broken: Callable[[], None] | None = None,
                 stream_limit_bytes: int = 256 << 10) -> None:
        self._fd = fd
        self._on_broken = on_broken
        self._stream_limit_bytes = stream_limit_bytes
        self._queue: collections.deque[bytes | ChunkStream | None] = collections.deque()
        lock = threading.RLock()  # one lock, two conditions: work queued, lines written
        self._ready = threading.Condition(lock)
        self.on_drain: Callable[[], None] | None = None
        self.broken = False
        self._queued_bytes = 0  # encoded lines waiting (streams' text is bounded on its own)
        self._written = threading.Condition(lock)
        self._taken = threading.Condition(lock)  # the writer took a batch (see `hand_over`)
        self._batches_taken = 0
        self._writer_asleep = False
        self._thread = threading.Thread(target=self._drain, name="wire-writer", daemon=True)
        self._thread.start()

    def post(self, message: Any) -> None:
        """Queue one message (any thread); encoded here so the writer only writes."""
        self._enqueue(encode_message(message))

    def open_stream(self, request_id: RequestId) -> ChunkStream:
        return ChunkStream(self, request_id, self._stream_limit_bytes)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything queued so far, then stop the writer."""
        self._enqueue(None)
        self._thread.join(timeout)

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    def _enqueue(self, item: bytes | ChunkStream | None) -> None:
        with self._ready:
            self._queue.append(item)
            if isinstance(item, bytes):
                self._queued_bytes += len(item)
            self._ready.notify()

    def hand_over(self) -> None:
        """The engine thread, between turns: if lines wait and the writer sleeps, wait
        (GIL released) until the writer has taken them, rather than leave it waiting for
        the GIL while the engine builds its next step. Bounded; a busy writer is not waited for."""
        with self._ready:
            if not self._queue or not self._writer_asleep:
                return
            taken = self._batches_taken
            self._taken.wait_for(lambda: self._batches_taken != taken, self.HAND_OVER_S)

    def wait_until_below(self, limit: int) -> None:
        """Block (the stdin reader) while more than `limit` bytes of answers wait unread."""
        with self._ready:
            while self._queued_bytes > limit and not self.broken:
                self._written.wait()

    def _add_to_stream(self, stream: ChunkStream, channel: str, pieces: list[Any], size: int) -> None:
        with self._ready:
            if stream._pending and stream._pending[-1][0] == channel:
                stream._pending[-1][1].extend(pieces)
            else:
                stream._pending.append((channel, list(pieces)))
            stream._pending_bytes += size
            if not stream._queued:
                stream._queued = True
                self._queue.append(stream)
                self._ready.notify()

    def _add_whole_chunk(self, stream: ChunkStream, text: str) -> None:
        with self._ready:
            lines = []
            if stream._queued:  # joined text waits in the queue: it goes first (and takes its seq first)
                self._queue.remove(stream)
                lines.append(stream._take_chunk())
            lines.append(stream._encode(text))
            self._queue.extend(lines)
            self._queued_bytes += sum(map(len, lines))
            self._ready.notify()

    def _next_batch(self) -> tuple[list[bytes], bool, bool]:
        """Wait for work; returns (lines, stop, took_stream_text)."""
        with self._ready:
            while not self._queue:
                self._writer_asleep = True
                self._ready.wait()
                self._writer_asleep = False
            self._batches_taken += 1
            self._taken.notify()
            lines: list[bytes] = []
            size, took_stream = 0, False
            while self._queue and size < self.MAX_WRITE_BYTES:
                item = self._queue.popleft()
                if item is None:
                    return lines, True, took_stream
                if isinstance(item, ChunkStream):
                    item, took_stream = item._take_chunk(), True
                else:
                    self._queued_bytes -= len(item)
                lines.append(item)
                size += len(item)
            return lines, False, took_stream

    def _drain(self) -> None:
        while True:
            lines, stop, took_stream = self._next_batch()
            if took_stream and self.on_drain is not None:
                self.on_drain()
            if lines:
                self._write(b"".join(lines))
            with self._ready:
                self._written.notify_all()
            if stop:
                return

    def _write(self, data: bytes) -> None:
        if self.broken:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            return
        except OSError as exc:  # EPIPE: the client went away
            self.broken = True
            log.warning("wire closed by peer: %s", exc)
        if self._on_broken is not None:
            self._on_broken()

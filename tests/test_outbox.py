"""The Outbox in process, on a real pipe with its real writer thread: order, coalescing with
contiguous `seq`, the back-pressure signals that park and resume a request, a peer that goes
away, and a close that flushes. Milliseconds each.

The writer is held deterministically by a message larger than it writes at once
(MAX_WRITE_BYTES) and larger than the pipe holds: it blocks inside that write until the test
reads, and everything queued behind it waits (and coalesces) in the meantime."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.outbox import CHUNK_METHOD, Outbox

HOLD = {"jsonrpc": "2.0", "method": "hold", "params": {"pad": "x" * (2 << 20)}}
TIMEOUT = 10


class Wire:
    """The read end of the pipe the Outbox writes to."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._data = bytearray()
        self._reader: threading.Thread | None = None

    def start_reading(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.read_fd, 1 << 16):
            self._data.extend(chunk)

    def messages(self, outbox: Outbox) -> list[dict[str, Any]]:
        """Everything written, once `outbox` is closed: one parsed message per line."""
        if self._reader is None:
            self.start_reading()
        outbox.close(timeout=TIMEOUT)
        assert not outbox._thread.is_alive()
        os.close(self.write_fd)
        self.write_fd = -1
        assert self._reader is not None
        self._reader.join(TIMEOUT)
        assert self._data.endswith(b"\n")
        return [json.loads(line) for line in bytes(self._data).splitlines()]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def wire() -> Iterator[Wire]:
    pipe = Wire()
    try:
        yield pipe
    finally:
        pipe.close()


def chunks(messages: list[dict[str, Any]], request_id: Any) -> list[dict[str, Any]]:
    return [m["params"] for m in messages if m.get("method") == CHUNK_METHOD and m["params"]["requestId"] == request_id]


def until_asleep(outbox: Outbox) -> None:
    """Until the writer waits for work."""
    while not (outbox._writer_asleep and not outbox.queued_items):
        threading.Event().wait(0.001)


def test_messages_arrive_whole_and_in_the_order_posted(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd)
    wire.start_reading()
    posters = [threading.Thread(target=lambda n=n: [outbox.post({"id": n, "seq": i}) for i in range(200)])
               for n in range(4)]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join(TIMEOUT)
    messages = wire.messages(outbox)
    assert len(messages) == 800
    for n in range(4):  # each thread's own messages keep their order
        assert [m["seq"] for m in messages if m["id"] == n] == list(range(200))


def test_a_stream_coalesces_behind_a_busy_wire_one_chunk_per_run_with_contiguous_seq(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd)
    outbox.post(HOLD)
    stream = outbox.open_stream(7)
    for piece in "The sea ":
        stream.write(piece)
    stream.write("hmm", channel="reasoning")
    stream.write(" and", channel="reasoning")
    stream.write_tool_calls([{"index": 0, "function": {"name": "f", "arguments": "{}"}}])
    for piece in ("the ", "mountains"):
        stream.write(piece)
    wire.start_reading()  # the writer goes on: the stream's runs leave as one chunk each
    stream.write_whole("!")  # after the joined text, exactly as given
    stream.write(" end")
    got = chunks(wire.messages(outbox), 7)
    assert [c["seq"] for c in got] == list(range(len(got)))
    runs = [(key, c[key]) for c in got for key in ("text", "reasoning", "toolCalls") if key in c]
    assert runs[:4] == [("text", "The sea "), ("reasoning", "hmm and"),
                        ("toolCalls", [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]),
                        ("text", "the mountains")]
    assert runs[4] == ("text", "!") and "".join(t for _, t in runs[5:]) == " end"


def test_write_whole_sends_the_text_joined_before_it_first(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd)
    outbox.post(HOLD)
    stream = outbox.open_stream("r")
    stream.write("a")
    stream.write("b")
    stream.write_whole("c")
    stream.write_whole("d")
    got = chunks(wire.messages(outbox), "r")
    assert [(c["seq"], c["text"]) for c in got] == [(0, "ab"), (1, "c"), (2, "d")]


def test_over_limit_parks_and_drained_resumes_with_on_drain_on_the_writer_thread(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd, stream_limit_bytes=100)
    drained_on: list[str] = []
    drained = threading.Event()
    outbox.on_drain = lambda: (drained_on.append(threading.current_thread().name), drained.set())
    outbox.post(HOLD)
    stream = outbox.open_stream(1)
    stream.write("x" * 50)
    assert (stream.pending_bytes, stream.over_limit, stream.drained) == (50, False, True)  # half the limit
    stream.write("x")
    assert (stream.over_limit, stream.drained) == (False, False)
    stream.write("x" * 49)
    assert (stream.pending_bytes, stream.over_limit) == (100, False)  # at the limit is not past it
    stream.write("x")
    assert (stream.over_limit, stream.drained) == (True, False)  # the engine parks this request
    assert not drained.is_set()
    wire.start_reading()
    assert drained.wait(TIMEOUT)  # the writer took the text: the engine may resume it
    assert (stream.pending_bytes, stream.over_limit, stream.drained) == (0, False, True)
    assert drained_on == ["wire-writer"]
    assert [c["text"] for c in chunks(wire.messages(outbox), 1)] == ["x" * 101]


def test_wait_until_below_holds_the_reader_until_answers_are_written(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd)
    outbox.post(HOLD)
    for n in range(10):
        outbox.post({"id": n})
    released = threading.Event()
    waiter = threading.Thread(target=lambda: (outbox.wait_until_below(0), released.set()), daemon=True)
    waiter.start()
    assert not released.wait(0.05)  # the answers behind HOLD cannot be written yet
    wire.start_reading()
    assert released.wait(TIMEOUT)
    assert [m.get("id") for m in wire.messages(outbox)] == [None, *range(10)]


def test_hand_over_returns_once_the_sleeping_writer_has_taken_the_chunks(wire: Wire,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Outbox, "HAND_OVER_S", TIMEOUT)  # so that only the writer's taking ends the wait
    outbox = Outbox(wire.write_fd)
    wire.start_reading()
    stream = outbox.open_stream(1)
    for n in range(20):
        until_asleep(outbox)  # as between two decode steps: the last chunk is written
        stream.write(f"{n} ")
        outbox.hand_over()
        assert outbox.queued_items == 0  # taken (the writer may still be writing it)
    assert "".join(c["text"] for c in chunks(wire.messages(outbox), 1)) == "".join(f"{n} " for n in range(20))


def test_hand_over_never_waits_for_a_writer_busy_writing(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Outbox, "HAND_OVER_S", TIMEOUT)
    outbox = Outbox(wire.write_fd)
    outbox.post(HOLD)  # the writer blocks in this write: nobody reads the pipe
    stream = outbox.open_stream(1)
    stream.write("behind the hold")
    while outbox.queued_items > 1:  # until the writer has taken HOLD and is inside its write
        threading.Event().wait(0.001)
    outbox.hand_over()  # returns at once: a slow client never holds the engine
    assert outbox.queued_items == 1
    assert [c["text"] for c in chunks(wire.messages(outbox), 1)] == ["behind the hold"]


def test_a_peer_that_goes_away_calls_on_broken_once_and_writing_stops(wire: Wire) -> None:
    broken = threading.Event()
    calls: list[int] = []
    outbox = Outbox(wire.write_fd, on_broken=lambda: (calls.append(1), broken.set()))
    os.close(wire.read_fd)
    wire.read_fd = -1
    outbox.post({"id": 1})
    assert broken.wait(TIMEOUT)
    assert outbox.broken
    outbox.post({"id": 2})
    outbox.open_stream(3).write("more")
    outbox.wait_until_below(0)  # never blocks the reader once the peer is gone
    outbox.close(timeout=TIMEOUT)
    assert not outbox._thread.is_alive()
    assert calls == [1]


def test_close_flushes_everything_queued_before_it(wire: Wire) -> None:
    outbox = Outbox(wire.write_fd)
    outbox.post(HOLD)
    stream = outbox.open_stream(5)
    for n in range(1000):
        outbox.post({"id": n})
        stream.write(f"{n} ")
    messages = wire.messages(outbox)  # close() while the writer is still held
    assert [m["id"] for m in messages if "id" in m] == list(range(1000))
    assert "".join(c["text"] for c in chunks(messages, 5)) == "".join(f"{n} " for n in range(1000))
    assert outbox.queued_items == 0

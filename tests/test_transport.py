"""Framing, id recovery and encoding, fed adversarial byte streams."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import ParseError
from sidecar.jsonrpc import parse_json, peek_id
from sidecar.transport import LineFramer, OversizedLine, encode_message


def feed_all(framer: LineFramer, pieces: list[bytes]) -> list:
    frames = []
    for piece in pieces:
        frames.extend(framer.feed(piece))
    return frames + framer.finish()


def test_lines_split_on_newline_bytes_before_decoding() -> None:
    data = '{"t":"é🌊"}\n{"t":"b"}\n'.encode()
    pieces = [data[i:i + 1] for i in range(len(data))]  # every multi-byte char split
    assert feed_all(LineFramer(1024), pieces) == ['{"t":"é🌊"}'.encode(), b'{"t":"b"}']


def test_crlf_blank_lines_and_unterminated_tail() -> None:
    frames = feed_all(LineFramer(1024), [b"a\r\n\n  \r\n\tb\n", b"c"])
    assert frames == [b"a", b"\tb", b"c"]


def test_oversized_line_reported_once_then_stream_recovers() -> None:
    framer = LineFramer(10)
    frames = feed_all(framer, [b'{"id":7,', b"x" * 30, b"y" * 30, b"\nok\n"])
    assert isinstance(frames[0], OversizedLine) and frames[0].head.startswith(b'{"id":7,')
    assert frames[1:] == [b"ok"]


def test_oversized_line_inside_one_chunk() -> None:
    frames = feed_all(LineFramer(4), [b"0123456789\nabc\n"])
    assert isinstance(frames[0], OversizedLine) and frames[1:] == [b"abc"]


@pytest.mark.parametrize("head, expected", [
    (b'{"jsonrpc":"2.0","id":42,"method":"chat","params":{"x":"', 42),
    (b'{"id" : "a\\"b", "method"', 'a"b'),
    (b'{"params":{"id":1},"id":-5,', -5),
    (b'{"params":{"id":1},"method":"x","params2":"', None),
    (b'{"method":"x","note":"\\"id\\":3","id":null', None),
    (b'[{"id":1}', None),
])
def test_peek_id_reads_only_the_top_level_id(head: bytes, expected: object) -> None:
    assert peek_id(head) == expected


def test_parse_accepts_lone_surrogates_and_rejects_invalid_utf8_and_nan() -> None:
    assert parse_json(b'{"s":"\\ud800x"}') == {"s": "\ud800x"}
    assert parse_json(b'{"s":"\\ud83c\\udf0a"}') == {"s": "🌊"}
    for bad in (b'{"s":"\xff"}', b'{"n":NaN}', b'{"n":Infinity}', b"{", b"", b"[" * 50_000 + b"]" * 50_000):
        with pytest.raises(ParseError):
            parse_json(bad)


def test_encode_escapes_lone_surrogates_instead_of_failing() -> None:
    line = encode_message({"s": "a\ud800", "t": "é"})
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    line.decode("utf-8")  # valid UTF-8 on the wire
    assert json.loads(line) == {"s": "a\ud800", "t": "é"}
    assert encode_message({"t": "é"}) == '{"t":"é"}\n'.encode()


def test_oversized_line_is_reported_before_its_newline_arrives() -> None:
    """The client hears about it at once instead of streaming megabytes into the void."""
    framer = LineFramer(16)
    assert framer.feed(b"x" * 10) == []
    frames = framer.feed(b"x" * 10)
    assert len(frames) == 1 and isinstance(frames[0], OversizedLine)
    assert framer.feed(b"x" * 1000) == []
    assert framer.feed(b"\n{}\n") == [b"{}"]

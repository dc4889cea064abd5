"""Property tests: framing and message classification hold for any bytes, however split."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import RpcError
from sidecar.jsonrpc import BadCall, parse_json, peek_id, read_call
from sidecar.protocol_defs import INVALID_REQUEST, PARSE_ERROR
from sidecar.transport import LineFramer, OversizedLine

LIMIT = 64
lines = st.lists(st.binary(max_size=100).map(lambda b: b.replace(b"\n", b"")), max_size=12)


def frames_of(chunks: list[bytes]) -> list:
    framer = LineFramer(LIMIT)
    out = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    out.extend(framer.finish())
    return [("big", None) if isinstance(f, OversizedLine) else ("line", f) for f in out]


def expected_frames(parts: list[bytes]) -> list:
    out = []
    for line in parts:
        line = line[:-1] if line.endswith(b"\r") else line
        if len(line) > LIMIT:
            out.append(("big", None))
        elif line.strip():
            out.append(("line", line))
    return out


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_split_of_a_stream_gives_the_same_frames(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(p + b"\n" for p in parts)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert frames_of(chunks) == expected_frames(parts)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_parsing_any_bytes_either_succeeds_or_is_a_parse_error(data: bytes) -> None:
    try:
        parse_json(data)
    except RpcError as error:
        assert error.code == PARSE_ERROR


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(json_values | st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "method": st.text()},
                                           optional={"id": json_values, "params": json_values}))
def test_classifying_any_json_value_gives_a_call_or_an_invalid_request(message: object) -> None:
    try:
        call = read_call(message)
    except BadCall as error:
        assert error.code == INVALID_REQUEST
    else:
        assert isinstance(call.method, str)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_peeking_for_an_id_never_fails(head: bytes) -> None:
    peek_id(head)

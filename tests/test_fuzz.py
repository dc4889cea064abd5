"""Property-based fuzzing of the wire, with hypothesis: framing across split points, message
classification and responses (pure functions), and generated lines through ONE real sidecar.

tests/test_transport_properties.py already checks that random binary lines split anywhere give
the frames of a simple model, that parsing any bytes fails only as -32700, and that classifying
any value gives a call or -32600. This file goes further: streams built from the line kinds that
matter (valid messages, garbage, CRLF, blank lines, lines right at the size limit, oversized
ones, unterminated last lines) compared with splitting the whole stream, id-peek heads, the exact
shape of every error and response, ids kept exactly, and the same properties end to end.

Deterministic: `derandomize=True` and no example database, so CI tests the same examples every
run; `LOCALMLX_SOAK=long` (scripts/soak.sh) runs many more, and `LOCALMLX_SOAK_SEED` picks a
different but reproducible set.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sidecar import errors
from sidecar.errors import RpcError
from sidecar.jsonrpc import BadCall, Call, error_message, parse_json, peek_id, read_call, result_message
from sidecar.protocol_defs import (
    BUSY,
    CONTEXT_LENGTH_EXCEEDED,
    FORBIDDEN,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MESSAGE_TOO_LARGE,
    METHOD_NOT_FOUND,
    MODEL_LOAD_FAILED,
    MODEL_LOADING,
    MODEL_NOT_FOUND,
    MODEL_NOT_LOADED,
    NOT_INITIALIZED,
    OUT_OF_MEMORY,
    PARSE_ERROR,
    REQUEST_CANCELLED,
    SERVER_CANCELLED,
)
from sidecar.transport import LineFramer, OversizedLine, encode_message

from .soak_support import (
    LONG_MODE,
    NULL_KEY,
    SEED,
    RawSidecar,
    is_own_call,
    key_of,
    loads_exact,
    plain,
    scaled,
    well_formed_error,
)


def fuzz_settings(short: int, long: int, shrink_in_short_mode: bool = True):
    """Seeded settings: the same examples every run (a different set per LOCALMLX_SOAK_SEED).
    Without `shrink_in_short_mode`, CI reports a failing example as found instead of spending
    minutes shrinking it against a real process; scripts/soak.sh shrinks it."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if LONG_MODE or shrink_in_short_mode:
        phases.append(Phase.shrink)
    chosen = settings(max_examples=scaled(short, long), deadline=None, database=None, derandomize=SEED == 0,
                      suppress_health_check=list(HealthCheck), phases=phases)

    def apply(test):
        test = chosen(test)
        return seed(SEED)(test) if SEED else test
    return apply


# ---- strategies ----------------------------------------------------------------------------

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
# Lone surrogates included (as JSON.stringify can send them); a high one followed by a low one
# would be one character on the wire, so such pairs are kept apart.
texts = st.lists(st.text(max_size=6) | surrogates, max_size=4).map(
    lambda parts: re.sub("([\ud800-\udbff])(?=[\udc00-\udfff])", "\\1.", "".join(parts)))
ints64 = st.integers(-(2 ** 63), 2 ** 64 - 1)  # what orjson reads and writes exactly
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | ints64 | finite_floats | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=16)
valid_ids = st.none() | texts | ints64 | finite_floats
invalid_ids = st.booleans() | st.lists(json_scalars, max_size=2) | st.dictionaries(st.text(max_size=3), json_scalars,
                                                                                 max_size=2)


def dumps(value: Any) -> bytes:
    """Stdlib JSON (it writes lone surrogates as escapes, as JSON.stringify does)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def same_json(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 is not True; -0.0 is 0.0).
    A number the sidecar keeps as its JSON text (jsonrpc.JsonNumber) counts as that number."""
    a, b = _as_number(a), _as_number(b)
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _as_number(value: Any) -> Any:
    text = getattr(value, "text", None)
    return json.loads(text) if isinstance(text, str) and not isinstance(value, str) else value


# ---- (a) framing across split points ---------------------------------------------------------


def reference_frames(stream: bytes, limit: int, keep_head: bool) -> list:
    """What framing the whole stream at once must give: split on b"\\n"; the last, unterminated
    piece is a line too; one trailing b"\\r" is not part of the line; a line longer than the limit
    is one oversized frame (with its first HEAD_BYTES when `keep_head`); blank lines vanish."""
    out = []
    for line in stream.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            out.append(("big", line[:LineFramer.HEAD_BYTES] if keep_head else None))
        elif line.strip():
            out.append(("line", line))
    return out


def framed(chunks: list[bytes], limit: int, keep_head: bool) -> list:
    framer = LineFramer(limit)
    frames = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    frames.extend(framer.finish())
    return [("big", f.head if keep_head else None) if isinstance(f, OversizedLine) else ("line", f) for f in frames]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def line_pieces(limit: int):
    """One line of a stream, without its terminator: the kinds framing has to get right."""
    message = st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": valid_ids, "method": texts},
                                    optional={"params": json_values})
    near_limit = st.tuples(st.integers(-2, 2), st.sampled_from([b"x", b"\xc3\xa9", b" ", b"\r"])).map(
        lambda t: (t[1] * (limit + t[0]))[: max(0, limit + t[0])])
    return st.one_of(
        message.map(lambda m: encode_message(m)[:-1]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
        st.sampled_from([b"", b" ", b"\t", b"\r", b" \r", b"\r\r", b"\x00", b"\xff\xfe", "é漢😀".encode()]),
        near_limit,
        st.integers(limit + 1, 3 * limit).map(lambda n: b"{" + b"y" * n),  # oversized
    )


def stream_of(limit: int):
    """Lines joined by LF or CRLF, the last maybe unterminated."""
    return st.tuples(
        st.lists(st.tuples(line_pieces(limit), st.sampled_from([b"\n", b"\r\n"])), max_size=12),
        st.sampled_from([b"", b"tail", b"tail\r", b"\r"]),
    ).map(lambda t: b"".join(line + end for line, end in t[0]) + t[1])


@fuzz_settings(300, 5000)
@given(stream_of(64), st.lists(st.integers(min_value=0), max_size=24))
def test_framing_any_split_of_a_mixed_stream_gives_the_frames_of_the_whole(stream: bytes, cuts: list[int]) -> None:
    """Kinds only (a small limit passes before the 4 KiB head is read, so heads differ by split)."""
    expected = reference_frames(stream, 64, keep_head=False)
    assert framed([stream], 64, False) == expected
    assert framed(split_at(stream, cuts), 64, False) == expected


@fuzz_settings(40, 400)
@given(stream_of(LineFramer.HEAD_BYTES), st.lists(st.integers(min_value=0), max_size=24))
def test_framing_at_a_real_limit_keeps_the_same_head_of_an_oversized_line_however_split(
        stream: bytes, cuts: list[int]) -> None:
    """With a limit of at least the head size, the head (the id is peeked from it) never
    depends on where the reads fall."""
    expected = reference_frames(stream, LineFramer.HEAD_BYTES, keep_head=True)
    assert framed(split_at(stream, cuts), LineFramer.HEAD_BYTES, True) == expected


@fuzz_settings(50, 500)
@given(stream_of(64))
def test_framing_byte_by_byte_equals_framing_the_whole(stream: bytes) -> None:
    assert framed([stream[i:i + 1] for i in range(len(stream))], 64, False) == reference_frames(stream, 64, False)


def test_a_line_of_exactly_the_limit_then_crlf_is_accepted_wherever_the_read_ends() -> None:
    """The trailing \\r is not part of the line: whole, the framer accepts a line of exactly the
    limit followed by CRLF; a read that ends between \\r and \\n must not make it oversized."""
    line = b"a" * 64
    stream = line + b"\r\n"
    expected = [("line", line)]
    assert framed([stream], 64, False) == expected
    assert framed([stream[:-1], stream[-1:]], 64, False) == expected


@fuzz_settings(100, 1000)
@given(st.lists(json_values, min_size=1, max_size=8), st.lists(st.integers(min_value=0), max_size=16))
def test_framing_valid_messages_gives_back_each_message_whole(values: list, cuts: list[int]) -> None:
    """Multi-byte characters are never cut: every frame of a stream of JSON lines parses back."""
    stream = b"".join(orjson_line(v) for v in values)
    frames = framed(split_at(stream, cuts), 1 << 20, False)
    assert [kind for kind, _ in frames] == ["line"] * len(values)
    assert all(same_json(parse_json(frame), value) for (_, frame), value in zip(frames, values, strict=True))


def orjson_line(value: Any) -> bytes:
    return encode_message(value)


# ---- (b) parsing, classification and responses ---------------------------------------------


def assert_parse_error(error: RpcError) -> None:
    assert error.code == PARSE_ERROR
    assert isinstance(error.message, str) and error.message
    assert isinstance(error.data, dict) and isinstance(error.data.get("reason"), str)


@fuzz_settings(300, 5000)
@given(json_values, st.booleans())
def test_parsing_any_json_text_gives_back_the_value(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)
    try:
        line = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be written raw, only escaped
        line = json.dumps(value, allow_nan=False).encode()
    assert same_json(parse_json(line), value)


@st.composite
def mutated_messages(draw) -> bytes:
    """A valid message with a few bytes inserted, deleted or replaced: near-miss JSON."""
    data = bytearray(dumps({"jsonrpc": "2.0", "id": draw(valid_ids), "method": draw(texts),
                            "params": draw(json_values)}))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(b'{}[]",:\\ 0123456789.eE+-tfnu\x00\x80\xbf\xc3\xed\xff'))
        if op == "insert":
            data[at:at] = bytes([byte])
        elif at < len(data):
            data[at:at + 1] = b"" if op == "delete" else bytes([byte])
    return bytes(data)


deep = st.tuples(st.integers(1, 200_000), st.sampled_from(["[", '{"a":', '[{"b":'])).map(
    lambda t: (t[1] * t[0]).encode() + {"[": b"]", '{"a":': b"1}", '[{"b":': b"1}]"}[t[1]] * t[0])


@fuzz_settings(300, 5000)
@given(mutated_messages() | st.binary(max_size=64) | deep | st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b'{"a":NaN}', b"1e400", b"-1e400", b'"\\ud800"', b"\xed\xa0\x80", b"\xef\xbb\xbf{}",
     b'{"a":1,"a":2}', b"[" * 100_000, b"]", b'"\\u0000"']))
def test_parsing_any_bytes_gives_a_value_or_a_parse_error_with_a_reason(line: bytes) -> None:
    """Never an exception other than RpcError -32700 (not RecursionError, not ValueError)."""
    try:
        parse_json(line)
    except RpcError as error:
        assert_parse_error(error)


def jsonrpc_shaped():
    """Objects that look like JSON-RPC: every key present, absent or wrong, in any order."""
    return st.fixed_dictionaries({}, optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2.0, None]) | json_scalars,
        "id": valid_ids | invalid_ids,
        "method": texts | json_values,
        "params": st.dictionaries(texts, json_values, max_size=3) | st.lists(json_values, max_size=3) | json_scalars,
    }).flatmap(lambda d: st.permutations(list(d.items())).map(dict))


def is_valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


@fuzz_settings(300, 10000)
@given(jsonrpc_shaped() | json_values | st.lists(jsonrpc_shaped(), max_size=3))
def test_classifying_any_value_follows_the_spec_exactly(message: Any) -> None:
    """A call exactly when the spec says the message is one (ids, method and params kept as
    sent, notification exactly when there is no id); otherwise BadCall -32600 with a data
    object, carrying the message's id when that id is valid, else null."""
    valid = (isinstance(message, dict) and message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str)
             and ("id" not in message or is_valid_id(message["id"]))
             and ("params" not in message or isinstance(message["params"], (dict, list))))
    try:
        call = read_call(message)
    except BadCall as error:
        assert not valid
        assert error.code == INVALID_REQUEST and isinstance(error.message, str) and error.message
        assert isinstance(error.data, dict)
        expected_id = message.get("id") if isinstance(message, dict) and is_valid_id(message.get("id")) else None
        assert same_json(error.id, expected_id)
        wire = json.loads(encode_message(error_message(error.id, error)))
        assert wire["error"]["code"] == INVALID_REQUEST and isinstance(wire["error"]["data"], dict)
    else:
        assert valid
        assert isinstance(call, Call)
        assert call.method == message["method"]
        assert call.is_notification == ("id" not in message)
        assert call.id is message.get("id")
        assert call.params is message.get("params")


error_classes = st.sampled_from([c for c in vars(errors).values()
                                 if isinstance(c, type) and issubclass(c, RpcError)])
error_data = st.dictionaries(st.text(alphabet="abcdefghij", min_size=1, max_size=6), json_values, max_size=4)


@fuzz_settings(200, 5000)
@given(valid_ids, error_classes, texts, error_data)
def test_any_error_response_is_one_valid_utf8_line_with_its_id_and_a_data_object(
        id_: Any, cls: type, message: str, data: dict) -> None:
    error = cls(message or "x", **data)
    line = encode_message(error_message(id_, error))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    response = json.loads(line.decode("utf-8"))  # strict UTF-8: lone surrogates went out escaped
    assert response["jsonrpc"] == "2.0" and set(response) == {"jsonrpc", "id", "error"}
    assert same_json(response["id"], id_)
    assert response["error"]["code"] == cls.code and isinstance(response["error"]["code"], int)
    assert response["error"]["message"] == (message or "x")
    assert same_json(response["error"]["data"], data)


@fuzz_settings(200, 5000)
@given(valid_ids, json_values)
def test_any_result_response_is_one_valid_utf8_line_with_its_id(id_: Any, result: Any) -> None:
    line = encode_message(result_message(id_, result))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    response = json.loads(line.decode("utf-8"))
    assert set(response) == {"jsonrpc", "id", "result"}
    assert same_json(response["id"], id_) and same_json(response["result"], result)


@fuzz_settings(200, 5000)
@given(valid_ids, texts, json_values, st.integers(0, 1 << 16))
def test_the_id_is_recovered_from_the_head_of_an_oversized_line(id_: Any, method: str, params: Any, extra: int) -> None:
    """`"id"` before `"params"`, as most serializers write it: any head that holds the whole id
    gives it back, with its type."""
    line = dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})
    id_end = len(dumps({"jsonrpc": "2.0", "id": id_})) - 1  # the id ends where this object's '}' is
    head = line[: id_end + 1 + extra]
    assert same_json(peek_id(head), id_)


@fuzz_settings(200, 5000)
@given(texts, json_values, st.integers(0, 1 << 16))
def test_peeking_never_invents_an_id(method: str, params: Any, cut: int) -> None:
    """With no top-level id, no prefix of the line gives one (an "id" inside params is not it)."""
    line = dumps({"jsonrpc": "2.0", "method": method, "params": {"id": 5, "x": params}})
    assert peek_id(line[:cut]) is None


# ---- (c) end to end: generated lines through one real sidecar --------------------------------

E2E_MAX_LINE = 4096
DOCUMENTED_CODES = {PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, NOT_INITIALIZED, REQUEST_CANCELLED, SERVER_CANCELLED, MODEL_NOT_FOUND, MODEL_NOT_LOADED, MODEL_LOADING, MODEL_LOAD_FAILED,
                    OUT_OF_MEMORY, BUSY, CONTEXT_LENGTH_EXCEEDED, MESSAGE_TOO_LARGE, FORBIDDEN}  # every code but -32603, which is a bug
REAL_METHODS = {"initialize", "ping", "shutdown", "models/list", "models/download", "models/delete", "models/load",
                "models/unload", "models/status", "server/status", "generate", "chat", "tokenize", "exit",
                "$/cancelRequest"}

# Ids as JSON text. Numbers must come back as the very text sent (issue 8): beyond 64 bits,
# exponents, trailing zeros.
number_ids = st.one_of(
    st.integers(-(2 ** 63), 2 ** 64 - 1).map(str),
    st.integers(-(10 ** 40), 10 ** 40).map(str),
    finite_floats.map(repr),
    st.tuples(st.integers(-999, 999), st.integers(-400, 400)).map(lambda t: f"{t[0]}e{t[1]}"),
    st.tuples(st.integers(0, 999), st.integers(0, 99)).map(lambda t: f"{t[0]}.{t[1]:02d}0"),
)
string_ids = texts.map(lambda s: json.dumps(s))  # escaped; lone surrogates as \udxxx
wire_ids = number_ids | string_ids

small_chat = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": texts}), min_size=1, max_size=3),
     "maxTokens": st.integers(1, 3)},
    optional={"temperature": st.sampled_from([0, 0.5, 1.0]), "seed": st.integers(0, 2 ** 32),
              "topK": st.integers(0, 20), "topP": st.floats(0, 1), "stream": st.booleans(),
              "stop": st.lists(texts, max_size=2), "cache": st.booleans()})
valid_params = {
    "ping": st.just({}), "server/status": st.just({}), "models/list": st.just({}),
    "models/status": st.fixed_dictionaries({"model": st.sampled_from(["demo", "nope", "../x", "a/b"]) | texts}),
    "tokenize": st.fixed_dictionaries({"text": texts}, optional={"addSpecialTokens": st.booleans()}),
    "chat": small_chat,
    "generate": st.fixed_dictionaries({"prompt": texts, "maxTokens": st.integers(1, 3)},
                                      optional={"stream": st.booleans(), "temperature": st.sampled_from([0, 0.7])}),
    "initialize": st.just({"protocolVersion": 1}),
}
methods = st.sampled_from(sorted(valid_params)) | texts.filter(lambda m: m not in REAL_METHODS)


@st.composite
def request_lines(draw, id_text: str) -> tuple[bytes, dict]:
    method = draw(methods)
    how = draw(st.sampled_from(["valid", "valid", "valid", "absent", "random", "scalar", "oversized"]))
    spec = {"method": method, "params": how}
    if how == "valid" and method in valid_params:
        params = dumps(draw(valid_params[method]))
    elif how == "random":
        params = dumps(draw(st.dictionaries(texts, json_values, max_size=3) | st.lists(json_values, max_size=3)))
    elif how == "scalar":
        params = dumps(draw(json_scalars))
    elif how == "oversized":
        params = b'{"text":"' + b"z" * draw(st.integers(E2E_MAX_LINE, 2 * E2E_MAX_LINE)) + b'"}'
    else:
        params = None
        spec["params"] = "absent"
    line = b'{"jsonrpc":"2.0","id":' + id_text.encode() + b',"method":' + dumps(method)
    line += (b',"params":' + params if params is not None else b"") + b"}"
    spec["stream"] = params is not None and how == "valid" and b'"stream":true' in params
    return line, spec


def notification_lines():
    return st.tuples(texts.filter(lambda m: m not in ("exit", "$/cancelRequest")) | st.sampled_from(
        ["ping", "chat", "initialize", "shutdown", "models/unload"]),
        st.none() | st.dictionaries(texts, json_values, max_size=3) | st.lists(json_values, max_size=3)).map(
        lambda t: b'{"jsonrpc":"2.0","method":' + dumps(t[0]) + (b"" if t[1] is None else b',"params":' + dumps(t[1]))
        + b"}")


def _parses(line: bytes) -> bool:
    try:
        parse_json(line)
    except RpcError:
        return False
    return True


# Lines that are no request: each one that is not blank gets one answer, with id null.
garbage_lines = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")).filter(lambda b: not _parses(b)),
    mutated_messages().map(lambda b: b.replace(b"\n", b"")).filter(lambda b: not _parses(b)),
    json_scalars.map(dumps),
    st.dictionaries(texts, json_values, max_size=3).map(
        lambda d: dumps({k: v for k, v in d.items() if k not in ("id", "method")})),
    json_scalars.map(lambda p: b'{"jsonrpc":"2.0","method":"ping","params":' + dumps(p) + b"}"),  # invalid, no id
    st.sampled_from([b"[]", b"[1]", b"NaN", b'{"jsonrpc":"2.0","id":{},"method":"ping"}', b"\xff", b"{" * 3000,
                     b"[" * 1100 + b"]" * 1100, b"x" * (E2E_MAX_LINE + 1)]),
)


@st.composite
def sessions(draw) -> dict:
    """A list of lines of every kind, with what each must get back."""
    n = draw(st.integers(1, 14))
    ids = draw(st.lists(wire_ids, min_size=n, max_size=n, unique_by=lambda t: key_of(loads_exact(t.encode()))))
    lines, requests, batches, cancelled, garbage = [], {}, [], set(), 0
    for id_text in ids:
        kind = draw(st.sampled_from(["request"] * 5 + ["notification", "garbage", "batch", "blank", "cancel"]))
        key = key_of(loads_exact(id_text.encode()))
        if kind == "request":
            line, spec = draw(request_lines(id_text))
            requests[key] = spec
        elif kind == "notification":
            line = draw(notification_lines())
        elif kind == "garbage":
            line = draw(garbage_lines)
            garbage += 1 if line.strip() else 0
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b" ", b"\r", b"\t \t"]))
        elif kind == "cancel":
            target = draw(st.sampled_from(ids))  # maybe a request of this session, maybe not sent
            line = b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":' + target.encode() + b"}}"
            cancelled.add(key_of(loads_exact(target.encode())))
        else:
            line, spec = draw(request_lines(id_text))
            requests[key] = spec
            notes = draw(st.lists(notification_lines(), max_size=2))
            batches.append(key)
            line = b"[" + b",".join([line, *notes]) + b"]"
            if spec["params"] == "oversized":  # the whole batch line is oversized: one -32017, id unknown
                garbage += 1
                del requests[key]
                batches.pop()
        lines.append(line + draw(st.sampled_from([b"\n", b"\r\n"])))
    stream = b"".join(lines)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return {"chunks": split_at(stream, cuts), "requests": requests, "batches": batches, "cancelled": cancelled,
            "garbage": garbage}


@pytest.fixture(scope="module")
def fuzz_sidecar(sidecar_env):
    sidecar = RawSidecar({**sidecar_env, "LOCALMLX_MAX_LINE_BYTES": str(E2E_MAX_LINE)})
    sidecar.request("initialize", {"protocolVersion": 1, "clientInfo": {"name": "fuzz"}})
    sidecar.request("models/load", {"model": "demo"})
    yield sidecar
    try:
        assert not sidecar.junk, f"non-protocol bytes on stdout: {sidecar.junk[:3]}"
        assert sidecar.close() == 0
    finally:
        sidecar.kill()


@fuzz_settings(150, 3000, shrink_in_short_mode=False)
@given(session=sessions())
def test_generated_lines_through_a_real_sidecar_each_request_answered_exactly_once(fuzz_sidecar, session) -> None:
    sidecar = fuzz_sidecar
    sidecar.reset()  # a clean slate for this example (the previous one was fully answered)
    requests, cancelled = session["requests"], session["cancelled"]
    for chunk in session["chunks"]:
        sidecar.write(chunk)
    assert sidecar.call("ping")["result"] == {}  # every line has been read
    missing = sidecar.wait_settled(requests, timeout=60, poll=0.3)
    sidecar.wait_until(lambda: len(sidecar.null_responses) >= session["garbage"], timeout=10)
    assert sidecar.process.poll() is None, "the sidecar died"
    assert not missing, f"no response to {missing}"
    with sidecar.lock:
        for key, spec in requests.items():
            seen = sidecar.by_key[key]
            assert len(seen.responses) == 1, f"{key}: {len(seen.responses)} responses: {seen.responses}"
            response = seen.responses[0]
            assert key_of(response["id"]) == key  # the very text of a number id
            if "error" in response:
                error = response["error"]
                assert well_formed_error(error), response
                assert error["code"] in DOCUMENTED_CODES, f"{spec}: {response}"
                if error["code"] == REQUEST_CANCELLED:  # cancelled before it was answered
                    assert key in cancelled, response
                elif spec["params"] == "oversized":
                    assert error["code"] == MESSAGE_TOO_LARGE
                elif spec["params"] == "scalar":
                    assert error["code"] == INVALID_REQUEST
                elif spec["method"] not in valid_params:
                    assert error["code"] == METHOD_NOT_FOUND and error["data"].get("method") == spec["method"]
                elif spec["method"] in ("ping", "server/status", "models/list") and spec["params"] in ("valid", "absent"):
                    raise AssertionError(f"an error for a valid {spec['method']}: {response}")
            else:
                assert spec["params"] not in ("oversized", "scalar") and spec["method"] in valid_params, response
                if spec["method"] == "ping":
                    assert response["result"] == {}
                if isinstance(response["result"], dict) and response["result"].get("finishReason") == "cancelled":
                    assert key in cancelled
            if spec["stream"] and "result" in response:
                chunks = sidecar.chunks.get(key, [])
                assert [s for s, _ in chunks] == list(range(len(chunks)))
                assert all(index < seen.order[0] for _, index in chunks), "a chunk after the response"
            assert seen.in_batch[0] == (key in session["batches"])
        strays = [k for k in sidecar.by_key if k not in requests and k != NULL_KEY and not is_own_call(k)]
        assert not strays, f"responses to ids never sent: {[sidecar.by_key[k].responses for k in strays]}"
        nulls = sidecar.null_responses
        assert len(nulls) == session["garbage"], f"{len(nulls)} null-id answers to {session['garbage']} bad lines"
        assert all("error" in r and well_formed_error(r["error"]) and r["error"]["code"] in DOCUMENTED_CODES
                   for r in nulls), nulls
        assert not sidecar.junk, sidecar.junk[:3]
    assert not sidecar.internal_errors()


# ---- found by fuzzing: each must be answered, never with -32603 ---------------------------------

EXACT_IDS = ["0", "-1", "9007199254740993", "18446744073709551615", "18446744073709551616", "-9223372036854775808",
             "-9223372036854775809", "123456789012345678901234567890", "1e400", "-1e400", "1e-400", "1.5", "1.50",
             "1e5", "1E+2", "2.5e-3", "-0", "0.0", "1.0", "0e0"]


@pytest.mark.parametrize("id_text", EXACT_IDS)
def test_a_number_id_comes_back_as_the_very_same_json_text(fuzz_sidecar, id_text: str) -> None:
    """Issue 8: ids are echoed exactly as sent (the same JSON number text)."""
    sidecar = fuzz_sidecar
    sidecar.reset()
    sidecar.write(b'{"jsonrpc":"2.0","id":%s,"method":"ping"}\n' % id_text.encode())
    key = key_of(loads_exact(id_text.encode()))
    missing = sidecar.wait_settled([key], timeout=10, poll=0.1)
    with sidecar.lock:
        others = [r for k, seen in sidecar.by_key.items() if k != key and not is_own_call(k) for r in seen.responses]
    assert not missing, f"sent id {id_text}, got back {others}"
    assert sidecar.by_key[key].responses[0]["result"] == {}


def _chat(**extra: Any) -> str:
    return dumps({"messages": [{"role": "user", "content": "hi"}], "maxTokens": 2, "temperature": 0.5,
                  **extra}).decode()


NESTED = "[" * 995 + "]" * 995
WELL_FORMED_EDGES = {
    "chat seed 5.0": ("chat", _chat(seed=5.0)),
    "chat seed 0.0": ("chat", _chat(seed=0.0)),
    "chat seed 1e19": ("chat", _chat(seed=0).replace('"seed":0', '"seed":1e19')),
    "chat seed 2**64": ("chat", _chat(seed=2 ** 64)),
    "chat topK 2.0": ("chat", _chat(topK=2.0)),
    "chat maxTokens 2.0": ("chat", _chat().replace('"maxTokens":2', '"maxTokens":2.0')),
    "chat messages nested 995 deep": ("chat", '{"messages":%s}' % NESTED),
    "chat content nested 995 deep": ("chat", '{"messages":[{"role":"user","content":%s}]}' % NESTED),
    "tokenize text nested 995 deep": ("tokenize", '{"text":%s}' % NESTED),
    "chat content with a lone surrogate, cacheable": ("chat", r'{"messages":[{"role":"user","content":"a\ud800"}],'
                                                              r'"maxTokens":2,"temperature":0}'),
    "generate prompt with a lone surrogate, cacheable": ("generate", r'{"prompt":"\udfff","maxTokens":2,"temperature":0}'),
    "models/load of a lone surrogate": ("models/load", r'{"model":"\ud800/x"}'),
    "models/status of ~0 (no such user)": ("models/status", '{"model":"~0"}'),
    "models/load of ~nosuchuser/x": ("models/load", '{"model":"~nosuchuser/x"}'),
    "tokenize of a lone surrogate": ("tokenize", r'{"text":"\ud800"}'),
}


@pytest.mark.parametrize("case", sorted(WELL_FORMED_EDGES))
def test_a_well_formed_edge_request_gets_a_result_or_a_documented_error(fuzz_sidecar, case: str) -> None:
    """Issue 8 and what the fuzzers above found: well-formed requests the sidecar answered with
    -32603 (a bug, with a traceback on stderr)."""
    method, params = WELL_FORMED_EDGES[case]
    response = fuzz_sidecar.call(method, params, timeout=60)
    error = response.get("error")
    assert error is None or (well_formed_error(error) and error["code"] in DOCUMENTED_CODES), response


def test_the_checker_reads_numbers_exactly() -> None:
    """The helper used above reads numbers exactly (a check of the checker)."""
    value = loads_exact(b'{"a":[123456789012345678901234567890,1.50,1e400]}')
    assert [n.text for n in value["a"]] == ["123456789012345678901234567890", "1.50", "1e400"]
    assert plain(value)["a"][0] == 123456789012345678901234567890

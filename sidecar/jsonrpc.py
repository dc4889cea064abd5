"""JSON-RPC 2.0 message shapes: parsing a line, telling requests from notifications, and
building responses. Pure functions, no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeGuard

import orjson

from .errors import InvalidRequest, ParseError, RpcError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class JsonNumber:
    """A numeric id kept as the exact text the client sent: fractions and integers beyond
    64 bits would otherwise come back changed (1.50 as 1.5, 2**100 as 1.2676506002282294e+30).
    Echoed byte for byte; two ids match when their texts do."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(("JsonNumber", self.text))

    def __repr__(self) -> str:
        return self.text


RequestId: TypeAlias = str | int | float | JsonNumber | None  # what `is_valid_id` accepts
IdKey: TypeAlias = tuple[str, RequestId]  # an id as requests are told apart by it (see `id_key`)


def _is_exact(value: Any) -> bool:
    """Numbers a parse keeps exactly: integers in orjson's 64-bit range (but 0, which may
    have been written -0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return isinstance(value, int) and value != 0 and -(1 << 63) <= value < (1 << 64)


def _id_places(message: Any) -> list[tuple[Any, ...]]:
    """Where ids live in a message: its own `id`, and the `id` a $/cancelRequest names."""
    places: list[tuple[Any, ...]] = [("id",)]
    if isinstance(message, dict) and message.get("method") == "$/cancelRequest":
        places.append(("params", "id"))
    return places


def _get(message: Any, place: tuple[Any, ...]) -> Any:
    for key in place:
        if not isinstance(message, dict) or key not in message:
            return None
        message = message[key]
    return message


def _keep_exact_ids(line: bytes, parsed: Any) -> Any:
    """Replace inexact numeric ids with their text, read again from the line (rare)."""
    items = parsed if isinstance(parsed, list) else [parsed]
    if all(_is_exact(_get(item, place)) for item in items for place in _id_places(item)):
        return parsed
    try:
        raw = json.loads(line.decode("utf-8"), parse_float=JsonNumber, parse_int=JsonNumber,
                         parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return parsed
    raw_items = raw if isinstance(raw, list) else [raw]
    for item, raw_item in zip(items, raw_items, strict=False):  # one document, read twice: as long
        for place in _id_places(item):
            if not _is_exact(_get(item, place)):
                holder = _get(item, place[:-1]) if len(place) > 1 else item
                holder[place[-1]] = _get(raw_item, place)
    return parsed


def parse_json(line: bytes, exact_ids: bool = True) -> Any:
    """One line as JSON. With `exact_ids` (the server's side), numeric ids that a float
    would change are kept as `JsonNumber`s; a client matching its own ids does without."""
    parsed = _parse_json(line)
    return _keep_exact_ids(line, parsed) if exact_ids else parsed


def _parse_json(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses lone surrogate escapes such as "\ud800", which Node's JSON.stringify
    # emits for broken UTF-16, and numbers beyond a double (1e400); the stdlib parser
    # accepts both. Invalid UTF-8, NaN and Infinity stay errors.
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ParseError("Parse error: request is not valid UTF-8", reason=str(exc)) from None
    except ValueError as exc:
        raise ParseError("Parse error: request is not valid JSON", reason=str(exc)) from None
    except RecursionError:
        raise ParseError("Parse error: request is nested too deeply", reason="nesting") from None


def is_valid_id(value: object) -> TypeGuard[RequestId]:
    return value is None or isinstance(value, (str, JsonNumber)) or (
        isinstance(value, (int, float)) and not isinstance(value, bool))


def id_key(id_: RequestId) -> IdKey:
    """Ids match by type and value: "1" and 1 are different requests."""
    return (type(id_).__name__, id_)


@dataclass(frozen=True)
class Call:
    """A well-formed request (`is_notification` False) or notification."""

    method: str
    params: Any  # dict, list, or None when absent
    id: RequestId
    is_notification: bool


class BadCall(RpcError):
    """An invalid request, remembering the id to answer with (null when unknown)."""

    def __init__(self, error: RpcError, id: RequestId = None) -> None:
        super().__init__(error.message, error.code, **error.data)
        self.id = id


def read_call(message: Any) -> Call:
    if not isinstance(message, dict):
        raise BadCall(InvalidRequest("Invalid Request: expected a JSON object",
                                     received=type(message).__name__))
    has_id = "id" in message
    id_ = message.get("id")
    if has_id and not is_valid_id(id_):
        raise BadCall(InvalidRequest("Invalid Request: id must be a string, a number or null",
                                     received=type(id_).__name__))
    if message.get("jsonrpc") != "2.0":
        raise BadCall(InvalidRequest('Invalid Request: "jsonrpc" must be exactly "2.0"'), id_)
    method = message.get("method")
    if not isinstance(method, str):
        raise BadCall(InvalidRequest('Invalid Request: "method" must be a string'), id_)
    params = message.get("params")
    if "params" in message and not isinstance(params, (dict, list)):
        raise BadCall(InvalidRequest('Invalid Request: "params" must be an object or an array'), id_)
    return Call(method, params, id_, not has_id)


def result_message(id_: RequestId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": result}


def error_message(id_: RequestId, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": error.to_wire()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_ID_VALUE = re.compile(rb'\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null)')


def peek_id(head: bytes) -> RequestId:
    """Best-effort id of a request whose line was too large to parse: scan the head for a
    top-level "id" key, so the client's pending call is answered instead of left hanging."""
    depth, i, n = 0, 0, len(head)
    expect_key = False
    while i < n:
        c = head[i]
        if c == ord('"'):
            match = _STRING.match(head, i)
            if match is None:
                return None
            end = match.end()
            if depth == 1 and expect_key and match.group() == b'"id"':
                rest = head[end:].lstrip()
                if rest[:1] == b":":
                    value = _ID_VALUE.match(rest, 1)
                    if value is not None:
                        try:
                            parsed = json.loads(value.group(1))
                        except ValueError:
                            return None
                        if not _is_exact(parsed):
                            return JsonNumber(value.group(1).decode())
                        return parsed if is_valid_id(parsed) else None
            expect_key = False
            i = end
            continue
        if c in b"{[":
            depth += 1
            expect_key = c == ord("{") and depth == 1
        elif c in b"}]":
            depth -= 1
        elif c == ord(",") and depth == 1:
            expect_key = True
        i += 1
    return None

"""The protocol schema (protocol/schema, the single source of truth) as params validators."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from .errors import InvalidParams

_SCHEMA_NAME = "protocol.schema.json"


def schema_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "protocol" / "schema", here / "_protocol" / "schema"):
        if (candidate / _SCHEMA_NAME).is_file():
            return candidate / _SCHEMA_NAME
    raise FileNotFoundError("protocol schema not found next to the sidecar package")


@functools.cache
def raw_schema() -> dict[str, Any]:
    """The schema file as written."""
    schema: dict[str, Any] = json.loads(schema_path().read_text(encoding="utf-8"))
    return schema


@functools.cache
def protocol_schema() -> dict[str, Any]:
    """The schema with shared params inlined: where a params object names the properties it
    shares with others by a `$ref` beside its own (`"$ref": "#/$defs/GenerationParams"`, then
    `unevaluatedProperties: false`), the referenced properties are copied in and the object
    closes with `additionalProperties: false`. It accepts exactly what the file does, lists
    each param in one `properties` (as readers such as the REPL look them up), and a bad
    shared param is reported once, at its own path."""
    root = raw_schema()
    return dict(root, methods=_inlined(root["methods"], root), notifications=_inlined(root["notifications"], root))


def _inlined(node: Any, root: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inlined(item, root) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _inlined(value, root) for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and "properties" in node and ref.startswith("#/$defs/"):
        shared = root["$defs"][ref.removeprefix("#/$defs/")]
        if set(shared) - {"type", "description", "properties"} or shared.get("type", "object") != "object":
            raise ValueError(f"{ref}: only a plain object of properties can be shared by $ref")
        node.pop("$ref")
        node["properties"] = {**shared["properties"], **node["properties"]}
        if node.pop("unevaluatedProperties", True) is False:
            node["additionalProperties"] = False
    return node


@functools.cache
def _validator(kind: str, name: str, part: str) -> Draft202012Validator:
    root = protocol_schema()
    if name not in root[kind]:
        raise KeyError(name)
    pointer = f"#/{kind}/{name.replace('~', '~0').replace('/', '~1')}/{part}"
    return Draft202012Validator(dict(root, **{"$ref": pointer}))


def method_names() -> list[str]:
    return list(protocol_schema()["methods"])


MAX_DEPTH = 64  # no params of the protocol nest deeper; validators recurse per level
MAX_VALUES = 65536  # nor hold more values: the schema check costs ~10 µs a value
PATH_LEVELS = 4  # how deep a path a size error shows
# A JSON Schema in params (a tool's parameters, a responseFormat's schema) is checked against
# the metaschema (~100 µs a value) and compiled into a token mask (time that grows with the
# square of an object's properties: 10,000 took 10 s): each may hold this many values, and a
# request's tools this many together.
MAX_SCHEMA_VALUES = 4096
MAX_TOOL_SCHEMA_VALUES = 16384
MAX_ERRORS = 16
_SHORT = 48


def _pointer(path: Any) -> str:
    return "".join(f"/{p}" for p in path)


def _short(value: Any) -> str:
    """A bad value as an error message shows it: never more than a short prefix."""
    if isinstance(value, str):
        return repr(value) if len(value) <= _SHORT else f"{value[:_SHORT]!r}… ({len(value)} characters)"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} members"
    text = repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT] + "…"


def _message(error: Any) -> str:
    """jsonschema's own message, unless it quotes a long value: then a short one."""
    if len(error.message) <= 2 * _SHORT + 40:
        return str(error.message)
    return f"{_short(error.instance)} does not satisfy {error.validator} {_short(error.validator_value)}"


def check_size(value: Any, path: str = "", levels: int = PATH_LEVELS, max_values: int = MAX_VALUES) -> int:
    """How many values `value` holds. InvalidParams when it nests deeper than MAX_DEPTH or
    holds more than `max_values`, naming where (down to `levels` levels below `path`).
    Counted without recursion, and only as far as the first limit passed: the check costs
    little however big the value is."""
    count = 1
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]  # (node, depth, the path to it)
    while stack:
        node, depth, where = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        if depth > MAX_DEPTH:
            _too_big(path, where, f"nested more than {MAX_DEPTH} levels deep")
        count += len(node)
        if count > max_values:
            _too_big(path, where[:1], f"holds more than {max_values} values")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        if len(where) < levels:
            stack.extend((child, depth + 1, (*where, key)) for key, child in items)
        else:  # deeper paths are not shown: the children share their parent's
            stack.extend((child, depth + 1, where) for _, child in items)
    return count


def json_text_value(text: str, path: str) -> Any:
    """A JSON text inside params (a tool call's `arguments`) as its value, held to the limits
    params are held to (-32602 at `path`). ValueError when the text is not JSON."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(text)  # what orjson refuses: lone surrogates, numbers beyond a double
        except RecursionError:
            _too_big(path, (), f"nested more than {MAX_DEPTH} levels deep")
    check_size(value, path, levels=0)  # a path into the text is no path into params
    return value


def _too_big(path: str, where: tuple[Any, ...], problem: str) -> None:
    shown = []
    for key in where:
        if len(str(key)) > _SHORT:
            break
        shown.append(key)
    pointer = path + _pointer(shown)
    raise InvalidParams(f"Invalid params: {pointer or '/'}: {problem}", errors=[{"path": pointer, "message": problem}])


def check(kind: str, name: str, part: str, instance: Any) -> None:
    """Raise InvalidParams listing the offending paths (at most MAX_ERRORS of them)."""
    check_size(instance)
    _check_item_counts(instance, protocol_schema()[kind][name][part])
    errors = sorted(_validator(kind, name, part).iter_errors(instance),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        details = [{"path": _pointer(e.absolute_path), "message": _message(e)} for e in errors[:MAX_ERRORS]]
        summary = "; ".join(f"{d['path'] or '/'}: {d['message']}" for d in details[:3])
        raise InvalidParams(f"Invalid params: {summary}", errors=details)


def _check_item_counts(instance: Any, node: Any) -> None:
    """The maxItems of the params' own arrays (21,000 messages where 4,096 may be), before the
    schema is checked: it would check every item first."""
    properties = _resolve(node).get("properties") or {} if isinstance(instance, dict) else {}
    for key, value in instance.items() if properties else ():
        limit = _resolve(properties.get(key) or {}).get("maxItems")
        if isinstance(value, list) and limit is not None and len(value) > limit:
            message = f"{_short(value)} does not satisfy maxItems {limit}"
            raise InvalidParams(f"Invalid params: /{key}: {message}", errors=[{"path": f"/{key}", "message": message}])


def check_params(method: str, params: Any) -> dict[str, Any]:
    """Params are named (an object); absent params are an empty object. Integral floats
    where the schema wants an integer (JSON Schema accepts 2.0 as one) become ints."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams("Invalid params: params must be an object of named parameters",
                            errors=[{"path": "", "message": "expected an object"}])
    check("methods", method, "params", params)
    checked: dict[str, Any] = _integers_as_ints(params, _resolve(protocol_schema()["methods"][method]["params"]))
    return checked


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = protocol_schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _integers_as_ints(value: Any, node: Any) -> Any:
    node = _resolve(node)
    if not isinstance(node, dict):
        return value
    if isinstance(value, float) and node.get("type") == "integer" and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, child in value.items():
            schema = properties.get(key, extra if isinstance(extra, dict) else None)
            if schema is not None:
                value[key] = _integers_as_ints(child, schema)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, child in enumerate(value):
            value[index] = _integers_as_ints(child, node["items"])
    return value

"""The protocol schema (protocol/schema, the single source of truth) as params validators."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

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
def protocol_schema() -> dict[str, Any]:
    return json.loads(schema_path().read_text(encoding="utf-8"))


@functools.cache
def _validator(kind: str, name: str, part: str) -> Draft202012Validator:
    root = protocol_schema()
    if name not in root[kind]:
        raise KeyError(name)
    pointer = f"#/{kind}/{name.replace('~', '~0').replace('/', '~1')}/{part}"
    return Draft202012Validator(dict(root, **{"$ref": pointer}))


def method_names() -> list[str]:
    return list(protocol_schema()["methods"])


def _pointer(path: Any) -> str:
    return "".join(f"/{p}" for p in path)


def check(kind: str, name: str, part: str, instance: Any) -> None:
    """Raise InvalidParams listing every offending path."""
    errors = sorted(_validator(kind, name, part).iter_errors(instance),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        details = [{"path": _pointer(e.absolute_path), "message": e.message} for e in errors]
        summary = "; ".join(f"{d['path'] or '/'}: {d['message']}" for d in details[:3])
        raise InvalidParams(f"Invalid params: {summary}", errors=details)


def check_params(method: str, params: Any) -> dict[str, Any]:
    """Params are named (an object); absent params are an empty object."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams("Invalid params: params must be an object of named parameters",
                            errors=[{"path": "", "message": "expected an object"}])
    check("methods", method, "params", params)
    return params

"""One source of truth: the protocol's constants live in the schema and everything else is
generated from it or checked against it."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from sidecar import errors, protocol_defs, schema
from sidecar.errors import RpcError
from sidecar.protocol_defs import (
    ERROR_CODES,
    ERROR_MEANINGS,
    GENERATION_DEFAULTS,
    INVALID_PARAMS,
    METHOD_NAMES,
    NOTIFICATION_NAMES,
    PROTOCOL_VERSION,
)

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protocol_defs", ROOT / "scripts" / "gen_protocol_defs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_files_match_the_schema() -> None:
    generator = _generator()
    for path, text in generator.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is out of date: run `python scripts/gen_protocol_defs.py`")
    assert generator.main(["--check"]) == 0


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    Draft202012Validator.check_schema(schema.raw_schema())


def test_the_constants_are_the_schemas() -> None:
    raw = schema.raw_schema()
    entries = raw["$defs"]["ErrorCode"]["oneOf"]
    assert {e["title"]: e["const"] for e in entries} == ERROR_CODES
    assert {e["const"]: e["description"] for e in entries} == ERROR_MEANINGS
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)
    assert all(getattr(protocol_defs, name) == code for name, code in ERROR_CODES.items())
    assert raw["$defs"]["ProtocolVersion"]["const"] == PROTOCOL_VERSION
    assert raw["methods"]["initialize"]["result"]["properties"]["protocolVersion"] == {
        "$ref": "#/$defs/ProtocolVersion"}
    assert METHOD_NAMES == tuple(raw["methods"]) == tuple(schema.method_names())
    assert tuple(raw["notifications"]) == NOTIFICATION_NAMES


def test_every_code_has_its_error_class_and_no_class_invents_one() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, RpcError) and c is not RpcError]
    assert sorted(c.code for c in classes) == sorted(ERROR_CODES.values())
    assert all(getattr(errors, name) == code for name, code in ERROR_CODES.items())


def test_every_method_the_schema_names_is_served_and_no_other() -> None:
    from sidecar.methods import METHODS

    assert sorted(METHODS) == sorted(METHOD_NAMES)


def _error_codes(value: Any) -> Iterator[int]:
    if isinstance(value, dict):
        if isinstance(value.get("error"), dict) and isinstance(value["error"].get("code"), int):
            yield value["error"]["code"]
        for item in value.values():
            yield from _error_codes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _error_codes(item)


def test_the_vectors_expect_only_codes_the_schema_defines() -> None:
    seen = set()
    for path in sorted((ROOT / "protocol" / "vectors").glob("*.json")):
        codes = set(_error_codes(json.loads(path.read_text(encoding="utf-8"))))
        assert codes <= set(ERROR_MEANINGS), f"{path.name}: unknown codes {codes - set(ERROR_MEANINGS)}"
        seen |= codes
    assert INVALID_PARAMS in seen


# ---- chat and generate share their params ------------------------------------------------


def test_chat_and_generate_take_their_shared_params_from_one_definition() -> None:
    raw = schema.raw_schema()
    shared = raw["$defs"]["GenerationParams"]["properties"]
    for method, own in (("chat", "messages"), ("generate", "prompt")):
        params = raw["methods"][method]["params"]
        assert params["$ref"] == "#/$defs/GenerationParams" and params["unevaluatedProperties"] is False
        assert own in params["properties"] and not set(params["properties"]) & set(shared)
        inlined = schema.protocol_schema()["methods"][method]["params"]
        assert set(inlined["properties"]) == set(shared) | set(params["properties"])
        assert inlined["additionalProperties"] is False


def test_the_generation_defaults_are_valid_values_of_their_params() -> None:
    shared = schema.raw_schema()["$defs"]["GenerationParams"]["properties"]
    assert GENERATION_DEFAULTS["repetitionContextSize"] == 20 and GENERATION_DEFAULTS["topK"] == 0
    for name, value in GENERATION_DEFAULTS.items():
        assert shared[name]["default"] == value
        schema.check_params("generate", {"prompt": "x", name: value})


MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = [
    ("chat", {"messages": MESSAGES}),
    ("chat", {"messages": MESSAGES, "temperature": 0.5, "topK": 3, "stop": ["x"], "tools": []}),
    ("chat", {"messages": MESSAGES, "unknown": 1}),
    ("chat", {"messages": MESSAGES, "prompt": "only generate takes it"}),
    ("chat", {"messages": MESSAGES, "temperature": -1, "model": "m"}),
    ("chat", {"messages": MESSAGES, "temperature": -1, "unknown": 2, "tools": 3}),
    ("chat", {"temperature": 0.5}),
    ("generate", {"prompt": "x", "seed": 7, "logitBias": {"5": -100}, "_meta": {"progressToken": 1}}),
    ("generate", {"prompt": "x", "messages": MESSAGES}),
    ("generate", {"prompt": "x", "thinking": True}),
    ("generate", {"prompt": "x", "topP": 2, "stream": "yes"}),
    ("generate", {"prompt": 5}),
]


@pytest.mark.parametrize("method,params", PARAMS)
def test_the_schema_as_written_and_the_validators_agree(method: str, params: dict[str, Any]) -> None:
    """The validators read the schema with the shared params inlined: they accept exactly what
    the file does (as any 2020-12 validator reads it), and each bad param is reported at its path."""
    raw = schema.raw_schema()
    as_written = Draft202012Validator(dict(raw, **{"$ref": f"#/methods/{method}/params"}))
    written_paths = sorted({"/".join(map(str, e.absolute_path)) for e in as_written.iter_errors(params)})
    try:
        schema.check_params(method, json.loads(json.dumps(params)))
        paths = []
    except errors.InvalidParams as refused:
        assert refused.code == INVALID_PARAMS
        paths = sorted({d["path"].lstrip("/") for d in refused.data["errors"]})
    assert paths == written_paths


@pytest.mark.parametrize("method,params", [("chat", {"messages": MESSAGES, "unknown": 1}),
                                           ("generate", {"prompt": "x", "tools": []})])
def test_an_unknown_param_is_named_at_the_root(method: str, params: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidParams) as refused:
        schema.check_params(method, params)
    (error,) = refused.value.data["errors"]
    unknown = next(iter(set(params) - {"messages", "prompt"}))
    assert error["path"] == "" and repr(unknown) in error["message"]


def test_a_bad_shared_param_is_reported_once_at_its_own_path() -> None:
    with pytest.raises(errors.InvalidParams) as refused:
        schema.check_params("chat", {"messages": MESSAGES, "temperature": -1, "model": "m"})
    assert refused.value.data["errors"] == [{"path": "/temperature", "message": "-1 is less than the minimum of 0"}]

"""Hostile bodies against the real sidecar: JSON nested past the limits inside params and
inside strings, more values than any request needs, prompts far too long for the context,
bodies at the line limit sent again and again, paths that must be refused alike, and values
that try to forge log lines. What happens is what RELIABILITY.md says happens."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.protocol_defs import CONTEXT_LENGTH_EXCEEDED, FORBIDDEN, INVALID_PARAMS
from sidecar.schema import MAX_DEPTH, MAX_SCHEMA_VALUES, MAX_TOOL_SCHEMA_VALUES, MAX_VALUES

from .conftest import Sidecars, serving
from .soak_support import scaled
from .test_models import copy_demo

MiB = 1 << 20
SMALL_CONTEXT = 256
LONGEST_DEMO_TOKEN = "<|endoftext|>"  # 13 bytes: no token of the demo model stands for more


@pytest.fixture(scope="module")
def small_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, and a copy of it that says its context is SMALL_CONTEXT tokens."""
    root = tmp_path_factory.mktemp("hostile-models")
    copy_demo(models_dir, root / "demo")
    small = copy_demo(models_dir, root / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=SMALL_CONTEXT)))
    return root


@pytest.fixture(scope="module")
def client(small_models: Path, sidecar_env: dict[str, str]) -> Iterator[SidecarClient]:
    with serving({**sidecar_env, "LOCALMLX_MODELS_DIR": str(small_models)}) as client:
        yield client
        assert not [line for line in client.stderr_lines if "RecursionError" in line or "Traceback" in line]


def error_of(client: SidecarClient, method: str, params: dict) -> RpcCallError:
    with pytest.raises(RpcCallError) as refused:
        client.request(method, params, timeout=300)
    return refused.value


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def chat_with_arguments(arguments: str) -> dict:
    """A conversation whose assistant turn called a tool with `arguments` (a JSON text)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {"model": "demo", "maxTokens": 1, "temperature": 0, "messages": [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": None, "toolCalls": [call]},
        {"role": "tool", "toolCallId": "call_1", "content": "sunny"}]}


def schema_nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# ---- nesting and size -----------------------------------------------------------------------


@pytest.mark.parametrize("arguments", [nested_array(1000), nested_object(1000), nested_array(100_000),
                                       nested_array(MAX_DEPTH + 1)])
def test_tool_call_arguments_nested_too_deep_are_invalid_params_at_their_path(client, arguments) -> None:
    error = error_of(client, "chat", chat_with_arguments(arguments))
    assert error.code == INVALID_PARAMS
    assert error.data["errors"] == [{"path": "/messages/1/toolCalls/0/function/arguments",
                                     "message": f"nested more than {MAX_DEPTH} levels deep"}]


def test_tool_call_arguments_as_deep_as_params_may_be_are_rendered(client) -> None:
    for arguments in (nested_array(MAX_DEPTH), json.dumps({"city": "Oslo"}), "not JSON at all"):
        assert client.request("chat", chat_with_arguments(arguments))["finishReason"] in ("stop", "length")


def test_schemas_nested_too_deep_are_invalid_params_at_their_path(client) -> None:
    deep = schema_nested(300)  # 900 levels of JSON
    tool = {"type": "function", "function": {"name": "weather", "parameters": deep}}
    for params, path in (({"tools": [tool]}, "/tools/0/function/parameters"),
                         ({"responseFormat": {"type": "json_schema", "schema": deep}},
                          "/responseFormat/schema/properties/a")):
        error = error_of(client, "chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}], **params})
        assert error.code == INVALID_PARAMS
        assert error.data["errors"] == [{"path": path, "message": f"nested more than {MAX_DEPTH} levels deep"}]


def test_more_values_than_any_request_needs_are_refused_before_the_schema_is_checked(client) -> None:
    many = [{"role": "user", "content": "x"}] * (MAX_VALUES // 2)
    error = error_of(client, "chat", {"model": "demo", "messages": many})
    assert error.code == INVALID_PARAMS
    assert error.data["errors"] == [{"path": "/messages", "message": f"holds more than {MAX_VALUES} values"}]
    too_many_messages = [{"role": "user", "content": "x"}] * 4097
    error = error_of(client, "chat", {"model": "demo", "messages": too_many_messages})
    assert error.code == INVALID_PARAMS and error.data["errors"][0]["path"] == "/messages"
    assert client.request("ping") == {}


def test_schemas_bigger_than_checking_and_compiling_them_can_afford_are_invalid_params(client) -> None:
    def schema_of(properties: int) -> dict:  # 3 + 2 values a property
        return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(properties)}}

    def tool(name: str, properties: int) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": schema_of(properties)}}

    message = [{"role": "user", "content": "x"}]
    for params, path, problem in (
            ({"tools": [tool("big", MAX_SCHEMA_VALUES // 2)]}, "/tools/0/function/parameters",
             f"holds more than {MAX_SCHEMA_VALUES} values"),
            ({"responseFormat": {"type": "json_schema", "schema": schema_of(MAX_SCHEMA_VALUES // 2)}},
             "/responseFormat/schema", f"holds more than {MAX_SCHEMA_VALUES} values"),
            ({"tools": [tool(f"t{i}", MAX_SCHEMA_VALUES // 4) for i in range(8)]}, "/tools",
             f"parameters hold more than {MAX_TOOL_SCHEMA_VALUES} values together")):
        error = error_of(client, "chat", {"model": "demo", "messages": message, **params})
        assert error.code == INVALID_PARAMS and error.data["errors"] == [{"path": path, "message": problem}]
    fits = {"tools": [tool("fits", (MAX_SCHEMA_VALUES - 3) // 2)], "maxTokens": 1}
    assert client.request("chat", {"model": "demo", "messages": message, **fits})["finishReason"] in ("stop", "length")


# ---- prompts too long for the context -------------------------------------------------------


def test_a_prompt_too_long_for_the_context_by_its_length_alone_is_refused_before_it_is_tokenized(client) -> None:
    context = client.request("models/status", {"model": "demo"})["description"]["contextLength"]
    for method, params in (("chat", {"messages": [{"role": "user", "content": "sea " * (15 * MiB // 4)}]}),
                           ("generate", {"prompt": "sea " * (8 * MiB // 4)})):
        error = error_of(client, method, {"model": "demo", **params})
        assert error.code == CONTEXT_LENGTH_EXCEEDED
        assert error.data["judgedBy"] == "length" and error.data["contextLength"] == context
        assert error.data["promptTokens"] >= context and "at least" in error.message
    assert client.request("chat", {"model": "demo", "messages": [{"role": "user", "content": "sea"}],
                                   "maxTokens": 1})["finishReason"] in ("stop", "length")


def test_a_prompt_that_fits_is_never_refused_by_its_length(client, small_models) -> None:
    """The tightest case: every token the longest the vocabulary has, as many as fit."""
    from mlx_lm.utils import load_tokenizer

    from sidecar.length_bound import most_bytes_per_token

    assert most_bytes_per_token(load_tokenizer(small_models / "small")) == (len(LONGEST_DEMO_TOKEN),) * 2
    fits = client.request("generate", {"model": "small", "prompt": LONGEST_DEMO_TOKEN * (SMALL_CONTEXT - 1),
                                       "maxTokens": 1, "temperature": 0})
    assert fits["usage"]["promptTokens"] == SMALL_CONTEXT - 1
    error = error_of(client, "generate", {"model": "small", "prompt": LONGEST_DEMO_TOKEN * SMALL_CONTEXT})
    assert error.code == CONTEXT_LENGTH_EXCEEDED and error.data["judgedBy"] == "length"


def test_a_prompt_short_in_bytes_but_long_in_tokens_is_refused_once_tokenized(client) -> None:
    text = "\u00e9\u4e2d\U0001f642" * 120  # 1,080 bytes: several tokens each
    assert len(client.request("tokenize", {"model": "small", "text": text})["tokens"]) >= SMALL_CONTEXT
    error = error_of(client, "generate", {"model": "small", "prompt": text})
    assert error.code == CONTEXT_LENGTH_EXCEEDED and "judgedBy" not in error.data
    assert error.data["promptTokens"] >= SMALL_CONTEXT and error.data["contextLength"] == SMALL_CONTEXT


# ---- memory -----------------------------------------------------------------------------------

# What a burst of maximal refused requests may leave behind, measured: +40 to +70 MiB on Linux
# (scripts/bench_hostile.py); the same burst grew the sidecar by 1.9 GiB before.
MEMORY_MARGIN = 160 * MiB


def test_memory_comes_back_after_bursts_of_maximal_refused_requests(client) -> None:
    chat = {"model": "demo", "maxTokens": 8, "messages": [{"role": "user", "content": "sea " * (15 * MiB // 4 - 64)}]}
    generate = {"model": "demo", "maxTokens": 8, "prompt": "sea " * (8 * MiB // 4)}
    client.request("chat", {"model": "demo", "messages": [{"role": "user", "content": "warm up"}], "maxTokens": 2})
    before = client.request("server/status")["memory"]["rssBytes"]
    for _ in range(scaled(2, 6)):
        for method, params in (("chat", chat), ("generate", generate)):
            assert error_of(client, method, params).code == CONTEXT_LENGTH_EXCEEDED
    client.received.clear()  # the transcript is the test's, not the sidecar's, memory
    deadline = time.monotonic() + 30
    while (after := client.request("server/status")["memory"]["rssBytes"]) - before > MEMORY_MARGIN:
        assert time.monotonic() < deadline, f"RSS {before / MiB:.0f} MiB before, {after / MiB:.0f} MiB after"
        time.sleep(0.1)


# ---- paths ---------------------------------------------------------------------------------


def test_every_refused_path_gets_the_same_answer_whether_or_not_it_exists(client, small_models) -> None:
    refs = ["~root/.ssh", "~nosuchuser/.ssh", "~nosuchuser", "/etc/passwd", "/etc/no-such-file", "/no/such/dir",
            "../x", "./x/../../y", f"{small_models}/demo/../demo", f"{small_models}/../..", "~/../../etc"]
    answers = []
    for ref in refs:
        for method in ("models/load", "models/status"):
            error = error_of(client, method, {"model": ref})
            assert error.code == FORBIDDEN, (ref, error.message)
            assert error.data.pop("model") == ref
            answers.append((error.message, error.data))
    assert all(answer == answers[0] for answer in answers), answers
    assert "allowed model roots" in answers[0][0]


# ---- logs --------------------------------------------------------------------------------------

FORGED = "2030-01-01 00:00:00,000 ERROR localmlx.session: forged record"
HOSTILE = f"nope\n{FORGED}\r\x1b[2J\x00\u2028{FORGED}"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_values_from_a_client_cannot_forge_a_log_line(sidecars: Sidecars, log_format: str) -> None:
    client = sidecars.spawn(LOCALMLX_LOG_LEVEL="DEBUG", LOCALMLX_LOG_FORMAT=log_format)
    client.send({"jsonrpc": "2.0", "method": HOSTILE})  # a notification nobody knows: logged, with its name
    client.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": {HOSTILE: 1}}})
    for model in (HOSTILE, f"/models/{HOSTILE}", f"{HOSTILE}/{HOSTILE}"):
        assert error_of(client, "models/load", {"model": model}).code == FORBIDDEN
    client.wait_for_log("forged record")
    assert client.close() == 0
    lines = client.stderr_lines
    assert not [line for line in lines if re.search("[\x00-\x08\x0b-\x1f\x7f\u2028]", line)]
    if log_format == "text":
        assert all(RECORD.match(line) or line.startswith("  ") for line in lines), lines
        assert not [line for line in lines if line.startswith(FORGED)]
        messages = lines
    else:
        messages = [json.loads(line)["message"] for line in lines]
        assert not [message for message in messages if re.search("[\x00-\x1f\x7f\u2028]", message)]
    assert any("nope\\n2030-01-01" in message for message in messages)  # there, escaped

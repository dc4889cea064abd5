"""Structured output (`responseFormat`) through the real sidecar, and the tool-call grammar
with real tokenizers: random-weight models write JSON that parses and validates because the
token mask leaves them nothing else to write."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model
from sidecar.engine.constraints import compile_constraint, compile_tool_call, response_format_grammar
from sidecar.errors import InvalidParams
from sidecar.protocol_defs import INVALID_PARAMS

from .conftest import serving
from .families import FAMILIES_BY_NAME, build

DEMO = DEMO_MODEL_DIRNAME
QWEN = FAMILIES_BY_NAME["qwen2.5"].dirname("bf16")

# Every string, number and array bounded: random weights then finish well within maxTokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "position": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                                      "y": {"type": "number", "minimum": 0, "maximum": 10}},
                     "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "position"],
    "additionalProperties": False,
}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
         "required": ["ok", "level"], "additionalProperties": False}
# Long on purpose (a fixed 60 single-word items): still running when a second request arrives.
LONG = {"type": "object", "properties": {"words": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
                                                   "minItems": 60, "maxItems": 60}},
        "required": ["words"], "additionalProperties": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("structured-models")
    build_demo_model(root / DEMO)
    for name in ("qwen2.5", "qwen3", "mistral"):
        build(root, FAMILIES_BY_NAME[name], "bf16")
    return root


@pytest.fixture(scope="module")
def server(models: Path, sidecar_env: dict[str, str]) -> Iterator[SidecarClient]:
    with serving({**sidecar_env, "LOCALMLX_MODELS_DIR": str(models), "LOCALMLX_PREFIX_CACHE": "false"}) as client:
        yield client


def chat(model: str, response_format: dict | None, **extra: Any) -> dict[str, Any]:
    params = {"model": model, "messages": [{"role": "user", "content": "Describe a person."}],
              "temperature": 0.8, "seed": 7, "maxTokens": 300, "cache": False, **extra}
    if response_format is not None:
        params["responseFormat"] = response_format
    return params


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "schema": schema, "name": "test"}


def streamed(client: SidecarClient, method: str, params: dict) -> tuple[str, dict]:
    *chunks, response = list(client.stream(method, params))
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    return "".join(c["text"] for c in chunks), response["result"]


def assert_valid(text: str, schema: dict) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---- through the sidecar -------------------------------------------------------------------------


@pytest.mark.parametrize("model", [DEMO, QWEN])
def test_json_schema_output_validates_streamed_or_not(server, model) -> None:
    result = server.request("chat", chat(model, schema_format(PERSON)))
    assert result["finishReason"] == "stop", result
    assert_valid(result["text"], PERSON)
    assert result["timings"]["maskMsPerToken"] > 0

    text, streamed_result = streamed(server, "chat", chat(model, schema_format(PERSON)))
    assert streamed_result["finishReason"] == "stop"
    assert text == result["text"], "the same seed writes the same JSON, streamed or not"


def test_generate_takes_a_response_format_too(server) -> None:
    result = server.request("generate", {"model": DEMO, "prompt": "Flags:", "temperature": 0, "maxTokens": 100,
                                         "responseFormat": schema_format(FLAGS), "cache": False})
    assert result["finishReason"] == "stop"
    assert_valid(result["text"], FLAGS)


def test_json_object_is_any_json_object(server) -> None:
    # Random weights may wander in a free string key until maxTokens ("length", the text as
    # far as it got); seeds 1 and 3 close the object at once on the demo model.
    finishes = []
    for seed in range(4):
        result = server.request("chat", chat(DEMO, {"type": "json_object"}, seed=seed))
        finishes.append(result["finishReason"])
        if result["finishReason"] == "stop":
            assert isinstance(json.loads(result["text"]), dict)
        else:
            assert result["finishReason"] == "length" and result["text"].startswith("{")
    assert "stop" in finishes


def test_mask_cost_is_reported_only_for_constrained_requests(server) -> None:
    plain = server.request("chat", chat(DEMO, None, maxTokens=8))
    text = server.request("chat", chat(DEMO, {"type": "text"}, maxTokens=8))
    assert "maskMsPerToken" not in plain["timings"] and "maskMsPerToken" not in text["timings"]
    assert text["text"] == plain["text"]
    constrained = server.request("chat", chat(DEMO, schema_format(FLAGS)))
    assert constrained["timings"]["maskMsPerToken"] >= 0


def test_running_out_of_tokens_is_length_with_the_partial_text(server) -> None:
    full = server.request("chat", chat(DEMO, schema_format(PERSON)))
    cut = server.request("chat", chat(DEMO, schema_format(PERSON), maxTokens=6))
    assert cut["finishReason"] == "length" and cut["usage"]["completionTokens"] == 6
    assert full["text"].startswith(cut["text"]) and cut["text"] != full["text"]


def test_a_schema_that_cannot_compile_is_invalid_params_and_the_sidecar_serves_on(server) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
    with pytest.raises(RpcCallError) as raised:
        server.request("chat", chat(DEMO, schema_format(bad)))
    error = raised.value
    assert error.code == INVALID_PARAMS
    [detail] = error.data["errors"]
    assert detail["path"] == "/responseFormat/schema" and "look-around" in detail["message"]
    assert len(error.message) < 300
    result = server.request("chat", chat(DEMO, schema_format(FLAGS)))
    assert_valid(result["text"], FLAGS)


def test_the_response_cache_tells_formats_apart(server) -> None:
    base = {"model": DEMO, "messages": [{"role": "user", "content": "cache me"}], "temperature": 0, "maxTokens": 40}
    server.request("chat", base)
    assert server.request("chat", base).get("cached") is True
    constrained = server.request("chat", {**base, "responseFormat": schema_format(FLAGS)})
    assert "cached" not in constrained
    assert_valid(constrained["text"], FLAGS)
    other = server.request("chat", {**base, "responseFormat": schema_format({**FLAGS, "required": ["ok"]})})
    assert "cached" not in other
    assert server.request("chat", {**base, "responseFormat": schema_format(FLAGS)}).get("cached") is True


def test_concurrent_constrained_and_free_requests_batch_on_one_model(server) -> None:
    formats = [schema_format(PERSON), None, schema_format(FLAGS), {"type": "json_object"}, None,
               schema_format({"type": "array", "items": FLAGS, "maxItems": 2})]  # json_object: seed 3 closes it
    requests = [chat(DEMO, f, seed=i, maxTokens=300 if f else 30) for i, f in enumerate(formats)]
    alone = [server.request("chat", r) for r in requests]
    ids = [server.start_request("chat", r) for r in requests]
    assert alone[3]["finishReason"] == "stop"
    together = [server.wait_response(i)["result"] for i in ids]
    for fmt, result, solo in zip(formats, together, alone, strict=True):
        if fmt is None:
            assert "maskMsPerToken" not in result["timings"]
            continue
        assert result["finishReason"] == "stop", (fmt, result["text"][:200], solo["text"][:200])
        schema = fmt.get("schema", {"type": "object"})
        assert assert_valid(result["text"], schema) == json.loads(solo["text"])


def test_a_constrained_stream_moved_into_the_batch_mid_way_still_validates(server) -> None:
    first_chunk = threading.Event()
    collected: dict[str, Any] = {}

    def run_first() -> None:
        chunks = []
        for item in server.stream("chat", chat(DEMO, schema_format(LONG), maxTokens=1000)):
            if "seq" in item:
                chunks.append(item["text"])
                first_chunk.set()
            else:
                collected["result"] = item["result"]
        collected["text"] = "".join(chunks)

    thread = threading.Thread(target=run_first)
    thread.start()
    assert first_chunk.wait(60)
    second = server.request("chat", chat(DEMO, schema_format(FLAGS), seed=1))  # joins: the first moves into the batch
    assert "result" not in collected, "the two ran at once: the first was handed over into the batch"
    thread.join(120)
    assert collected["result"]["finishReason"] == "stop"
    assert_valid(second["text"], FLAGS)
    words = assert_valid(collected["text"], LONG)["words"]
    assert len(words) == 60
    assert collected["result"]["usage"]["completionTokens"] > second["usage"]["completionTokens"]
    alone = server.request("chat", chat(DEMO, schema_format(LONG), maxTokens=1000))
    assert json.loads(alone["text"]) == json.loads(collected["text"]), "moving does not change what it writes"


# ---- the grammar with real tokenizers -----------------------------------------------------------


@functools.cache
def tokenizer(path: Path) -> Any:
    from mlx_lm.utils import load_config, load_tokenizer

    return load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))


def vocab_size(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


def sample(path: Path, constraint: Any, seed: int, steps: int = 400, forced: list[int] = ()) -> str:
    """Random logits (seeded) through the mask, argmax, until end of sequence; `forced` tokens
    first (each must be allowed)."""
    import mlx.core as mx

    tok = tokenizer(path)
    width = vocab_size(path)
    prompt = [0, 1, 2]
    process = constraint.processor(len(prompt))
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    for step in range(steps):
        logits = process(mx.array(tokens), mx.array(rng.standard_normal((1, width)).astype(np.float32)))
        token = int(mx.argmax(logits, axis=-1).item())
        if step < len(forced):
            assert logits[0, forced[step]].item() > -np.inf, f"forced token {step} is masked off"
            token = forced[step]
        assert token < len(tok._tokenizer), "padding rows of the embedding are masked off"
        if token in tok.eos_token_ids:
            return tok._tokenizer.decode(tokens[len(prompt):], skip_special_tokens=False)
        tokens.append(token)
    raise AssertionError("no end of sequence: the grammar should have ended")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 10},
                                                 "unit": {"enum": ["c", "f"]}},
                                                 "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now"}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK, ADD]


def check_call(call: dict, allowed: set[str]) -> None:
    assert set(call) == {"name", "arguments"} and call["name"] in allowed
    parameters = next(t["function"].get("parameters") for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], parameters or {"type": "object", "maxProperties": 0})


def test_a_forced_tool_call_in_hermes_framing_parses_and_validates(models) -> None:
    from mlx_lm.tool_parsers import json_tools

    path = models / QWEN
    tok = tokenizer(path)
    assert (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")
    names = set()
    for seed in range(12):
        constraint = compile_tool_call(tok, vocab_size(path), TOOLS, "required", start=tok.tool_call_start,
                                       end=tok.tool_call_end, parser="json_tools")
        text = sample(path, constraint, seed)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        call = json_tools.parse_tool_call(text.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        check_call(call, {"get_weather", "now", "add"})
        names.add(call["name"])
    assert len(names) > 1, "required lets the model pick any tool"


def test_a_named_tool_choice_allows_only_that_tool_and_an_unknown_name_is_refused(models) -> None:
    path = models / QWEN
    tok = tokenizer(path)
    for seed in range(4):
        constraint = compile_tool_call(tok, vocab_size(path), TOOLS, "add", start=tok.tool_call_start,
                                       end=tok.tool_call_end)
        text = sample(path, constraint, seed)
        call = json.loads(text.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        check_call(call, {"add"})
    with pytest.raises(InvalidParams) as raised:
        compile_tool_call(tok, vocab_size(path), TOOLS, "nope", start=None, end=None)
    assert raised.value.data["errors"][0]["path"] == "/toolChoice"


def test_without_framing_the_call_is_the_bare_json_object(models) -> None:
    path = models / DEMO
    tok = tokenizer(path)
    for seed in range(4):
        call = json.loads(sample(path, compile_tool_call(tok, vocab_size(path), TOOLS, "get_weather",
                                                         start=None, end=None), seed))
        check_call(call, {"get_weather"})


def test_a_reasoning_block_may_come_first(models) -> None:
    path = models / FAMILIES_BY_NAME["qwen3"].dirname("bf16")  # <think> and </think> are added tokens
    tok = tokenizer(path)
    for reasoning in (("<think>", "</think>"), ("<why>", "</why>")):
        thought = tok._tokenizer.encode(f"{reasoning[0]}\nadd 2 and 3, </wh <think\n{reasoning[1]}\n",
                                        add_special_tokens=False)
        call_first = tok._tokenizer.encode(tok.tool_call_start, add_special_tokens=False)
        for seed, forced in enumerate([call_first, thought, thought]):  # the block is optional
            constraint = compile_tool_call(tok, vocab_size(path), [ADD], "required", start=tok.tool_call_start,
                                           end=tok.tool_call_end, reasoning=reasoning)
            text = sample(path, constraint, seed, forced=forced)
            if forced is thought:
                assert text.startswith(reasoning[0])
                text = text.partition(reasoning[1])[2]
            call = json.loads(text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>"))
            check_call(call, {"add"})


def test_mistral_framing_is_a_json_list_and_other_formats_are_refused(models) -> None:
    from mlx_lm.tool_parsers import mistral

    path = models / FAMILIES_BY_NAME["mistral"].dirname("bf16")
    tok = tokenizer(path)
    for seed in range(3):
        constraint = compile_tool_call(tok, vocab_size(path), [ADD, WEATHER], "required", start="[TOOL_CALLS]",
                                       end="", parser="mistral")
        text = sample(path, constraint, seed)
        assert text.startswith("[TOOL_CALLS][")
        check_call(mistral.parse_tool_call(text.removeprefix("[TOOL_CALLS]")), {"add", "get_weather"})
    for parser in ("pythonic", "qwen3_coder"):
        with pytest.raises(InvalidParams, match="not supported"):
            compile_tool_call(tok, vocab_size(path), TOOLS, "required", start="<tool_call>", end="</tool_call>",
                              parser=parser)


def test_the_mask_follows_a_sequence_shown_again_or_taken_back(models) -> None:
    """What a hand-over into the batch and a park do: the processor sees the same sequence
    twice, or one token shorter, and must mask the same as before."""
    import mlx.core as mx

    path = models / DEMO
    tok = tokenizer(path)
    grammar = response_format_grammar(schema_format(FLAGS))
    constraint = compile_constraint(tok, vocab_size(path), grammar)
    process = constraint.processor(2)
    zeros = mx.zeros((1, vocab_size(path)))
    prefix = tok._tokenizer.encode('{"ok": true', add_special_tokens=False)
    first = process(mx.array([5, 6]), zeros)
    again = process(mx.array([5, 6]), zeros)
    assert mx.array_equal(first, again)
    after = process(mx.array([5, 6, *prefix]), zeros)
    assert not mx.array_equal(after, first)
    assert mx.array_equal(process(mx.array([5, 6]), zeros), first), "one token shorter: rolled back"
    assert mx.array_equal(process(mx.array([5, 6, *prefix]), zeros), after)
    assert constraint.mask_ms_per_token > 0


def test_wider_logits_than_the_tokenizer_are_masked_off(models) -> None:
    import mlx.core as mx

    path = models / QWEN
    tok = tokenizer(path)
    width = vocab_size(path)
    assert width > len(tok._tokenizer)
    constraint = compile_constraint(tok, width, response_format_grammar({"type": "json_object"}))
    masked = constraint.processor(1)(mx.array([0]), mx.zeros((1, width)))
    allowed = np.array(masked[0] > -np.inf)
    assert not allowed[len(tok._tokenizer):].any() and allowed.any()

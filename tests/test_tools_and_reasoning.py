"""Reasoning and tool calls on real tiny checkpoints with the real Qwen3 / Qwen2.5 templates and
vocabulary: the reasoning channel, thinkingBudget, the thinking switch, tool calls rendered
back into the template, and what the sidecar reads out of the model's text.

Random weights never write ``<think>`` or ``<tool_call>`` on their own (the family builder
keeps special tokens quiet), so reasoning is exercised with a thinking template that opens the
block itself (as Qwen3-Thinking-2507's does), and calls are read from text written in the
model's own format (constrained calls end to end are in test_structured_output.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.engine.channels import ANSWER, REASONING, TOOL, UNFINISHED_TOOL, OutputChannels
from sidecar.engine.tools import ToolCallReader, template_message
from sidecar.protocol_defs import INVALID_PARAMS

from .conftest import serving
from .families import FAMILIES_BY_NAME, build

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer", "minimum": 1}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                              "additionalProperties": False}}}


@pytest.fixture(scope="module")
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3 as built, qwen3-thinking (its template opens the think block, as the Thinking-2507
    releases do) and qwen2.5, side by side in one models directory."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("localmlx-families")) if cache is not None else tmp_path_factory.mktemp("families")
    here = tmp_path_factory.mktemp("reasoning-models")
    for name in ("qwen3", "qwen2.5"):
        source = build(root, FAMILIES_BY_NAME[name], "bf16")
        (here / name).symlink_to(source, target_is_directory=True)
    thinking = here / "qwen3-thinking"
    shutil.copytree(here / "qwen3", thinking)
    config_path = thinking / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    generation_prompt = "{{- '<|im_start|>assistant\\n' }}"
    assert config["chat_template"].count(generation_prompt) == 1
    config["chat_template"] = config["chat_template"].replace(
        generation_prompt, generation_prompt + "\n    {%- if enable_thinking is not defined or enable_thinking %}"
                                               "{{- '<think>\\n' }}{%- endif %}")
    config_path.write_text(json.dumps(config))
    return here


@pytest.fixture(scope="module")
def sidecar(models: Path, sidecar_env: dict[str, str]) -> Iterator[SidecarClient]:
    with serving({**sidecar_env, "LOCALMLX_MODELS_DIR": str(models), "LOCALMLX_ENABLE_CACHE": "false"}) as client:
        yield client


def tokenizer(models: Path, name: str) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(models / name)


def chat(content: str = "What is the weather in Paris?", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "maxTokens": 12, **extra}


def chunks_by_channel(items: list[dict[str, Any]]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    *chunks, response = items
    order = [(key, chunk[key]) for chunk in chunks for key in ("text", "reasoning", "toolCalls") if key in chunk]
    assert [chunk["seq"] for chunk in chunks] == list(range(len(chunks)))
    assert all(sum(key in chunk for key in ("text", "reasoning", "toolCalls")) == 1 for chunk in chunks)
    return order, response


# ---- reasoning ---------------------------------------------------------------------------------


def test_reasoning_goes_to_its_own_field_and_the_budget_closes_the_block(sidecar, models) -> None:
    budget = 4
    result = sidecar.request("chat", chat(model="qwen3-thinking", thinkingBudget=budget))
    closing = len(tokenizer(models, "qwen3-thinking").think_end_tokens)
    assert result["reasoning"], result
    assert result["usage"]["reasoningTokens"] == budget + closing
    assert result["usage"]["completionTokens"] == 12
    assert result["text"], "the answer follows the closed block"
    assert "<think>" not in result["text"] and "</think>" not in result["text"]
    assert "</think>" not in result["reasoning"]


def test_streamed_reasoning_arrives_on_its_channel_before_the_answer(sidecar) -> None:
    params = chat(model="qwen3-thinking", thinkingBudget=3)
    whole = sidecar.request("chat", params)
    order, response = chunks_by_channel(list(sidecar.stream("chat", params)))
    channels = [key for key, _ in order]
    assert channels[0] == "reasoning" and "text" in channels
    assert channels.index("text") > max(i for i, key in enumerate(channels) if key == "reasoning")
    assert "".join(value for key, value in order if key == "reasoning") == whole["reasoning"]
    assert "".join(value for key, value in order if key == "text") == whole["text"]
    result = response["result"]
    assert "reasoning" not in result and "text" not in result
    assert result["usage"]["reasoningTokens"] == whole["usage"]["reasoningTokens"]


def test_without_a_budget_an_unclosed_block_is_all_reasoning(sidecar) -> None:
    result = sidecar.request("chat", chat(model="qwen3-thinking"))
    assert result["finishReason"] == "length"
    assert result["text"] == "" and result["reasoning"]
    assert result["usage"]["reasoningTokens"] == result["usage"]["completionTokens"]


def test_thinking_false_switches_the_template_off(sidecar, models) -> None:
    on = sidecar.request("chat", chat(model="qwen3-thinking", maxTokens=2, thinking=True))
    off = sidecar.request("chat", chat(model="qwen3-thinking", maxTokens=2, thinking=False))
    assert on["reasoning"] and "reasoning" not in off and off["text"]
    assert off["usage"]["reasoningTokens"] == 0
    tok = tokenizer(models, "qwen3")
    messages = chat()["messages"]
    empty_block = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    plain = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True)
    result = sidecar.request("chat", chat(model="qwen3", maxTokens=1, thinking=False))
    assert result["usage"]["promptTokens"] == len(empty_block) > len(plain)


def test_raw_generate_keeps_think_markers_as_text(sidecar) -> None:
    result = sidecar.request("generate", {"model": "qwen3-thinking", "prompt": "<think>\nhm", "maxTokens": 4,
                                          "temperature": 0})
    assert "reasoning" not in result and "reasoningTokens" not in result["usage"]


# ---- tool calls --------------------------------------------------------------------------------


def conversation_with_a_call() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "toolCalls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "toolCallId": "call_1", "name": "get_weather", "content": "{\"sky\": \"clear\"}"}]


def test_capabilities_say_which_models_call_tools_and_think(sidecar) -> None:
    def capabilities(model: str) -> list[str]:
        return sidecar.request("models/load", {"model": model})["capabilities"]

    assert capabilities("qwen3") == ["chat", "generate", "tools", "thinking"]
    assert capabilities("qwen2.5") == ["chat", "generate", "tools"]
    assert capabilities("demo") == ["chat", "generate"]


def test_tools_and_earlier_calls_render_through_the_models_template(sidecar, models) -> None:
    messages = conversation_with_a_call()
    result = sidecar.request("chat", {"model": "qwen2.5", "messages": messages, "tools": [WEATHER, CLOCK],
                                      "maxTokens": 1, "temperature": 0})
    tok = tokenizer(models, "qwen2.5")
    rendered = tok.apply_chat_template([template_message(m, str, f"/messages/{i}") for i, m in enumerate(messages)], tools=[WEATHER, CLOCK],
                                       add_generation_prompt=True, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\n{\"sky\": \"clear\"}\n</tool_response>" in rendered
    assert '"name": "get_time"' in rendered  # the tools section
    assert result["usage"]["promptTokens"] == len(tok.encode(rendered, add_special_tokens=False))
    none = sidecar.request("chat", {"model": "qwen2.5", "messages": messages, "tools": [WEATHER, CLOCK],
                                    "toolChoice": "none", "maxTokens": 1, "temperature": 0})
    assert none["usage"]["promptTokens"] < result["usage"]["promptTokens"]  # no tools section


@pytest.mark.parametrize("params, path", [
    ({"toolChoice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
     "/toolChoice/function/name"),
    ({"toolChoice": "required"}, "/toolChoice"),
    ({"tools": [WEATHER, WEATHER]}, "/tools/1/function/name"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "frobnicate"}}}]},
     "/tools/0/function/parameters"),
])
def test_bad_tool_requests_are_invalid_params_and_the_sidecar_keeps_serving(sidecar, params, path) -> None:
    with pytest.raises(RpcCallError) as caught:
        sidecar.request("chat", chat(model="qwen2.5", **params))
    assert caught.value.code == INVALID_PARAMS
    assert caught.value.data["errors"][0]["path"] == path
    assert sidecar.request("chat", chat(model="qwen2.5", maxTokens=2))["finishReason"] == "length"


def test_a_tool_message_without_content_is_rejected_by_the_schema(sidecar) -> None:
    with pytest.raises(RpcCallError) as caught:
        sidecar.request("chat", {"model": "qwen2.5", "messages": [{"role": "tool", "toolCallId": "x"}]})
    assert caught.value.code == INVALID_PARAMS


# ---- reading the model's text (real tokenizers, no model) ----------------------------------------


def route(channels: OutputChannels, text: str, cuts: list[int]) -> list[tuple[str, str]]:
    pieces, start = [], 0
    for cut in [*cuts, len(text)]:
        pieces += channels.feed(text[start:cut])
        start = cut
    pieces += channels.flush()
    merged: list[tuple[str, str]] = []
    for channel, piece in pieces:
        if (merged and merged[-1][0] == channel and channel == ANSWER) or (merged and channel == REASONING == merged[-1][0]):
            merged[-1] = (channel, merged[-1][1] + piece)
        else:
            merged.append((channel, piece))
    return merged


def test_output_is_routed_the_same_however_the_text_is_cut(models) -> None:
    tok = tokenizer(models, "qwen3")
    text = ('<think>\nThe user wants weather.</think>\n\nLet me check. <tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>Done. STOP never shown')
    expected = [(REASONING, "\nThe user wants weather."), (ANSWER, "\n\nLet me check. "),
                (TOOL, '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'), (ANSWER, "Done.")]
    for step in (1, 2, 3, 7, len(text)):
        channels = OutputChannels(tok, [" STOP"], reasoning=True, tool_calls=True)
        assert route(channels, text, list(range(step, len(text), step))) == expected
        assert channels.stopped


def test_a_call_cut_off_is_unfinished_and_stop_strings_are_content_inside_reasoning(models) -> None:
    tok = tokenizer(models, "qwen3")
    channels = OutputChannels(tok, ["STOP"], reasoning=True, tool_calls=True, initial=REASONING)
    pieces = channels.feed("wait, STOP? no</think>ok <tool_call>{\"name\": \"get_we") + channels.flush()
    assert pieces == [(REASONING, "wait, STOP? no"), (ANSWER, "ok "), (UNFINISHED_TOOL, '{"name": "get_we')]
    plain = OutputChannels(tok, [], reasoning=False, tool_calls=False)
    assert plain.feed("<think>x</think><tool_call>") + plain.flush() == [(ANSWER, "<think>x</think><tool_call>")]


def test_calls_are_checked_against_the_tools_offered(models) -> None:
    tok = tokenizer(models, "qwen2.5")
    reader = ToolCallReader(tok.tool_parser, [WEATHER, CLOCK])

    def read(text: str, **kw: Any) -> dict[str, Any]:
        (call,) = reader.read(text, **kw)
        assert call["type"] == "function" and call["id"].startswith("call_")
        return call

    good = read('{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}')
    assert "error" not in good and json.loads(good["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert "error" not in read('{"name": "get_time", "arguments": {}}')
    assert "unknown tool" in read('{"name": "launch", "arguments": {}}')["error"]
    bad = read('{"name": "get_weather", "arguments": {"city": "Paris", "days": 0}}')
    assert "/days" in bad["error"] and bad["function"]["name"] == "get_weather"
    assert "required" in read('{"name": "get_weather", "arguments": {}}')["error"]
    assert "not a valid tool call" in read('{"name": "get_weather", "arguments": {"city"')["error"]
    cut = read('{"name": "get_weather"', unfinished=True)
    assert "cut off" in cut["error"]
    ids = {read('{"name": "get_time", "arguments": {}}')["id"] for _ in range(3)}
    assert len(ids) == 3
    # Arguments nested deeper than params may be: reported, never a RecursionError on the engine thread.
    deep_text = read(json.dumps({"name": "get_weather", "arguments": "[" * 5000 + "]" * 5000}))
    assert deep_text["error"] == "arguments are not usable: nested more than 64 levels deep"
    deep_object = read('{"name": "get_weather", "arguments": ' + "[" * 200 + "]" * 200 + "}")
    assert "nested more than 64 levels deep" in deep_object["error"] and deep_object["function"]["arguments"] == ""
    assert "not a valid tool call" in read('{"name": "get_weather", "arguments": ' + "[" * 5000 + "]" * 5000 + "}")["error"]


def test_mistral_calls_are_read_with_its_own_parser(models, tmp_path) -> None:
    from mlx_lm.utils import load_tokenizer

    root = Path(os.path.realpath(models / "qwen3")).parent
    tok = load_tokenizer(build(root, FAMILIES_BY_NAME["mistral"], "bf16"))
    assert tok.tool_call_start == "[TOOL_CALLS]"
    channels = OutputChannels(tok, [], reasoning=True, tool_calls=True)
    pieces = channels.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}') + channels.flush()
    assert pieces[-1][0] == TOOL  # a format that ends at end-of-sequence
    (call,) = ToolCallReader(tok.tool_parser, [WEATHER]).read(pieces[-1][1])
    assert "error" not in call and call["function"]["name"] == "get_weather"
    cut = OutputChannels(tok, [], reasoning=True, tool_calls=True)
    assert (cut.feed('[TOOL_CALLS]get_weather[ARGS]{"ci') + cut.flush(complete=False))[-1][0] == UNFINISHED_TOOL


# ---- forced calls, end to end (the tool-call grammar on random weights) -----------------------


def forced(model: str, choice: Any = "required", **extra: Any) -> dict[str, Any]:
    return chat(model=model, tools=[WEATHER, CLOCK], toolChoice=choice, maxTokens=96, seed=7, **extra)


def assert_valid_call(call: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    import jsonschema

    assert "error" not in call, call
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["function"]["name"]]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, tool["function"]["parameters"])
    assert name is None or call["function"]["name"] == name
    return arguments


@pytest.mark.parametrize("model, choice", [
    ("qwen2.5", "required"),
    # no tool-call markers: the call is the whole output, one JSON object (a tool without
    # arguments, so random weights cannot wander in a free string until maxTokens)
    ("demo", {"type": "function", "function": {"name": "get_time"}})])
def test_a_required_call_is_made_in_the_models_format_and_checked(sidecar, model, choice) -> None:
    result = sidecar.request("chat", forced(model, choice, temperature=0.9))
    assert result["finishReason"] == "tool_calls", result
    (call,) = result["toolCalls"]
    assert_valid_call(call)
    assert result["text"] == ""  # the call is not text, and nothing follows it


def test_a_named_tool_is_the_one_called_and_a_streamed_call_arrives_on_its_channel(sidecar) -> None:
    params = forced("qwen2.5", {"type": "function", "function": {"name": "get_weather"}})
    whole = sidecar.request("chat", params)
    assert assert_valid_call(whole["toolCalls"][0], "get_weather")["city"] is not None
    order, response = chunks_by_channel(list(sidecar.stream("chat", params)))
    calls = [value for key, value in order if key == "toolCalls"]
    assert [key for key, _ in order] == ["toolCalls"] and calls[0][0]["index"] == 0
    streamed = calls[0][0]
    assert streamed["function"] == whole["toolCalls"][0]["function"]
    result = response["result"]
    assert result["finishReason"] == "tool_calls" and "toolCalls" not in result


def test_a_forced_call_on_a_thinking_model_with_thinking_off(sidecar) -> None:
    result = sidecar.request("chat", forced("qwen3", thinking=False, temperature=0))
    assert result["finishReason"] == "tool_calls"
    assert_valid_call(result["toolCalls"][0])
    assert "reasoning" not in result


def test_auto_leaves_a_model_that_does_not_call_answering_in_text(sidecar) -> None:
    result = sidecar.request("chat", chat(model="qwen2.5", tools=[WEATHER], toolChoice="auto"))
    assert result["finishReason"] == "length" and "toolCalls" not in result and result["text"]


def test_a_reasoning_model_reasons_first_then_answers_in_the_schema_or_calls(sidecar) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"sky": {"enum": ["clear", "cloudy"]}}, "required": ["sky"],
              "additionalProperties": False}
    params = chat(model="qwen3-thinking", thinkingBudget=3, maxTokens=64,
                  responseFormat={"type": "json_schema", "schema": schema})
    result = sidecar.request("chat", params)
    assert result["finishReason"] == "stop" and result["reasoning"]
    jsonschema.validate(json.loads(result["text"]), schema)
    called = sidecar.request("chat", forced("qwen3-thinking", thinkingBudget=3, temperature=0))
    assert called["finishReason"] == "tool_calls" and called["reasoning"]
    assert_valid_call(called["toolCalls"][0])

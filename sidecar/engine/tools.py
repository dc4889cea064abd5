"""Tool calling: messages and tools in the shape chat templates expect, and the model's calls
read back with mlx-lm's tool parser, checked against the tools offered.

On the wire everything is OpenAI's shape (tool calls carry `arguments` as a JSON text);
Hugging Face chat templates expect `tool_calls[].function.arguments` as an object and
`tool_call_id` on tool turns, so the two are converted here, in both directions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import InvalidParams, brief
from ..schema import MAX_SCHEMA_VALUES, MAX_TOOL_SCHEMA_VALUES, check_size, json_text_value


def template_message(message: dict[str, Any], clean: Callable[[str], str], path: str,
                     parts: bool = False) -> dict[str, Any]:
    """One protocol message (at `path` in params) as chat templates read it (`clean` fixes
    lone surrogates). Content parts go to a vision model's template as parts (an image as its
    placeholder); a text template gets their text, joined by newlines, as OpenAI servers do."""
    content = message.get("content")
    out: dict[str, Any] = {"role": message["role"], "content": _template_content(content, clean, parts)}
    if message.get("toolCalls"):
        out["tool_calls"] = [_template_call(call, f"{path}/toolCalls/{index}/function/arguments")
                             for index, call in enumerate(message["toolCalls"])]
    if "toolCallId" in message:
        out["tool_call_id"] = message["toolCallId"]
    if "name" in message:
        out["name"] = message["name"]
    if "reasoning" in message:
        out["reasoning_content"] = clean(message["reasoning"])
    return out


def _template_content(content: Any, clean: Callable[[str], str], parts: bool) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return clean(content)
    if parts:
        return [{"type": "image"} if part["type"] == "image" else {"type": "text", "text": clean(part["text"])}
                for part in content]
    return "\n".join(clean(part["text"]) for part in content if part["type"] == "text")


def _template_call(call: dict[str, Any], path: str) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json_text_value(function["arguments"], path)  # nested too deep: -32602
    except ValueError:
        arguments = function["arguments"]  # not JSON: the template gets the text as it was
    return {"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def marks_tool_calls(tokenizer: Any) -> bool:
    """mlx-lm knows this model's tool-call markers and has a parser for what is between them."""
    return bool(getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None)


def forces_a_call(choice: Any) -> bool:
    """toolChoice "required" or a named tool (not absent, "auto" or "none")."""
    return choice not in (None, "auto", "none")


def offered_tools(tools: list[dict[str, Any]] | None, choice: Any) -> list[dict[str, Any]]:
    """The tools the template is given: none for toolChoice "none"; only the named one for a
    named choice. An unknown name, or a choice without tools, is -32602."""
    tools = tools or []
    if not forces_a_call(choice):
        return [] if choice == "none" else tools
    if not tools:
        raise InvalidParams("toolChoice needs tools", errors=[{"path": "/toolChoice", "message": "no tools given"}])
    if choice == "required":
        return tools
    name = choice["function"]["name"]
    named = [tool for tool in tools if tool["function"]["name"] == name]
    if not named:
        raise InvalidParams(f"toolChoice names an unknown tool: {name!r}",
                            errors=[{"path": "/toolChoice/function/name", "message": "not among tools"}])
    return named


def check_tool_schemas(tools: list[dict[str, Any]]) -> None:
    """Each tool's parameters must be a JSON Schema, so its calls can be checked, and no
    bigger than checking and compiling it can afford (MAX_SCHEMA_VALUES, MAX_TOOL_SCHEMA_VALUES)."""
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    names: set[str] = set()
    total = 0
    for index, tool in enumerate(tools):
        function = tool["function"]
        if function["name"] in names:
            raise InvalidParams(f"Two tools are named {function['name']!r}",
                                errors=[{"path": f"/tools/{index}/function/name", "message": "duplicate name"}])
        names.add(function["name"])
        total += check_size(function.get("parameters", {}), f"/tools/{index}/function/parameters", levels=0,
                            max_values=MAX_SCHEMA_VALUES)
        if total > MAX_TOOL_SCHEMA_VALUES:
            raise InvalidParams(f"The tools' parameters hold more than {MAX_TOOL_SCHEMA_VALUES} values together",
                                errors=[{"path": "/tools", "message": f"parameters hold more than "
                                                                     f"{MAX_TOOL_SCHEMA_VALUES} values together"}])
    for index, tool in enumerate(tools):
        function = tool["function"]
        try:
            validators.validator_for(function.get("parameters", {})).check_schema(function.get("parameters", {}))
        except SchemaError as exc:
            raise InvalidParams(f"Tool {function['name']!r} has parameters that are not a JSON Schema: {brief(exc)}",
                                errors=[{"path": f"/tools/{index}/function/parameters", "message": brief(exc)}]) from None


class ToolCallReader:
    """Turns the text of one tool call into wire tool calls, each checked against the tools
    offered: an unknown tool, arguments that are not a JSON object, or arguments that break
    the tool's schema leave the call in place with an `error` saying why."""

    def __init__(self, parser: Any, tools: list[dict[str, Any]]) -> None:
        self._parser = parser or _parse_bare_json
        self._tools = {tool["function"]["name"]: tool["function"] for tool in tools}
        self._tool_list = tools
        self.count = 0

    def read(self, text: str, unfinished: bool = False) -> list[dict[str, Any]]:
        if unfinished:
            return [self._call("", text.strip(), "the call was cut off before it ended (maxTokens or context)")]
        try:
            parsed = self._parser(text, self._tool_list)
        except Exception as exc:  # the parsers raise what their format's reader raises
            return [self._call("", text.strip(), f"not a valid tool call: {brief(exc)}")]
        calls = parsed if isinstance(parsed, list) else [parsed]
        return [self._checked(call, text) for call in calls]

    def _checked(self, parsed: Any, text: str) -> dict[str, Any]:
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return self._call("", text.strip(), "not a valid tool call: no tool name")
        name, arguments = parsed["name"], parsed.get("arguments", {})
        try:
            if isinstance(arguments, str):
                arguments = json_text_value(arguments, "")
            else:
                check_size(arguments)  # before anything recurses through it
        except ValueError:
            return self._call(name, arguments, "arguments are not JSON")
        except InvalidParams as exc:
            text = arguments if isinstance(arguments, str) else ""
            return self._call(name, text, f"arguments are not usable: {exc.data['errors'][0]['message']}")
        encoded = json.dumps(arguments, ensure_ascii=False)
        tool = self._tools.get(name)
        if tool is None:
            return self._call(name, encoded, f"unknown tool {name!r}")
        if not isinstance(arguments, dict):
            return self._call(name, encoded, "arguments are not a JSON object")
        problem = _schema_problem(arguments, tool.get("parameters"))
        return self._call(name, encoded, problem)

    def _call(self, name: str, arguments: str, error: str | None) -> dict[str, Any]:
        self.count += 1
        call: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": name, "arguments": arguments}}
        if error is not None:
            call["error"] = error
        return call


def _schema_problem(arguments: dict[str, Any], schema: Any) -> str | None:
    if not schema:
        return None
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    error = next(iter(sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))), None)
    if error is None:
        return None
    where = "/".join(str(part) for part in error.path)
    return f"arguments do not match the tool's parameters at /{where}: {brief(error, 160)}"


def _parse_bare_json(text: str, tools: Any = None) -> Any:
    """Models with no tool-call markers, constrained to emit the call as one JSON object."""
    return json.loads(text.strip())

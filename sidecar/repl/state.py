"""What the person at the REPL has set up: the model, the conversation, sampling settings.

Settings (`/set temperature 0.2`) are the `chat`/`generate` params named in the protocol
schema and are checked against it as they are set; `system` is the REPL's own (a system
message put before the conversation). A value is JSON (`/set logitBias {"12": -100}`), else a
bare word: a string, `on`/`off` for a boolean (`/set cache off`), one stop string for `stop`.
Settings only one method takes (`tools`, `thinking` are `chat`'s) are sent to that method only.
`/tools`, `/json` and `/think` are shorthands that set `tools`, `responseFormat`, `thinking`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from ..schema import protocol_schema
from .images import Content, QueuedImage, user_content

_NOT_SETTINGS = {"messages", "prompt", "model", "stream", "_meta"}
SYSTEM = "system"


@functools.cache
def setting_schemas() -> dict[str, dict[str, Any]]:
    """Each settable generation param and its schema, by wire name (camelCase)."""
    props = protocol_schema()["methods"]["chat"]["params"]["properties"]
    return {name: spec for name, spec in props.items() if name not in _NOT_SETTINGS}


def method_params(method: str) -> set[str]:
    """The params a method takes (from the schema)."""
    return set(protocol_schema()["methods"].get(method, {}).get("params", {}).get("properties", {}))


def accepts_progress(method: str) -> bool:
    """Does the method take `_meta.progressToken` (so it may report `$/progress`)?"""
    spec = protocol_schema()["methods"].get(method, {})
    return "_meta" in spec.get("params", {}).get("properties", {})


def setting_names() -> list[str]:
    return [*setting_schemas(), SYSTEM]


def _camel(name: str) -> str:
    head, *rest = re.split(r"[_-]", name)
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def canonical_setting(name: str) -> str | None:
    """`max_tokens`, `max-tokens`, `MAXTOKENS` -> `maxTokens`; None when unknown."""
    wanted = _camel(name).lower()
    return next((known for known in setting_names() if known.lower() == wanted), None)


_BOOLEAN_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_setting(name: str, text: str) -> Any:
    """The value typed after `/set NAME`, as the schema wants it; ValueError if it does not fit."""
    if name == SYSTEM:
        return text
    spec = setting_schemas()[name]
    return check_setting(name, _parsed(spec, name, text))


def _parsed(spec: dict[str, Any], name: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        if spec.get("type") == "object":
            raise ValueError(f"{name}: not a JSON object (for example {_object_example(spec)})") from None
        value = text  # a bare word: a string
    if spec.get("type") == "boolean" and isinstance(value, str) and value.lower() in _BOOLEAN_WORDS:
        value = _BOOLEAN_WORDS[value.lower()]  # `/set cache off`
    if spec.get("type") == "array" and isinstance(value, str):
        value = [value]  # `/set stop END` means ["END"]
    return value


def check_setting(name: str, value: Any) -> Any:
    """`value` if the schema takes it for setting `name`, else ValueError (the first problem)."""
    spec = setting_schemas()[name]
    defs = {"$defs": protocol_schema()["$defs"]}  # for the settings that are `$ref`s (tools, ...)
    errors = sorted(Draft202012Validator({**spec, **defs}).iter_errors(value), key=lambda e: list(map(str, e.path)))
    if errors:
        where = "/".join(map(str, errors[0].path))  # inside an object: `logitBias/5: ...`
        raise ValueError(f"{name}{'/' + where if where else ''}: {errors[0].message}")
    return value


def _object_example(spec: dict[str, Any]) -> str:
    values = spec.get("additionalProperties")
    if isinstance(values, dict) and "minimum" in values:
        return '{"12": ' + json.dumps(values["minimum"]) + "}"
    return "{}"


def setting_help(name: str) -> str:
    """One line for `/help set`: the setting, what it takes, what it does (from the schema)."""
    if name == SYSTEM:
        return f"{SYSTEM:<22} {'text':<17} a system message put before the conversation"
    spec = setting_schemas()[name]
    return f"{name:<22} {_kind(spec):<17} {spec.get('description', '')}".rstrip()


def _kind(spec: dict[str, Any]) -> str:
    """`number -2..2`, `integer >=1`, `on|off`, `string[]`, `{"id": number}`."""
    kind = spec.get("type", "")
    if kind == "array":
        return f"{spec.get('items', {}).get('type', '')}[]"
    if kind == "object":
        values = spec.get("additionalProperties")
        return f'{{"id": {values.get("type")}}}' if isinstance(values, dict) else "object"
    if kind == "boolean":
        return "on|off"
    low, high = spec.get("minimum", spec.get("exclusiveMinimum")), spec.get("maximum")
    if low is None:
        return str(kind)
    low_text = f">{low}" if "exclusiveMinimum" in spec else f">={low}"
    if high is not None and high < 1e6:
        return f"{kind} {low_text}, <={high}" if "exclusiveMinimum" in spec else f"{kind} {low}..{high}"
    return f"{kind} {low_text}"


@dataclass
class Conversation:
    turns: list[dict[str, Any]] = field(default_factory=list)

    def history(self, system: str | None) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *self.turns]

    def messages(self, system: str | None, user: Content) -> list[dict[str, Any]]:
        return [*self.history(system), {"role": "user", "content": user}]

    def add(self, user: Content, reply: str, tool_calls: list[dict[str, Any]] | None = None) -> None:
        """A user turn (its images too, as sent) and the reply; a reply that called tools keeps
        its calls (content null when it said nothing besides)."""
        answer: dict[str, Any] = {"role": "assistant", "content": reply}
        if tool_calls:
            answer = {"role": "assistant", "content": reply or None, "toolCalls": tool_calls}
        self.turns += [{"role": "user", "content": user}, answer]

    @property
    def exchanges(self) -> int:
        return len(self.turns) // 2

    def clear(self) -> None:
        self.turns.clear()


@dataclass
class ReplState:
    model: str = "demo"
    chat_mode: bool = True  # plain lines are turns of one conversation; False: /oneshot
    raw: bool = False
    conversation: Conversation = field(default_factory=Conversation)
    cancelled_turn: tuple[Content, str, Any] | None = None  # (user turn, reply, tool calls) for /keep
    images: list[QueuedImage] = field(default_factory=list)  # `/image`: for the next chat turn
    max_line_bytes: int | None = None  # the sidecar's limit on one message (initialize)
    settings: dict[str, Any] = field(default_factory=dict)
    server_defaults: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)
    profile_names: list[str] = field(default_factory=list)  # they work as model names too
    had_errors: bool = False
    embed_model: str | None = None  # `/embed --model NAME` (else the chat model)

    def generation_params(self, method: str = "generate") -> dict[str, Any]:
        """The model and the settings `method` takes (`tools` and `thinking` only go to chat)."""
        takes = method_params(method)
        params = {k: v for k, v in self.settings.items() if k != SYSTEM and k in takes}
        return {"model": self.model, **params}

    def user_turn(self, text: str) -> Content:
        """What the next chat turn sends: the queued images, then the text."""
        return user_content(self.images, text)

    def chat_params(self, user: Content, keep_history: bool) -> dict[str, Any]:
        history = self.conversation if keep_history else Conversation()
        return {**self.generation_params("chat"),
                "messages": history.messages(self.settings.get(SYSTEM), user)}

    def prompt_label(self) -> str:
        label = self.model
        if not self.chat_mode:
            label += " oneshot"
        elif self.conversation.exchanges:
            label += f" [{self.conversation.exchanges}]"
        if self.raw:
            label += " raw"
        return label

"""What the person at the REPL has set up: the model, the conversation, sampling settings.

Settings (`/set temperature 0.2`) are the `chat`/`generate` params named in the protocol
schema and are checked against it as they are set; `system` is the REPL's own (a system
message put before the conversation).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..schema import protocol_schema

_NOT_SETTINGS = {"messages", "prompt", "model", "stream", "_meta"}
SYSTEM = "system"


@functools.cache
def setting_schemas() -> dict[str, dict[str, Any]]:
    """Each settable generation param and its schema, by wire name (camelCase)."""
    props = protocol_schema()["methods"]["chat"]["params"]["properties"]
    return {name: spec for name, spec in props.items() if name not in _NOT_SETTINGS}


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


def parse_setting(name: str, text: str) -> Any:
    """The value typed after `/set NAME`, as the schema wants it; ValueError if it does not fit."""
    from jsonschema import Draft202012Validator

    if name == SYSTEM:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # a bare word: a string
    spec = setting_schemas()[name]
    if spec.get("type") == "array" and isinstance(value, str):
        value = [value]  # `/set stop END` means ["END"]
    errors = list(Draft202012Validator(spec).iter_errors(value))
    if errors:
        raise ValueError(f"{name}: {errors[0].message}")
    return value


@dataclass
class Conversation:
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, system: str | None, user_text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *self.turns, {"role": "user", "content": user_text}]

    def add(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    @property
    def exchanges(self) -> int:
        return len(self.turns) // 2

    def clear(self) -> None:
        self.turns.clear()


@dataclass
class ReplState:
    model: str = "demo"
    chat_mode: bool = False
    raw: bool = False
    conversation: Conversation = field(default_factory=Conversation)
    settings: dict[str, Any] = field(default_factory=dict)
    server_defaults: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)
    had_errors: bool = False

    def generation_params(self) -> dict[str, Any]:
        params = {k: v for k, v in self.settings.items() if k != SYSTEM}
        return {"model": self.model, **params}

    def chat_params(self, user_text: str, keep_history: bool) -> dict[str, Any]:
        history = self.conversation if keep_history else Conversation()
        return {**self.generation_params(),
                "messages": history.messages(self.settings.get(SYSTEM), user_text)}

    def prompt_label(self) -> str:
        label = self.model
        if self.chat_mode:
            label += f" chat[{self.conversation.exchanges}]"
        if self.raw:
            label += " raw"
        return label

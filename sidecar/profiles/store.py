r"""Profiles on disk: read, check, write and delete the TOML files that define them.

A profile is one file, `<name>.toml`, in a profiles directory. It names a base model and how to
use it; every key but `model` is optional:

    # profiles/<name>.toml
    model = "mlx-community/Qwen3-4B-4bit"       # the base model, as a request's `model`
    adapter = "my-notes"                        # a LoRA adapter, as a request's `adapter`
    system = "You are concise."                 # the default system prompt
    template = "{% for m in messages %}..."     # a chat template (Jinja) in place of the tokenizer's, OR
    template_file = "chatml.jinja"              # one in a file: relative to this file's folder, or absolute
    context_length = 8192
    keep_alive = "10m"                          # a duration ("30s", "1h30m") or seconds; -1: for ever
    draft_model = "mlx-community/Qwen3-0.6B-4bit"
    tasks = ["chat", "summarize"]               # chat, code, summarize, reasoning, extraction, embed
    [defaults]                                  # generation parameters for requests that leave them out
    temperature = 0.2
    max_tokens = 512
    stop = ["\n\n"]

`[defaults]` takes temperature, max_tokens, stop, thinking, thinking_budget, top_p, top_k, min_p,
repetition_penalty, presence_penalty, frequency_penalty, seed and response_format (a table), each
held to the limits the request parameter of that name (camelCase on the wire) is held to. The name
is the file's: letters, digits, `.`, `_`, `-`, not `auto` (which routes among profiles). A file
that does not parse or check is refused whole, -32602 naming the file (and the line of a TOML or
Jinja syntax error). Reading follows no symlink out of its directory; saving replaces a file whole.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import tomli_w
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jsonschema import Draft202012Validator

from ..errors import Forbidden, InvalidParams
from ..schema import protocol_schema

TASKS = ("chat", "code", "summarize", "reasoning", "extraction", "embed")
GENERATION_KEYS = {  # [defaults] key in the file -> the request parameter it defaults
    "temperature": "temperature", "max_tokens": "maxTokens", "stop": "stop", "thinking": "thinking",
    "thinking_budget": "thinkingBudget", "top_p": "topP", "top_k": "topK", "min_p": "minP",
    "repetition_penalty": "repetitionPenalty", "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty", "response_format": "responseFormat", "seed": "seed"}
WIRE_KEYS = {  # top-level key in the file -> its name on the wire (template_file has none: files only)
    "model": "model", "adapter": "adapter", "system": "system", "template": "template",
    "context_length": "contextLength", "keep_alive": "keepAlive", "draft_model": "draftModel",
    "tasks": "tasks", "defaults": "defaults"}
FILE_KEYS = (*WIRE_KEYS, "template_file")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_NAMES = frozenset({"auto"})  # `model: "auto"` routes among the profiles
SUFFIX = ".toml"
MAX_FILE_BYTES = 1 << 20  # profile and template files: larger ones are refused unread
_SHOWN = 200  # the longest message a bad value gets

# The file's top-level keys, as JSON Schema; [defaults] takes the chat method's own params' schemas.
_TOP_LEVEL: dict[str, dict[str, Any]] = {
    "model": {"$ref": "#/$defs/ModelRef"},
    "adapter": {"$ref": "#/$defs/AdapterRef"},
    "system": {"type": "string"},
    "template": {"type": "string", "minLength": 1},
    "template_file": {"type": "string", "minLength": 1},
    "context_length": {"type": "integer", "minimum": 1},
    "keep_alive": {"$ref": "#/$defs/KeepAlive"},
    "draft_model": {"type": "string", "minLength": 1, "maxLength": 1024},
    "tasks": {"type": "array", "items": {"enum": list(TASKS)}, "uniqueItems": True},
}


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    adapter: str | None
    template: str | None  # the chat template's text, inline or read from template_file
    template_source: str | None  # "inline", or the template file's absolute path
    system: str | None
    defaults: dict[str, Any]  # request parameter (camelCase) -> value, only those set
    context_length: int | None
    keep_alive: str | float | None
    draft_model: str | None
    tasks: tuple[str, ...]
    path: Path

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "adapter": self.adapter, "template": self.template,
                "templateSource": self.template_source, "system": self.system, "defaults": dict(self.defaults),
                "contextLength": self.context_length, "keepAlive": self.keep_alive,
                "draftModel": self.draft_model, "tasks": list(self.tasks), "path": str(self.path)}


def is_profile_name(name: str) -> bool:
    """Whether a profile may have this name (a model reference such as `owner/repo` may not)."""
    return bool(NAME.match(name)) and name not in RESERVED_NAMES


def profile_from_wire(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A profile as the wire gives it (camelCase, null for unset) -> the TOML document to write,
    checked as a file is on reading; errors name the wire's keys."""
    problems = [_problem(f"/{key}", f"unknown field; a profile has {', '.join(WIRE_KEYS.values())}")
                for key in fields if key not in WIRE_KEYS.values()]
    defaults = fields.get("defaults") or {}
    if isinstance(defaults, dict):
        problems += [_problem(f"/defaults/{key}", f"unknown; defaults are {', '.join(GENERATION_KEYS.values())}")
                     for key in defaults if key not in GENERATION_KEYS.values()]
    if problems:
        raise _invalid(name, None, problems)
    document = {key: fields[wire] for key, wire in WIRE_KEYS.items() if fields.get(wire) is not None}
    if isinstance(defaults, dict):
        set_defaults = {key: defaults[wire] for key, wire in GENERATION_KEYS.items() if defaults.get(wire) is not None}
        document.pop("defaults", None)
        if set_defaults:
            document["defaults"] = set_defaults
    try:
        checked, _, _ = _checked(name, document, folder=None)
    except InvalidParams as exc:
        raise _invalid(name, None, [dict(p, path=_wire_pointer(p["path"])) for p in exc.data["errors"]]) from None
    return checked


class ProfileStore:
    """Profiles read from `directories` (the first holding a name wins) and written to `write_dir`."""

    def __init__(self, directories: Sequence[Path], write_dir: Path) -> None:
        self.directories = list(directories)
        self.write_dir = write_dir

    def names(self) -> list[str]:
        return sorted(name for name in self._files() if is_profile_name(name))

    def get(self, name: str) -> Profile | None:
        """None where no profile has this name; InvalidParams where its file is malformed."""
        path = self._files().get(name) if is_profile_name(name) else None
        return None if path is None else _load(name, path)

    def list(self) -> tuple[list[Profile], list[dict[str, Any]]]:
        """The profiles that load, and {name, path, message} for each file that does not."""
        profiles, errors = [], []
        for name, path in sorted(self._files().items()):
            try:
                profiles.append(_load(name, path))
            except InvalidParams as exc:
                errors.append({"name": name, "path": str(path), "message": exc.message})
        return profiles, errors

    def save(self, name: str, fields: dict[str, Any], overwrite: bool = True) -> Profile:
        """Write `<write_dir>/<name>.toml` whole (never half a file) and return it as read back."""
        document = profile_from_wire(name, fields)
        existing = self._files().get(name)
        if existing is not None and not overwrite:
            raise _exists(name, existing)
        self.write_dir.mkdir(parents=True, exist_ok=True)
        path = self.write_dir / f"{name}{SUFFIX}"
        try:
            _write_whole(path, _toml(document).encode("utf-8"), overwrite)
        except FileExistsError:  # saved by someone else since we looked
            raise _exists(name, path) from None
        return _load(name, path)

    def delete(self, name: str) -> bool:
        """Remove the profile's file from write_dir: False where there is none; Forbidden where
        the profile lives only in a directory this store does not write."""
        if not NAME.match(name):
            return False
        if f"{name}{SUFFIX}" in _listing(self.write_dir):
            (self.write_dir / f"{name}{SUFFIX}").unlink(missing_ok=True)
            return True
        elsewhere = self._files().get(name)
        if elsewhere is not None:
            raise Forbidden(f"profile {name!r} is in {elsewhere.parent}, which localmlx does not write: "
                            f"delete {elsewhere} by hand", profile=name, path=str(elsewhere))
        return False

    def _files(self) -> dict[str, Path]:
        """Every `<name>.toml` (dot files aside: editors' locks and our partial writes), first directory first."""
        found: dict[str, Path] = {}
        for directory in self.directories:
            for entry in _listing(directory):
                if entry.endswith(SUFFIX) and not entry.startswith("."):
                    found.setdefault(entry.removesuffix(SUFFIX), directory / entry)
        return found


def _listing(directory: Path) -> list[str]:
    # Names as stored, so that a case-insensitive file system still matches names exactly.
    try:
        return sorted(os.listdir(directory))
    except OSError:  # missing or unreadable: no profiles there
        return []


def _load(name: str, path: Path) -> Profile:
    if not is_profile_name(name):
        reason = "reserved for routing" if name in RESERVED_NAMES else "letters, digits, '.', '_', '-' (128 at most)"
        raise _invalid(name, path, [_problem("", f"{name!r} is not a profile name: {reason}")])
    try:
        if not path.resolve().is_relative_to(path.parent.resolve()):
            raise ValueError("a symlink out of its directory, not followed")
        text = _read_small(path).decode("utf-8")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise _invalid(name, path, [_problem("", _reason(exc))]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line 3, column 7)"
        problem = _problem("", f"TOML syntax: {exc}")
        if position := re.search(r"line (\d+), column (\d+)", str(exc)):
            problem.update(line=int(position[1]), column=int(position[2]))
        raise _invalid(name, path, [problem]) from None
    try:
        checked, template, source = _checked(name, document, folder=path.parent)
    except InvalidParams as exc:
        raise _invalid(name, path, exc.data["errors"]) from None
    defaults = checked.get("defaults", {})
    return Profile(
        name=name, model=checked["model"], adapter=checked.get("adapter"), template=template,
        template_source=source, system=checked.get("system"),
        defaults={GENERATION_KEYS[key]: value for key, value in defaults.items()},
        context_length=checked.get("context_length"), keep_alive=checked.get("keep_alive"),
        draft_model=checked.get("draft_model"), tasks=tuple(checked.get("tasks", ())), path=path)


def _checked(name: str, document: dict[str, Any], folder: Path | None) -> tuple[dict[str, Any], str | None, str | None]:
    """The document in file order, integers as ints, with its template's text and source.
    InvalidParams (errors only, no file named: callers name it) listing every problem."""
    problems = [] if is_profile_name(name) else [_problem("", f"{name!r} is not a profile name")]
    problems += [_problem(f"/{key}", f"unknown key; a profile has {', '.join(FILE_KEYS)}")
                 for key in document if key not in FILE_KEYS]
    defaults = document.get("defaults", {})
    if isinstance(defaults, dict):
        problems += [_problem(f"/defaults/{key}", f"unknown; defaults are {', '.join(GENERATION_KEYS)}")
                     for key in defaults if key not in GENERATION_KEYS]
    if "model" not in document:
        problems.append(_problem("/model", "missing: the base model, as a request's model"))
    if "template" in document and "template_file" in document:
        problems.append(_problem("/template_file", "give template or template_file, not both"))
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    problems += [_problem("".join(f"/{p}" for p in e.absolute_path), e.message[:_SHOWN]) for e in errors]
    problems += [_problem(pointer, "NaN is not a number") for pointer in _nans(document, "")]
    if problems:
        raise InvalidParams("invalid profile", errors=problems)
    template, source = _template(document, folder)
    checked = {key: _integral(document[key], _TOP_LEVEL.get(key)) for key in FILE_KEYS if key in document}
    if "defaults" in checked:
        properties = _defaults_schema()["properties"]
        checked["defaults"] = {key: _integral(defaults[key], properties[key]) for key in GENERATION_KEYS
                               if key in defaults}
    return checked, template, source


def _template(document: dict[str, Any], folder: Path | None) -> tuple[str | None, str | None]:
    """The chat template's text and source ("inline" or the file), checked to parse as Jinja."""
    if "template" in document:
        pointer, text, source = "/template", document["template"], "inline"
    elif "template_file" in document and folder is not None:
        pointer, file = "/template_file", (folder / Path(document["template_file"]).expanduser()).absolute()
        try:
            text, source = _read_small(file).decode("utf-8"), str(file)
        except (OSError, ValueError) as exc:
            raise InvalidParams("invalid profile", errors=[_problem(pointer, f"{file}: {_reason(exc)}")]) from None
    else:
        return None, None
    try:
        _jinja().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        problem = dict(_problem(pointer, f"Jinja syntax, template line {exc.lineno}: {exc.message}"), line=exc.lineno)
        raise InvalidParams("invalid profile", errors=[problem]) from None
    return text, source


class _GenerationTag(Extension):
    """transformers' `{% generation %}…{% endgeneration %}` (it marks the assistant's text), parsed
    as the block it encloses: enough to check a template's syntax."""

    tags = {"generation"}  # noqa: RUF012  (an instance attribute in Extension, shared as jinja2 intends)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.cache
def _jinja() -> jinja2.Environment:
    # The syntax transformers renders chat templates with: loop controls ({% break %}) and its tag.
    return jinja2.Environment(extensions=["jinja2.ext.loopcontrols", _GenerationTag])


@functools.cache
def _defaults_schema() -> dict[str, Any]:
    chat = protocol_schema()["methods"]["chat"]["params"]["properties"]
    return {"type": "object", "properties": {key: chat[wire] for key, wire in GENERATION_KEYS.items()}}


@functools.cache
def _validator() -> Draft202012Validator:
    properties = dict(_TOP_LEVEL, defaults=_defaults_schema())
    return Draft202012Validator({"$defs": protocol_schema()["$defs"], "type": "object", "properties": properties})


def _integral(value: Any, schema: dict[str, Any] | None) -> Any:
    # JSON Schema takes 512.0 as an integer (and the wire may send one): keep it an int.
    integer = schema is not None and schema.get("type") == "integer"
    return int(value) if integer and isinstance(value, float) else value


def _nans(value: Any, pointer: str) -> list[str]:
    # TOML has `nan`, which passes every minimum and maximum.
    if isinstance(value, float) and math.isnan(value):
        return [pointer]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [found for key, item in items for found in _nans(item, f"{pointer}/{key}")]


def _read_small(path: Path) -> bytes:
    if not path.is_file():  # never open a FIFO or a device: that could block
        raise ValueError("not a file" if path.exists() else "no such file")
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return data


def _toml(document: dict[str, Any]) -> str:
    """The document as TOML, multi-line strings kept multi-line (a template reads as written)
    unless that changes them (tomli_w writes \r\n there as \n): then escaped."""
    text = tomli_w.dumps(document, multiline_strings=True)
    return text if tomllib.loads(text) == document else tomli_w.dumps(document)


def _write_whole(path: Path, data: bytes, overwrite: bool) -> None:
    """Written to a temporary file beside it, then renamed over it (or linked, where it must not
    exist yet): readers see the old file or the new one, never half of one."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)  # a config file (mkstemp makes it 0600)
        if overwrite:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # FileExistsError if the name is taken
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _wire_pointer(pointer: str) -> str:
    """/context_length -> /contextLength, /defaults/max_tokens -> /defaults/maxTokens."""
    parts = pointer.split("/")
    if len(parts) > 1:
        parts[1] = WIRE_KEYS.get(parts[1], parts[1])
    if len(parts) > 2 and parts[1] == "defaults":
        parts[2] = GENERATION_KEYS.get(parts[2], parts[2])
    return "/".join(parts)


def _problem(pointer: str, message: str) -> dict[str, Any]:
    return {"path": pointer, "message": message}


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _exists(name: str, path: Path) -> InvalidParams:
    return InvalidParams(f"profile {name!r} exists ({path}): save with overwrite to replace it",
                         profile=name, path=str(path))


def _invalid(name: str, path: Path | None, problems: list[dict[str, Any]]) -> InvalidParams:
    where = str(path) if path is not None else f"profile {name!r}"
    summary = "; ".join(f"{p['path'] or '/'}: {p['message']}" for p in problems[:3])
    data: dict[str, Any] = {"profile": name, "errors": problems}
    if path is not None:
        data["path"] = str(path)
    return InvalidParams(f"{where}: {summary}", **data)

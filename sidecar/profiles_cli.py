"""`localmlx profiles create|list|show|edit|rm`: model profiles from a shell.

As `localmlx models` does, each command spawns a sidecar and calls the protocol method
(`profiles/save`, `profiles/list`, `profiles/get`, `profiles/delete`), so the shell, the REPL
and Wooster read and write profiles through the same checks. `edit` alone touches the file
itself: it opens the TOML file the sidecar names (`path`) in $VISUAL or $EDITOR, then reads it
back through `profiles/get`; a file that no longer parses is kept as edited and its error
(with the line) printed, so running `edit` again picks up where it stopped.

Results go to stdout (a table, a TOML view, or JSON with `--json`); errors go to stderr, exit
code 1 (2 for a command line that makes no sense).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .settings import add_setting_flags, env_from_args

TASK_WORDS = "chat, code, summarize, reasoning, extraction, embed"

# flag, the [defaults] key it sets (camelCase, as on the wire), its type
_DEFAULT_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--temperature", "temperature", float), ("--max-tokens", "maxTokens", int),
    ("--thinking-budget", "thinkingBudget", int), ("--top-p", "topP", float), ("--top-k", "topK", int),
    ("--min-p", "minP", float), ("--repetition-penalty", "repetitionPenalty", float),
    ("--presence-penalty", "presencePenalty", float), ("--frequency-penalty", "frequencyPenalty", float),
    ("--seed", "seed", int))
# flag dest -> the profile field it sets
_FIELD_FLAGS = {"model": "model", "adapter": "adapter", "system": "system", "template": "template",
                "context_length": "contextLength", "draft_model": "draftModel"}


class UsageError(ValueError):
    """A command line (or REPL line) that asks for something a profile cannot hold."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="save a profile: a model and how to use it",
                                description="Save profiles/NAME.toml; NAME then works wherever a model name does.")
    create.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '-' (not 'auto')")
    _add_field_flags(create)
    create.add_argument("--overwrite", action="store_true", help="replace a profile of that name")
    actions.add_parser("list", parents=[common], help="every profile (and each file that does not parse, with why)")
    show = actions.add_parser("show", parents=[common], help="one profile, as its TOML file reads")
    show.add_argument("name", metavar="NAME")
    edit = actions.add_parser("edit", parents=[common], help="open the profile's file in $VISUAL/$EDITOR, then check it")
    edit.add_argument("name", metavar="NAME")
    remove = actions.add_parser("rm", parents=[common], help="delete a profile's file")
    remove.add_argument("name", metavar="NAME")


def _add_field_flags(create: argparse.ArgumentParser) -> None:
    create.add_argument("--model", "-m", required=True, help="the base model, as a request's model")
    create.add_argument("--adapter", default=None, help="a LoRA/DoRA adapter: its name, or its directory")
    create.add_argument("--system", default=None, metavar="TEXT", help="the system prompt of chats that have none")
    template = create.add_mutually_exclusive_group()
    template.add_argument("--template-file", default=None, metavar="FILE",
                          help="a Jinja chat template used instead of the model's own (its text is saved)")
    template.add_argument("--template", default=None, metavar="TEXT", help="the same, given inline")
    create.add_argument("--context-length", type=int, default=None, metavar="N", help="at most N tokens of prompt and output")
    create.add_argument("--keep-alive", default=None, metavar="DURATION",
                        help="how long the model stays loaded when idle: 30s, 10m, 1h30m, seconds, -1 for ever")
    create.add_argument("--draft-model", default=None, metavar="MODEL", help="a draft model for speculative decoding")
    create.add_argument("--task", action="append", default=None, metavar="TASK", dest="tasks",
                        help=f"what it is good at, for model auto (repeat): {TASK_WORDS}")
    defaults = create.add_argument_group("defaults", "generation parameters for requests that leave them out")
    for flag, key, kind in _DEFAULT_FLAGS:
        defaults.add_argument(flag, type=kind, default=None, dest=f"default_{key}", metavar=kind.__name__.upper(),
                              help=f"default {key}")
    defaults.add_argument("--stop", action="append", default=None, dest="default_stop", metavar="TEXT",
                          help="a stop string (repeat for more)")
    defaults.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None, dest="default_thinking",
                          help="reasoning models: thinking on or off")
    defaults.add_argument("--response-format", default=None, dest="default_responseFormat", metavar="JSON",
                          help='for example {"type": "json_object"}')
    defaults.add_argument("--set", action="append", default=[], dest="assignments", metavar="KEY=VALUE",
                          help="any profile field or default (top_p=0.9, stop=END, tasks=chat,code); value JSON or a word")


# ---- KEY=VALUE, shared with the REPL's /profile save ---------------------------------------------


def _squashed(key: str) -> str:
    return key.replace("-", "").replace("_", "").lower()


def _profile_schema() -> dict[str, Any]:
    from .schema import protocol_schema  # on use: see run

    fields: dict[str, Any] = protocol_schema()["$defs"]["ProfileFields"]["properties"]
    return fields


def profile_fields(words: Iterable[str]) -> dict[str, Any]:
    """`key=value` words as profiles/save fields: a key is a profile field or a [defaults] key
    (camelCase or snake_case, any case; templateFile reads the template from a file), a value
    is JSON or a bare word. UsageError for a word that says otherwise."""
    from .repl.state import parse_setting  # on use: see run

    schema = _profile_schema()
    fields_by_key = {_squashed(k): k for k in schema if k != "defaults"} | {"templatefile": "templateFile"}
    defaults_by_key = {_squashed(k): k for k in schema["defaults"]["properties"]}
    fields: dict[str, Any] = {}
    for word in words:
        key, eq, text = word.partition("=")
        if not eq or not key:
            raise UsageError(f"{word!r} is not KEY=VALUE")
        squashed = _squashed(key)
        if squashed in fields_by_key:
            name = fields_by_key[squashed]
            if name == "templateFile":
                fields["template"] = read_template(text)
            else:
                fields[name] = _field_value(name, text)
        elif squashed in defaults_by_key:
            name = defaults_by_key[squashed]
            try:
                fields.setdefault("defaults", {})[name] = parse_setting(name, text)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        else:
            known = sorted([*fields_by_key.values(), *defaults_by_key.values()])
            raise UsageError(f"a profile has no {key!r}; it has {', '.join(known)}")
    return fields


def _field_value(name: str, text: str) -> Any:
    """A profile field's value: numbers for the lengths and keep-alive, a list of tasks (JSON,
    or words separated by commas), text as typed for the rest."""
    if name == "tasks":
        try:
            return json.loads(text)
        except ValueError:
            return [t.strip() for t in text.split(",") if t.strip()]
    if name in ("contextLength", "keepAlive"):
        return _number_or_text(text)
    try:  # a JSON string literal ("with spaces") loses its quotes; anything else stays as typed
        value = json.loads(text)
        return value if isinstance(value, str) else text
    except ValueError:
        return text


def _number_or_text(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


def read_template(path: str) -> str:
    file = Path(path).expanduser()
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"template file {file}: {reason}") from None


def create_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `profiles create` as profiles/save fields (`--set` last: it wins)."""
    fields: dict[str, Any] = {wire: getattr(args, dest) for dest, wire in _FIELD_FLAGS.items()
                              if getattr(args, dest) is not None}
    if args.template_file is not None:
        fields["template"] = read_template(args.template_file)
    if args.keep_alive is not None:
        fields["keepAlive"] = _number_or_text(args.keep_alive)
    if args.tasks:
        fields["tasks"] = args.tasks
    defaults = {name.removeprefix("default_"): value for name, value in vars(args).items()
                if name.startswith("default_") and value is not None}
    if "responseFormat" in defaults:
        try:
            defaults["responseFormat"] = json.loads(defaults["responseFormat"])
        except ValueError as exc:
            raise UsageError(f"--response-format: not JSON ({exc})") from None
    if defaults:
        fields["defaults"] = defaults
    assigned = profile_fields(args.assignments)
    fields["defaults"] = {**fields.get("defaults", {}), **assigned.pop("defaults", {})}
    if not fields["defaults"]:
        del fields["defaults"]
    return {**fields, **assigned}


# ---- the commands ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # On use: every `localmlx` command, `serve` included, imports this module for its flags.
    from rich.console import Console

    from .client import RpcCallError, SidecarClient, sidecar_command
    from .finetune_cli import with_allowed_root
    from .models_cli import is_path

    err = Console(stderr=True, highlight=False, soft_wrap=True)  # a path or an error wraps at no column
    try:
        method, params = _call(args)
    except UsageError as usage:
        err.print(f"localmlx profiles {args.action}: {usage}", markup=False)
        return 2
    env = env_from_args(args)
    adapter = params.get("profile", {}).get("adapter")
    if adapter is not None and is_path(adapter):  # an adapter directory named here: granted, as finetune does
        env = with_allowed_root(env, str(Path(adapter).expanduser().absolute()))
    with SidecarClient(sidecar_command(), env=env) as client:
        client.initialize(name="localmlx-profiles")
        try:
            if args.action == "edit":
                return _edit(client, args, err)
            result = client.request(method, params)
        except RpcCallError as error:
            print_error(err, error)
            return 1
    if args.action == "rm" and not result["deleted"]:
        err.print(f"no profile {args.name} to delete", markup=False)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _show(args.action, result)
    return 0


def _call(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.action == "create":
        return "profiles/save", {"name": args.name, "profile": create_fields(args), "overwrite": args.overwrite}
    if args.action == "list":
        return "profiles/list", {}
    if args.action == "rm":
        return "profiles/delete", {"name": args.name}
    return "profiles/get", {"name": args.name}  # show, and edit's first step


def print_error(err: Any, error: Any) -> None:
    """The typed error's message (it names the file and the line), then any problem it left out."""
    err.print(f"error {error.code}: {error.message}", style="red", markup=False)
    problems = (error.data or {}).get("errors") if isinstance(error.data, dict) else None
    for problem in (problems or [])[3:]:  # the message shows the first three
        where = f" (line {problem['line']})" if problem.get("line") else ""
        err.print(f"  {problem.get('path') or '/'}: {problem.get('message')}{where}", markup=False)


def _show(action: str, result: dict[str, Any]) -> None:
    from rich.console import Console

    from .models_cli import print_table
    from .repl import formatting as fmt

    out = Console(highlight=False)
    if action == "list":
        if result["profiles"]:
            print_table(out, fmt.profiles_table(result["profiles"]))
        elif not result["errors"]:
            print("no profiles (localmlx profiles create NAME --model M makes one)")
        for line in fmt.profile_error_lines(result["errors"]):
            print(line)
    elif action == "create":
        print(f"saved profile {result['name']} ({result['path']}): {fmt.profile_summary(result)}")
    elif action == "rm":
        print(f"deleted profile {result['name']}")
    else:
        print(fmt.profile_toml(result), end="")


def _edit(client: Any, args: argparse.Namespace, err: Any) -> int:
    import shlex
    import subprocess

    from .client import RpcCallError
    from .protocol_defs import INVALID_PARAMS
    from .repl import formatting as fmt

    try:
        path = client.request("profiles/get", {"name": args.name})["path"]
    except RpcCallError as error:  # a file that does not parse is still there to fix
        path = (error.data or {}).get("path") if error.code == INVALID_PARAMS else None
        if path is None:
            print_error(err, error)
            err.print(f"(localmlx profiles create {args.name} --model M makes it)", markup=False)
            return 1
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        status = subprocess.run([*shlex.split(editor), path], check=False).returncode
    except (OSError, ValueError) as exc:
        err.print(f"cannot run the editor {editor!r}: {exc} (set VISUAL or EDITOR)", markup=False)
        return 1
    if status != 0:
        err.print(f"the editor exited with status {status}: {path} is as it left it, not checked", markup=False)
        return 1
    try:
        profile = client.request("profiles/get", {"name": args.name})
    except RpcCallError as error:
        print_error(err, error)
        err.print(f"the edited file is kept: `localmlx profiles edit {args.name}` opens it again", markup=False)
        return 1
    if args.json:
        print(json.dumps(profile, indent=2))
    else:
        print(f"profile {profile['name']} ({profile['path']}): {fmt.profile_summary(profile)}")
    return 0


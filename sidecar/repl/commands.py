"""What a typed line does.

- `/name args`: a shorthand command from COMMANDS below.
- a line starting with `{` or `[`: raw JSON-RPC, sent exactly as typed.
- `exit`, `quit` (and `/bye`, `/quit`, `/exit`): leave.
- anything else: a chat turn of one conversation, kept until `/new` (or `/reset`); in
  `/oneshot` mode each line is a fresh single-turn chat. A cancelled reply is left out of the
  conversation unless `/keep` puts it in.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol_defs import FORBIDDEN
from . import formatting as fmt
from .images import image_paths, read_image
from .session import ReplSession
from .state import (
    SYSTEM,
    ReplState,
    canonical_setting,
    check_setting,
    method_params,
    parse_setting,
    setting_help,
    setting_names,
)


class QuitRepl(Exception):
    pass


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[ReplSession, str], None]
    # What its argument completes to: "model", "setting", "method", "command", "path", or these words.
    completes: str | tuple[str, ...] | None = None


# ---- the commands --------------------------------------------------------------------------


def show_help(session: ReplSession, arg: str) -> None:
    wanted = arg.strip().lstrip("/")
    if wanted:
        command = find_command(wanted)
        if command is None:
            session.failed(f"no command /{wanted}")
            return
        lines = [f"{command.usage:<24} {command.help}"]
        if command.name == "set":  # what can be set, from the protocol schema
            lines += ["", *map(setting_help, setting_names()),
                      "", 'Values are JSON (/set logitBias {"12": -100}) or a bare word '
                      "(/set stop END, /set cache off)."]
        session.output.lines(lines)
        return
    session.output.lines([f"{c.usage:<24} {c.help}" for c in COMMANDS] + [
        "",
        "Plain text is a chat turn of one conversation (/new starts over; /oneshot: each line alone).",
        "A line starting with { or [ is sent to the sidecar as raw JSON-RPC, exactly as typed.",
        "Tab completes commands, methods, model names and /image paths; Esc Enter inserts a newline.",
        "Ctrl-C cancels the request in flight ($/cancelRequest); Ctrl-D, /bye or exit leaves",
        "(Ctrl-D while a reply streams cancels it first).",
    ])


def list_models(session: ReplSession, arg: str) -> None:
    result = session.request("models/list")
    if result is not None:
        session.state.model_names = _loadable_names(result)
        session.output.table(fmt.models_table(result["models"]))
        if result.get("adapters"):
            session.output.table(fmt.adapters_table(result["adapters"]))


def refresh_model_names(session: ReplSession) -> None:
    """Quietly, for tab completion (profiles' names too: they work as models')."""
    result = session.request("models/list")
    if result is not None:
        session.state.model_names = _loadable_names(result)
    profiles = session.request("profiles/list")
    if profiles is not None:
        session.state.profile_names = [p["name"] for p in profiles["profiles"]]


def _loadable_names(listed: dict[str, Any]) -> list[str]:
    """The models, and `<base>+<adapter>` for each adapter with a known base."""
    return [m["model"] for m in listed["models"]] + fmt.variant_names(listed.get("adapters") or [])


def load_model(session: ReplSession, arg: str) -> None:
    load(session, arg.strip() or session.state.model)


def load(session: ReplSession, model: str) -> bool:
    result = session.request("models/load", {"model": model})
    if result is not None:  # a profile loads its base model, and is still what the REPL asks for
        session.state.model = model if model in session.state.profile_names else result["model"]
        session.output.info(fmt.loaded_summary(result))
        if result["model"] not in session.state.model_names:
            session.state.model_names.append(result["model"])
    return result is not None


def pull_model(session: ReplSession, arg: str) -> None:
    model = arg.strip()
    if not model:
        session.failed("usage: /pull OWNER/NAME (a Hub repo)")
        return
    download(session, model)


def download(session: ReplSession, model: str) -> bool:
    result = session.request("models/download", {"model": model})
    if result is not None:
        fetched = fmt.size(result["downloadedBytes"]) if result["downloadedBytes"] else "nothing new"
        session.output.info(f"{result['model']}: {fmt.size(result['bytes'])} on disk ({fetched} downloaded)")
        if result["model"] not in session.state.model_names:
            session.state.model_names.append(result["model"])
    return result is not None


def remove_model(session: ReplSession, arg: str) -> None:
    words = arg.split()
    force = "--force" in words
    adapter = "--adapter" in words
    names = [w for w in words if w not in ("--force", "--adapter")]
    if len(names) != 1:
        session.failed("usage: /rm MODEL [--force], or /rm --adapter NAME [--force]")
        return
    result = session.request("models/delete", {"adapter" if adapter else "model": names[0], "force": force})
    if result is not None:
        if result["deleted"]:
            what = "adapter " if adapter else ""
            session.output.info(f"deleted {what}{result['model']}: {fmt.size(result['bytesFreed'])} freed")
            if result["model"] in session.state.model_names:
                session.state.model_names.remove(result["model"])
        else:
            session.output.info(f"{result['model']}: nothing to delete")


_FINETUNE_ALIASES = {"lr": "learningRate", "layers": "numLayers", "iters": "iterations"}
FINETUNE_USAGE = "usage: /finetune DATA [model=M] [name=N] [iterations=100] [learningRate=1e-5] [KEY=VALUE ...]"


def finetune_params(arg: str, model: str) -> dict[str, Any]:
    """`/finetune DATA [key=value ...]` as models/finetune params: keys are the protocol's
    (any case, `-` or `_` ignored; lr, layers, iters; `dora` alone for fineTuneType=dora),
    values JSON or a bare word. ValueError for a line that says otherwise."""
    words = shlex.split(arg)
    paths = [w for w in words if "=" not in w and w.lower() != "dora"]
    if len(paths) != 1:
        raise ValueError(FINETUNE_USAGE)
    known = {name.lower(): name for name in method_params("models/finetune") if name not in ("dataset", "_meta")}
    params: dict[str, Any] = {"model": model, "dataset": str(Path(paths[0]).expanduser().absolute())}
    for word in words:
        if word.lower() == "dora":
            params["fineTuneType"] = "dora"
            continue
        key, eq, text = word.partition("=")
        if not eq:
            continue
        name = _FINETUNE_ALIASES.get(key.lower()) or known.get(key.replace("-", "").replace("_", "").lower())
        if name is None:
            raise ValueError(f"/finetune takes no {key!r}; it takes {', '.join(sorted(known.values()))}")
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    return params


def finetune(session: ReplSession, arg: str) -> None:
    try:
        params = finetune_params(arg, session.state.model)
    except ValueError as exc:
        session.failed(str(exc))
        return
    result = session.request("models/finetune", params)
    if result is None:
        if (session.error or {}).get("code") == FORBIDDEN:
            session.output.info("the dataset must lie under the models dir or --allowed-roots "
                                "(or train from the shell: localmlx finetune DATA --model M)")
        return
    session.output.lines(fmt.finetune_summary(result))
    if result["model"] not in session.state.model_names:
        session.state.model_names.append(result["model"])
    session.output.info(f"/load {result['model']} chats with it")


PROFILE_USAGE = "usage: /profile [NAME | use NAME | save NAME [KEY=VALUE ...] | rm NAME]"
PROFILE_ACTIONS = ("use", "save", "rm")


def profile(session: ReplSession, arg: str) -> None:
    try:
        words = shlex.split(arg)
    except ValueError as exc:
        session.failed(f"/profile: {exc}")
        return
    action = words[0] if len(words) > 1 else None
    if not words:
        list_profiles(session)
    elif len(words) == 1:
        show_profile(session, words[0])
    elif action == "use" and len(words) == 2:
        use_profile(session, words[1])
    elif action == "save":
        save_profile(session, words[1], words[2:])
    elif action == "rm" and len(words) == 2:
        remove_profile(session, words[1])
    else:
        session.failed(PROFILE_USAGE)


def list_profiles(session: ReplSession) -> None:
    result = session.request("profiles/list")
    if result is None:
        return
    session.state.profile_names = [p["name"] for p in result["profiles"]]
    if result["profiles"]:
        session.output.table(fmt.profiles_table(result["profiles"]))
    elif not result["errors"]:
        session.output.info("no profiles: /profile save NAME [KEY=VALUE ...] makes one of the current model")
    session.output.lines(fmt.profile_error_lines(result["errors"]))


def show_profile(session: ReplSession, name: str) -> None:
    result = session.request("profiles/get", {"name": name})
    if result is not None:
        session.output.lines(fmt.profile_toml(result).splitlines())


def use_profile(session: ReplSession, name: str) -> None:
    found = session.request("profiles/get", {"name": name})  # a profile's own error, not a model's
    if found is None:
        return
    if name not in session.state.profile_names:
        session.state.profile_names.append(name)  # so that load keeps its name
    if load(session, name):
        session.output.info(f"chatting through profile {name} from now on (/load MODEL leaves it)")


def save_profile(session: ReplSession, name: str, words: list[str]) -> None:
    from ..profiles_cli import UsageError, profile_fields  # on use: the shell's parser of KEY=VALUE

    try:
        fields = profile_fields(words)
    except UsageError as exc:
        session.failed(f"/profile save: {exc}")
        return
    if "model" not in fields:  # the current model; a profile's base when that is a profile
        current = session.state.model
        if current in session.state.profile_names:
            base = session.request("profiles/get", {"name": current})
            if base is None:
                return
            fields = {"model": base["model"], **({"adapter": base["adapter"]} if base.get("adapter") else {}), **fields}
        else:
            fields["model"] = current
    result = session.request("profiles/save", {"name": name, "profile": fields})
    if result is None:
        return
    if name not in session.state.profile_names:
        session.state.profile_names.append(name)
    session.output.info(f"saved profile {name} ({result['path']}): {fmt.profile_summary(result)}")
    session.output.info(f"/profile use {name} chats through it")


def remove_profile(session: ReplSession, name: str) -> None:
    result = session.request("profiles/delete", {"name": name})
    if result is None:
        return
    if name in session.state.profile_names:
        session.state.profile_names.remove(name)
    if result["deleted"]:
        session.output.info(f"deleted profile {name}")
        if session.state.model == name:
            session.output.info(f"the chat still names {name}: /load MODEL (or /profile use NAME) picks another")
    else:
        session.failed(f"no profile {name} to delete")


def unload_model(session: ReplSession, arg: str) -> None:
    model = arg.strip() or session.state.model
    result = session.request("models/unload", {"model": model})
    if result is not None:
        verb = "unloaded" if result["unloaded"] else "was not loaded:"
        session.output.info(f"{verb} {result['model']}")


def show_status(session: ReplSession, arg: str) -> None:
    result = session.request("server/status")
    if result is not None:
        session.output.lines(fmt.status_lines(result))
        if result.get("models"):
            session.output.table(fmt.loaded_models_table(result["models"]))


def _set_chat_mode(session: ReplSession, on: bool) -> None:
    session.state.chat_mode = on
    session.output.info("conversation: plain lines are turns of one chat (/new starts over, /oneshot: each alone)"
                        if on else "one-shot: each line is a fresh one-turn chat (/oneshot off keeps the conversation)")


def chat_mode(session: ReplSession, arg: str) -> None:
    if arg.strip().lower() == "off":
        _set_chat_mode(session, False)
        return
    if not session.state.chat_mode:
        _set_chat_mode(session, True)
    if arg.strip():
        chat_turn(session, arg.strip())


def oneshot_mode(session: ReplSession, arg: str) -> None:
    word = arg.strip().lower()
    if word not in ("", "on", "off"):
        session.failed("usage: /oneshot [on|off]")
        return
    _set_chat_mode(session, word == "off")


def chat_turn(session: ReplSession, text: str) -> None:
    state = session.state
    keep = state.chat_mode
    user = state.user_turn(text)
    outcome = session.generate("chat", state.chat_params(user, keep_history=keep))
    if outcome is None:  # refused (a text-only model, say): the images wait for the next try
        if state.images:
            session.output.info(f"{_images(len(state.images))} still queued (/image clear drops them)")
        return
    state.images = []  # they went with this turn
    if not keep:
        return
    reply, result = outcome
    if result.get("finishReason") == "cancelled":
        state.cancelled_turn = (user, reply, result.get("toolCalls"))
        session.output.info("the cancelled turn is not part of the conversation (/keep adds it)")
        return
    state.cancelled_turn = None
    state.conversation.add(user, reply, result.get("toolCalls"))


def _images(n: int) -> str:
    return f"{n} image{'s' if n != 1 else ''}"


def queue_image(session: ReplSession, arg: str) -> None:
    """`/image PATH...` queues images for the next chat turn; no PATH lists them; `clear`."""
    state, text = session.state, arg.strip()
    if not text:
        session.output.lines([f"{n}. {image.path} ({fmt.size(image.size)})" for n, image in enumerate(state.images, 1)]
                             or ["no images queued: /image PATH adds one to the next message"])
        return
    if text == "clear":
        dropped, state.images = len(state.images), []
        session.output.info(f"dropped {_images(dropped)}")
        return
    for path in image_paths(text):
        try:
            image = read_image(path, state.max_line_bytes)
        except ValueError as exc:
            session.failed(f"/image: {exc}")
            continue
        state.images.append(image)
        more = f"; {len(state.images)} for the next message" if len(state.images) > 1 else ""
        session.output.info(f"image queued: {image.describe()}{more}")


def keep_cancelled(session: ReplSession, arg: str) -> None:
    state = session.state
    if state.cancelled_turn is None:
        session.failed("no cancelled reply to keep")
        return
    state.conversation.add(*state.cancelled_turn)
    state.cancelled_turn = None
    session.output.info(f"kept the cancelled reply ({state.conversation.exchanges} exchanges)")


def generate(session: ReplSession, arg: str) -> None:
    if not arg.strip():
        session.failed("usage: /generate TEXT (a raw prompt: no chat template)")
        return
    session.generate("generate", {**session.state.generation_params("generate"), "prompt": arg})


def _json_argument(text: str) -> Any:
    """JSON typed inline, or the JSON in the file it names; ValueError when neither."""
    try:
        return json.loads(text)
    except ValueError as inline:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"neither JSON ({inline}) nor a file") from None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _as_tools(value: Any) -> Any:
    """A list of tools, one tool, `{"tools": [...]}`, or bare functions ({name, parameters})."""
    if isinstance(value, dict):
        value = value["tools"] if isinstance(value.get("tools"), list) else [value]
    if isinstance(value, list):
        return [{"type": "function", "function": t} if isinstance(t, dict) and "type" not in t and "name" in t else t
                for t in value]
    return value


def set_tools(session: ReplSession, arg: str) -> None:
    settings, text = session.state.settings, arg.strip()
    if not text:
        tools = settings.get("tools") or []
        names = ", ".join(t["function"]["name"] for t in tools) or "none"
        session.output.info(f"tools: {names}" + (f" (toolChoice {fmt.compact_json(settings['toolChoice'])})"
                                                 if "toolChoice" in settings else ""))
        return
    if text.lower() == "off":
        settings.pop("tools", None)
        settings.pop("toolChoice", None)
        session.output.info("tools off")
        return
    try:
        settings["tools"] = check_setting("tools", _as_tools(_json_argument(text)))
    except ValueError as exc:
        session.failed(f"/tools: {exc}")
        return
    names = ", ".join(t["function"]["name"] for t in settings["tools"])
    session.output.info(f"tools for the following chat turns: {names} "
                        "(calls are shown as they are made; /set toolChoice required forces one)")


_RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def set_json(session: ReplSession, arg: str) -> None:
    settings, text = session.state.settings, arg.strip()
    if text.lower() == "off":
        settings.pop("responseFormat", None)
        session.output.info("JSON output off: free text")
        return
    try:
        if not text:
            value: Any = {"type": "json_object"}
        else:
            schema = _json_argument(text)
            is_format = isinstance(schema, dict) and schema.get("type") in _RESPONSE_FORMATS
            value = schema if is_format else {"type": "json_schema", "schema": schema}
        settings["responseFormat"] = check_setting("responseFormat", value)
    except ValueError as exc:
        session.failed(f"/json: {exc}")
        return
    kind = settings["responseFormat"]["type"]
    session.output.info({"json_object": "JSON output: one JSON object per reply",
                         "json_schema": "JSON output: replies follow the schema",
                         "text": "JSON output off: free text"}[kind])


def set_thinking(session: ReplSession, arg: str) -> None:
    settings, word = session.state.settings, arg.strip().lower()
    if word in ("on", "off"):
        settings["thinking"] = word == "on"
        if word == "off":
            settings.pop("thinkingBudget", None)
    elif word.isdigit():
        try:
            settings["thinkingBudget"] = check_setting("thinkingBudget", int(word))
        except ValueError as exc:
            session.failed(str(exc))
            return
        settings["thinking"] = True
    elif word == "default":
        settings.pop("thinking", None)
        settings.pop("thinkingBudget", None)
    elif word:
        session.failed("usage: /think on|off|TOKENS|default")
        return
    thinking = settings.get("thinking")
    state = "the template's default" if thinking is None else ("on" if thinking else "off")
    budget = f", at most {settings['thinkingBudget']} tokens" if "thinkingBudget" in settings else ""
    session.output.info(f"thinking {state}{budget} (reasoning models; shown apart from the answer)")


def embed_texts(session: ReplSession, arg: str) -> None:
    state, text = session.state, arg.strip()
    if text.startswith("--model"):
        _, _, rest = text.partition(" ")
        model, _, text = rest.strip().partition(" ")
        if not model:
            session.failed("usage: /embed [--model MODEL] TEXT [| TEXT ...]")
            return
        state.embed_model = model
    texts = [t.strip() for t in text.split(" | ")] if text else []
    if not texts or not all(texts):
        session.failed("usage: /embed [--model MODEL] TEXT [| TEXT ...]")
        return
    result = session.request("embed", {"model": state.embed_model or state.model, "input": texts})
    if result is not None:
        session.output.lines(fmt.embedding_lines(texts, result))
        session.output.summary(f"{result['model']} · {result['usage']['promptTokens']} tokens · "
                               f"{result['timings']['totalMs']:.1f} ms")


def set_setting(session: ReplSession, arg: str) -> None:
    state = session.state
    name, _, value = arg.strip().partition(" ")
    if not name:
        _show_settings(session)
        return
    key = canonical_setting(name)
    if key is None:
        session.failed(f"unknown setting {name!r}; settable: {' '.join(setting_names())}")
        return
    if not value.strip():
        state.settings.pop(key, None)
        session.output.info(f"{key}: back to the default")
        return
    try:
        state.settings[key] = parse_setting(key, value.strip())
    except ValueError as exc:
        session.failed(str(exc))
        return
    session.output.info(f"{key} = {fmt.compact_json(state.settings[key])}")


def _settings_lines(state: ReplState) -> list[str]:
    lines = [f"{k} = {fmt.compact_json(v)}" for k, v in state.settings.items()]
    defaults = state.server_defaults
    if defaults:
        lines.append(f"(sidecar defaults: maxTokens {defaults.get('maxTokens')}, "
                     f"temperature {defaults.get('temperature')})")
    return lines


def _show_settings(session: ReplSession) -> None:
    state = session.state
    session.output.lines([f"model = {state.model}", *_settings_lines(state),
                          f"(settable: {' '.join(setting_names())})"])


def show_session(session: ReplSession, arg: str) -> None:
    state = session.state
    mode = "conversation" if state.chat_mode else "one-shot (each line alone)"
    exchanges = state.conversation.exchanges
    session.output.lines([f"model: {state.model}", f"mode: {mode}",
                          f"conversation: {exchanges} exchange{'s' if exchanges != 1 else ''} "
                          f"({len(state.conversation.turns)} messages)",
                          *([f"queued for the next message: {_images(len(state.images))}"] if state.images else []),
                          "settings:" if state.settings else "settings: the sidecar's defaults",
                          *("  " + line for line in _settings_lines(state))])


def save_conversation(session: ReplSession, arg: str) -> None:
    """The conversation as JSON messages (the system message first), ready for `chat`."""
    try:
        words = shlex.split(arg)
    except ValueError as exc:
        session.failed(f"/save: {exc}")
        return
    names = [w for w in words if w != "--force"]
    if len(names) != 1:
        session.failed("usage: /save FILE [--force]")
        return
    path = Path(names[0]).expanduser()
    if path.exists() and "--force" not in words:
        session.failed(f"{path} exists: /save {shlex.quote(names[0])} --force overwrites it")
        return
    messages = session.state.conversation.history(session.state.settings.get(SYSTEM))
    partial = path.with_name(f".{path.name}.partial")
    try:  # written whole, then renamed: never half a file
        partial.write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        session.failed(f"/save: {path}: {exc.strerror or exc}")
        return
    session.output.info(f"saved {len(messages)} messages to {path}")


def reset(session: ReplSession, arg: str) -> None:
    session.state.conversation.clear()
    session.state.cancelled_turn = None
    session.output.info("new conversation (settings kept; `/set NAME` restores one default)")


def raw_mode(session: ReplSession, arg: str) -> None:
    state = session.state
    wanted = arg.strip().lower()
    if wanted not in ("", "on", "off"):
        session.failed("usage: /raw [on|off]")
        return
    state.raw = not state.raw if not wanted else wanted == "on"
    session.output.info(f"raw traffic {'on: → sent, ← received' if state.raw else 'off'}")


def call_method(session: ReplSession, arg: str) -> None:
    method, _, text = arg.strip().partition(" ")
    if not method:
        session.failed("usage: /call METHOD [PARAMS-JSON]")
        return
    try:
        params = json.loads(text) if text.strip() else None
    except ValueError as exc:
        session.failed(f"params are not valid JSON: {exc}")
        return
    if params is not None and not isinstance(params, dict):
        session.failed("params must be a JSON object")
        return
    result = session.request(method, params)
    if result is not None:
        session.output.value(result)


def show_log(session: ReplSession, arg: str) -> None:
    try:
        n = int(arg.strip() or 20)
    except ValueError:
        session.failed("usage: /log [N]")
        return
    lines = list(session.client.stderr_lines)[-n:] if n > 0 else []
    session.output.lines(lines or ["(the sidecar has logged nothing)"])


def quit_repl(session: ReplSession, arg: str) -> None:
    raise QuitRepl


COMMANDS: list[Command] = [
    Command("help", "/help [COMMAND]", "list the commands, or explain one", show_help, "command"),
    Command("models", "/models", "list local models (models/list)", list_models),
    Command("load", "/load [MODEL]", "load a model and chat with it from now on (models/load)",
            load_model, "model"),
    Command("unload", "/unload [MODEL]", "unload a model (models/unload)", unload_model, "model"),
    Command("pull", "/pull OWNER/NAME", "download a model from the Hub, with progress (models/download)",
            pull_model),
    Command("rm", "/rm MODEL [--force]", "delete a model's files (models/delete; --adapter NAME: an adapter)",
            remove_model, "model"),
    Command("finetune", "/finetune DATA [K=V…]", "train an adapter for the current model (model=M for another) "
            "on a dataset, with progress; K=V: iterations, learningRate, rank, name, … (models/finetune)",
            finetune),
    Command("profile", "/profile [NAME|use|save|rm]", "list profiles, show one (NAME), chat through one "
            "(use NAME), save one of the current model (save NAME temperature=0.2 system=... tasks=chat,code), "
            "or delete one (rm NAME)", profile, "profile"),
    Command("status", "/status", "memory, requests and loaded models (server/status)", show_status),
    Command("chat", "/chat [TEXT|off]", "conversation mode (the default): plain lines are turns of one chat",
            chat_mode, ("off",)),
    Command("oneshot", "/oneshot [on|off]", "each plain line a fresh one-turn chat (no conversation)",
            oneshot_mode, ("on", "off")),
    Command("new", "/new", "start a new conversation (also /reset)", reset),
    Command("keep", "/keep", "add the last cancelled reply to the conversation after all", keep_cancelled),
    Command("show", "/show", "the model, the settings and the conversation's length", show_session),
    Command("save", "/save FILE [--force]", "write the conversation to FILE as JSON messages", save_conversation),
    Command("image", "/image [PATH…|clear]", "add an image to the next chat message (vision models: the "
            "images go first, then the text); no PATH: list the queued images; clear: drop them",
            queue_image, "path"),
    Command("generate", "/generate TEXT", "complete a raw prompt, no chat template (generate)",
            generate),
    Command("set", "/set [NAME [VALUE]]", "set a generation param (temperature, maxTokens, ...) "
            f"or {SYSTEM}; no value: default (/help set lists them)", set_setting, "setting"),
    Command("tools", "/tools [FILE|JSON|off]", "tools the model may call in the following chat turns "
            "(OpenAI function tools; calls are shown as made)", set_tools, ("off",)),
    Command("json", "/json [SCHEMA|FILE|off]", "JSON output for the following turns: one object, "
            "or valid against a JSON schema (responseFormat)", set_json, ("off",)),
    Command("think", "/think on|off|TOKENS", "reasoning models: thinking on or off, or a budget of "
            "reasoning tokens (reasoning is shown dimmed, apart from the answer)", set_thinking,
            ("on", "off", "default")),
    Command("embed", "/embed TEXT [| TEXT…]", "embedding vectors (dimensions, norm, first components) and "
            "the cosine similarities of texts separated by ' | ' (embed; --model M first picks the model)",
            embed_texts),
    Command("raw", "/raw [on|off]", "show the JSON-RPC traffic both ways (streamed text is in the chunks)", raw_mode, ("on", "off")),
    Command("call", "/call METHOD [JSON]", "send any request with these params; show the result",
            call_method, "method"),
    Command("log", "/log [N]", "the sidecar's last N stderr lines", show_log),
    Command("quit", "/quit", "shut the sidecar down and leave (also /bye, /exit, exit, quit, Ctrl-D)", quit_repl),
]
ALIASES = {"exit": "quit", "bye": "quit", "q": "quit", "?": "help", "h": "help", "reset": "new"}
QUIT_WORDS = {"exit", "quit", "exit()", "quit()"}  # typed as plain lines, as in a shell or ipython


def find_command(name: str) -> Command | None:
    name = ALIASES.get(name, name)
    return next((c for c in COMMANDS if c.name == name), None)


def command_names() -> list[str]:
    return [c.name for c in COMMANDS] + list(ALIASES)


# ---- a line ----------------------------------------------------------------------------------


def is_raw_json(line: str) -> bool:
    return line.lstrip()[:1] in ("{", "[")


def run_line(session: ReplSession, line: str) -> None:
    """Do what one typed line says. Raises QuitRepl for /quit."""
    text = line.strip()
    if not text:
        return
    if is_raw_json(text):
        session.send_line(line.strip("\r\n"))
        return
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # bytes that were not UTF-8
    if text.startswith("/"):
        _run_command(session, text[1:])
    elif text in QUIT_WORDS:
        raise QuitRepl
    else:
        chat_turn(session, text)


def _run_command(session: ReplSession, text: str) -> None:
    name, _, arg = text.partition(" ")
    command = find_command(name)
    if command is None:
        close = difflib.get_close_matches(name, command_names(), n=1)
        hint = f"; did you mean /{close[0]}?" if close else ""
        session.failed(f"unknown command /{name}{hint} (/help lists them)")
        return
    command.run(session, arg)


def completion_kind(name: str) -> str | tuple[str, ...] | None:
    command = find_command(name)
    return None if command is None else command.completes

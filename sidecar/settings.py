"""One typed settings object: built-in defaults < LOCALMLX_* environment < CLI flags.

Read once at start-up; per-request params override the generation defaults. Settings cross
process boundaries (to a sidecar a CLI command spawns, to the conversion child) as the
LOCALMLX_* variables, so each setting has one `Codec`: the parser that reads its text and the
formatter that writes a value as text that parser reads back to the same value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple


class Codec(NamedTuple):
    parse: Callable[[str], Any]
    format: Callable[[Any], str]


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a number above 0, not {text}")
    return value


def _quantization(text: str) -> str:
    value = text.strip().lower()
    if value in ("", "none", "false", "off"):
        return "none"
    if value in ("4bit", "4", "8bit", "8"):
        return value.rstrip("bit") + "bit"
    raise ValueError("expected 4bit, 8bit or none")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str) -> int:
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    if number.isdigit():  # exact, however large
        return int(number) * _UNITS[unit]
    amount = float(number)
    if not amount >= 0 or amount == float("inf"):
        raise ValueError("must be a number of bytes, not negative")
    return int(amount * _UNITS[unit])


def parse_duration(value: str | float | int) -> float:
    """keepAlive as Ollama reads it: seconds, or "1h30m", "5m", "30s", "250ms"; -1 forever."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        if text in ("-1", "0") or text.replace(".", "", 1).lstrip("-").isdigit():
            seconds = float(text)
        else:
            parts = re.fullmatch(r"((\d+(\.\d+)?)(ms|s|m|h))+", text)
            if parts is None:
                raise ValueError(f"not a duration: {value!r}")
            factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
            seconds = sum(float(n) * factor[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ms|s|m|h)", text))
    if seconds < 0 and seconds != -1:
        raise ValueError("a negative duration other than -1")
    return seconds


def _format_duration(seconds: float) -> str:
    """Plain decimal seconds with every digit repr gives, never an exponent (parse_duration
    reads no "1e-05")."""
    text = repr(float(seconds))
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{float(seconds):.{max(0, len(mantissa.partition('.')[2]) - int(exponent))}f}"
    return text.removesuffix(".0")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _format_names(names: tuple[str, ...]) -> str:
    if any("," in name or name != name.strip() or not name for name in names):
        raise ValueError("a name in a list of names cannot contain ',' or be blank at either end")
    return ",".join(names)


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    """`a=b,c=d`: (name, name) pairs, such as a target model and its draft model."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        left, sep, right = (side.strip() for side in item.partition("="))
        if not sep or not left or not right:
            raise ValueError(f"expected target=draft, got {item!r}")
        if left in dict(pairs):
            raise ValueError(f"{left!r} is given two draft models")
        pairs.append((left, right))
    return tuple(pairs)


def _format_pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    if any("," in name or "=" in name or name != name.strip() or not name for pair in pairs for name in pair):
        raise ValueError("a name in a pair cannot contain ',' or '=' or be blank at either end")
    return ",".join(f"{left}={right}" for left, right in pairs)


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in text.split(os.pathsep) if p.strip())


def _format_paths(paths: tuple[Path, ...]) -> str:
    if any(os.pathsep in str(p) for p in paths):
        raise ValueError(f"a path in a list of paths cannot contain {os.pathsep!r}")
    return os.pathsep.join(map(str, paths))


def _log_format(text: str) -> str:
    value = text.strip().lower() or "text"
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected {' or '.join(allowed)}")
        return value
    return parse


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _blas_choice(text: str) -> str:
    choice = text.strip()
    if choice.lower() in ("", "auto", "bundled"):
        return choice.lower() or "auto"
    if os.path.isabs(os.path.expanduser(choice)):
        return os.path.expanduser(choice)
    raise ValueError("expected auto, bundled or an absolute path to a BLAS shared library")


TEXT = Codec(str, str)
INT = Codec(int, str)
POSITIVE_INT = Codec(_positive_int, str)
FLOAT = Codec(float, repr)
POSITIVE_FLOAT = Codec(_positive_float, repr)
BOOL = Codec(_bool, lambda value: "true" if value else "false")
BYTES = Codec(_bytes, str)
DURATION = Codec(parse_duration, _format_duration)
PATH = Codec(lambda text: Path(text).expanduser(), str)
PATHS = Codec(_paths, _format_paths)  # os.pathsep between paths, as in $PATH
NAMES = Codec(_names, _format_names)  # model names, Hub owners, fault names: no commas in any
PAIRS = Codec(_pairs, _format_pairs)
QUANTIZATION = Codec(_quantization, str)
LOG_FORMAT = Codec(_log_format, str)
BLAS = Codec(_blas_choice, str)
OPTIONAL_PATH = Codec(_optional_path, lambda path: "" if path is None else str(path))
DISTRIBUTED_MODE = Codec(_choice("tensor", "pipeline"), str)
DISTRIBUTED_BACKEND = Codec(_choice("ring", "jaccl", "any"), str)


@dataclass(frozen=True)
class Setting:
    env: str
    help: str
    codec: Codec


def _setting(default: Any, env: str, help: str, codec: Codec) -> Any:
    return field(default=default, metadata={"setting": Setting(env, help, codec)})


@dataclass(frozen=True)
class Settings:
    models_dir: Path = _setting(
        Path("~/.cache/mlx_models").expanduser(), "LOCALMLX_MODELS_DIR",
        "directory of local models (one sub-directory per model); the embedded "
        "demo model is built here on first use", PATH)
    default_model: str = _setting(
        "demo", "LOCALMLX_DEFAULT_MODEL",
        "model used when a request names none and none is loaded", TEXT)
    preload_models: tuple[str, ...] = _setting(
        (), "LOCALMLX_PRELOAD_MODELS",
        "comma-separated models to load at start-up ('true' means the default model)", NAMES)
    draft_models: tuple[tuple[str, str], ...] = _setting(
        (), "LOCALMLX_DRAFT_MODELS",
        "comma-separated target=draft pairs: the draft model each target decodes speculatively with "
        "when a request is alone on it (loaded beside it, under the same memory budget)", PAIRS)
    max_tokens: int = _setting(
        2048, "LOCALMLX_MAX_TOKENS", "default maxTokens for generate/chat", INT)
    temperature: float = _setting(
        0.7, "LOCALMLX_TEMPERATURE", "default sampling temperature", FLOAT)
    jit_load: bool = _setting(
        True, "LOCALMLX_JIT_LOAD",
        "load a model on first use; false answers -32011 ModelNotLoaded instead", BOOL)
    auto_download: bool = _setting(
        False, "LOCALMLX_AUTO_DOWNLOAD",
        "download a Hub repo that is not cached when it is first loaded", BOOL)
    enable_cache: bool = _setting(
        True, "LOCALMLX_ENABLE_CACHE",
        "answer an identical deterministic request (temperature 0 or a fixed seed) on the same "
        "loaded model from the exact response cache", BOOL)
    response_cache_entries: int = _setting(
        256, "LOCALMLX_RESPONSE_CACHE_ENTRIES", "responses kept per loaded model by the exact response cache", INT)
    response_cache_bytes: int = _setting(
        16 << 20, "LOCALMLX_RESPONSE_CACHE_BYTES", "bytes of text kept per loaded model by the exact response cache",
        INT)
    prefix_cache: bool = _setting(
        True, "LOCALMLX_PREFIX_CACHE",
        "keep KV caches of recent prompts per model, so a prompt that extends one (the next turn "
        "of a chat) skips its shared prefix", BOOL)
    prompt_cache_size: int = _setting(
        10, "LOCALMLX_PROMPT_CACHE_SIZE", "how many prompt KV caches to keep per model", INT)
    prompt_cache_bytes: int = _setting(
        1 << 30, "LOCALMLX_PROMPT_CACHE_BYTES", "byte budget of the prompt KV caches of each model", INT)
    batching: bool = _setting(
        True, "LOCALMLX_BATCHING",
        "decode concurrent generations on one model together; false runs them one at a time, "
        "in arrival order (models whose caches cannot merge always do)", BOOL)
    max_batch_size: int = _setting(
        16, "LOCALMLX_MAX_BATCH_SIZE",
        "generations decoded together on one model; more wait in the queue", POSITIVE_INT)
    prefill_step_size: int = _setting(
        512, "LOCALMLX_PREFILL_STEP_SIZE",
        "prompt tokens processed per step: smaller keeps other streams flowing during a long prompt",
        POSITIVE_INT)
    stream_buffer_bytes: int = _setting(
        256 << 10, "LOCALMLX_STREAM_BUFFER_BYTES",
        "unsent text one stream may hold while its client reads slowly; past it that request "
        "pauses (the others go on) until the client catches up", POSITIVE_INT)
    max_line_bytes: int = _setting(
        16 << 20, "LOCALMLX_MAX_LINE_BYTES",
        "longest accepted request line; longer ones get -32017", INT)
    max_pending_requests: int = _setting(
        1024, "LOCALMLX_MAX_PENDING_REQUESTS",
        "lines read from stdin and not yet answered; past it the sidecar stops reading until "
        "answers are written (the client's writes then wait in the pipe)", POSITIVE_INT)
    max_pending_bytes: int = _setting(
        64 << 20, "LOCALMLX_MAX_PENDING_BYTES",
        "bytes of those lines; past it reading stops the same way", POSITIVE_INT)
    max_queue: int = _setting(
        32, "LOCALMLX_MAX_QUEUE",
        "requests waiting for the engine before new ones get -32015 busy", INT)
    max_loaded_models: int = _setting(
        2, "LOCALMLX_MAX_LOADED_MODELS",
        "models kept in memory; loading one more unloads the least recently used", INT)
    allowed_orgs: tuple[str, ...] = _setting(
        ("mlx-community",), "LOCALMLX_ALLOWED_ORGS",
        "comma-separated Hub owners whose repos may be downloaded and loaded ('*': any)", NAMES)
    quantization: str = _setting(
        "none", "LOCALMLX_QUANTIZATION",
        "after a download, convert a repo that is not MLX at this width with mlx-lm's converter: "
        "4bit, 8bit or none (MLX repos are used as they are)", QUANTIZATION)
    keep_originals: bool = _setting(
        False, "LOCALMLX_KEEP_ORIGINALS",
        "keep the downloaded originals of a converted model in the Hugging Face cache", BOOL)
    memory_budget: int = _setting(
        0, "LOCALMLX_MEMORY_BUDGET",
        "bytes all loaded models may take together (suffixes K, M, G; 0: 70%% of physical "
        "memory); loading past it unloads idle models, least recently used first", BYTES)
    offload_inactive: float = _setting(
        -1.0, "LOCALMLX_OFFLOAD_INACTIVE",
        "how long a model stays loaded after its last use, as keepAlive ('5m', '1h', seconds; "
        "-1: until unloaded; 0: right after each reply)", DURATION)
    allowed_roots: tuple[Path, ...] = _setting(
        (), "LOCALMLX_ALLOWED_ROOTS",
        f"extra directories ('{os.pathsep}'-separated) a local model path may live "
        "under, besides the models dir and the Hugging Face cache", PATHS)
    allow_image_urls: bool = _setting(
        False, "LOCALMLX_ALLOW_IMAGE_URLS",
        "fetch http(s) image URLs in messages (off: only data: URLs and files under the allowed roots)", BOOL)
    max_image_bytes: int = _setting(
        20 << 20, "LOCALMLX_MAX_IMAGE_BYTES", "largest image a message may carry, in bytes (suffixes K, M, G)",
        BYTES)
    max_image_pixels: int = _setting(
        50_000_000, "LOCALMLX_MAX_IMAGE_PIXELS", "most pixels (width x height) an image may have", POSITIVE_INT)
    profiles_dir: Path | None = _setting(
        None, "LOCALMLX_PROFILES_DIR",
        "a directory of profiles (<name>.toml), read before the models dir's profiles/ and written "
        "to by profiles/save", OPTIONAL_PATH)
    hostfile: Path | None = _setting(
        None, "LOCALMLX_HOSTFILE",
        "serve models sharded over several machines: mlx.launch's hostfile JSON (the first host is "
        "this one, rank 0; the others are started through LOCALMLX_DISTRIBUTED_LAUNCHER); unset: one "
        "machine", OPTIONAL_PATH)
    distributed_mode: str = _setting(
        "tensor", "LOCALMLX_DISTRIBUTED_MODE",
        "how a model is split over the group: tensor (every layer split, all ranks work on each "
        "token) or pipeline (consecutive layers per rank)", DISTRIBUTED_MODE)
    distributed_backend: str = _setting(
        "ring", "LOCALMLX_DISTRIBUTED_BACKEND",
        "mlx.distributed backend: ring (TCP: Ethernet, Wi-Fi, Thunderbolt IP), jaccl (RDMA over "
        "Thunderbolt 5) or any", DISTRIBUTED_BACKEND)
    distributed_launcher: str = _setting(
        "ssh -o BatchMode=yes -o ConnectTimeout=10 {ssh}", "LOCALMLX_DISTRIBUTED_LAUNCHER",
        "command that starts rank {rank} on its host ({ssh}: the hostfile's ssh name, {ip}: its first "
        "address); the rank's command is appended as one argument for ssh, else run through sh -c", TEXT)
    distributed_port: int = _setting(
        32323, "LOCALMLX_DISTRIBUTED_PORT", "first TCP port of the ring backend (rank r listens on port + r)",
        POSITIVE_INT)
    distributed_timeout: float = _setting(
        5.0, "LOCALMLX_DISTRIBUTED_TIMEOUT",
        "seconds without a heartbeat after which a rank counts as lost (requests in flight get "
        "-32019 and the sidecar exits for its client to restart the group); forming the group may "
        "take 6 times as long", POSITIVE_FLOAT)
    distributed_allow_public: bool = _setting(
        False, "LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC",
        "allow a hostfile address on a public network (the ring backend has no authentication: keep "
        "it on a Thunderbolt bridge or a private LAN)", BOOL)
    blas: str = _setting(
        "auto", "LOCALMLX_BLAS",
        "BLAS for MLX on a Linux CPU: auto (an optimized one such as OpenBLAS when installed, else "
        "the wheel's bundled one), bundled, or an absolute path to a BLAS shared library", BLAS)
    inject_faults: tuple[str, ...] = _setting(
        (), "LOCALMLX_INJECT_FAULTS",
        "for tests of failure handling only: comma-separated faults to cause once each "
        "('generation': the next generation raises inside mlx-lm's decode step; 'freeze': the next one "
        "waits for ever holding the GIL, as MLX can when a rank of its group stops; 'method:NAME': the "
        "next call of method NAME raises inside the method)", NAMES)
    log_level: str = _setting(
        "INFO", "LOCALMLX_LOG_LEVEL", "stderr log level (DEBUG, INFO, WARNING, ERROR)", TEXT)
    log_format: str = _setting(
        "text", "LOCALMLX_LOG_FORMAT", "stderr log format: text, or json (one {time, level, logger, "
        "message} object per line; the node client asks for it)", LOG_FORMAT)

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _fields() -> list[tuple[dataclasses.Field[Any], Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(Settings)]


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f, setting in _fields():
        raw = environ.get(setting.env)
        if raw is None:
            continue
        try:
            values[f.name] = setting.codec.parse(raw)
        except ValueError as exc:
            raise SystemExit(f"localmlx: bad {setting.env}={raw!r}: {exc}") from None
    return Settings(**values)


def env_from_settings(settings: Settings) -> dict[str, str]:
    """Every setting as the LOCALMLX_* variable that reads back to it (for a child process)."""
    return {setting.env: setting.codec.format(getattr(settings, f.name)) for f, setting in _fields()}


def flag(name: str) -> str:
    """The command-line flag of the setting `name`: max_tokens -> --max-tokens."""
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; its help names the environment variable under it."""
    for f, setting in _fields():
        parser.add_argument(
            flag(f.name), dest=f.name, default=None,
            type=setting.codec.parse, metavar=f.name.split("_")[-1].upper(),
            help=f"{setting.help} [env {setting.env}; default {setting.codec.format(f.default) or 'none'}]")


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    base = settings_from_env(environ)
    return base.with_overrides(**{f.name: getattr(args, f.name, None) for f, _ in _fields()})


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The setting flags given on a command line, as the LOCALMLX_* variables a spawned
    sidecar reads."""
    return {setting.env: setting.codec.format(value) for f, setting in _fields()
            if (value := getattr(args, f.name, None)) is not None}

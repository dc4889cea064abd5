"""One typed settings object: built-in defaults < LOCALMLX_* environment < CLI flags.

Read once at start-up; per-request params override the generation defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


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
    number = float(value[: len(value) - len(unit)])
    if number < 0:
        raise ValueError("must not be negative")
    return int(number * _UNITS[unit])


def parse_duration(value: str | float | int) -> float:
    """keepAlive as Ollama reads it: seconds, or "1h30m", "5m", "30s", "250ms"; -1 forever."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        if text in ("-1", "0") or text.replace(".", "", 1).lstrip("-").isdigit():
            seconds = float(text)
        else:
            import re

            parts = re.fullmatch(r"((\d+(\.\d+)?)(ms|s|m|h))+", text)
            if parts is None:
                raise ValueError(f"not a duration: {value!r}")
            factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
            seconds = sum(float(n) * factor[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ms|s|m|h)", text))
    if seconds < 0 and seconds != -1:
        raise ValueError("a negative duration other than -1")
    return seconds


def _duration(text: str) -> float:
    return parse_duration(text)


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in text.split(os.pathsep) if p.strip())


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _log_format(text: str) -> str:
    value = text.strip().lower() or "text"
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


def _blas_choice(text: str) -> str:
    choice = text.strip()
    if choice.lower() in ("", "auto", "bundled"):
        return choice.lower() or "auto"
    if os.path.isabs(os.path.expanduser(choice)):
        return os.path.expanduser(choice)
    raise ValueError("expected auto, bundled or an absolute path to a BLAS shared library")


@dataclass(frozen=True)
class Setting:
    env: str
    help: str
    parse: Callable[[str], Any]


def _setting(default: Any, env: str, help: str, parse: Callable[[str], Any]) -> Any:
    return field(default=default, metadata={"setting": Setting(env, help, parse)})


@dataclass(frozen=True)
class Settings:
    models_dir: Path = _setting(
        Path("~/.cache/mlx_models").expanduser(), "LOCALMLX_MODELS_DIR",
        "directory of local models (one sub-directory per model); the embedded "
        "demo model is built here on first use", _path)
    default_model: str = _setting(
        "demo", "LOCALMLX_DEFAULT_MODEL",
        "model used when a request names none and none is loaded", str)
    preload_models: tuple[str, ...] = _setting(
        (), "LOCALMLX_PRELOAD_MODELS",
        "comma-separated models to load at start-up ('true' means the default model)",
        lambda s: tuple(m.strip() for m in s.split(",") if m.strip()))
    max_tokens: int = _setting(
        2048, "LOCALMLX_MAX_TOKENS", "default maxTokens for generate/chat", int)
    temperature: float = _setting(
        0.7, "LOCALMLX_TEMPERATURE", "default sampling temperature", float)
    jit_load: bool = _setting(
        True, "LOCALMLX_JIT_LOAD",
        "load a model on first use; false answers -32011 ModelNotLoaded instead", _bool)
    auto_download: bool = _setting(
        False, "LOCALMLX_AUTO_DOWNLOAD",
        "download a Hub repo that is not cached when it is first loaded", _bool)
    enable_cache: bool = _setting(
        True, "LOCALMLX_ENABLE_CACHE",
        "answer an identical deterministic request (temperature 0 or a fixed seed) on the same "
        "loaded model from the exact response cache", _bool)
    response_cache_entries: int = _setting(
        256, "LOCALMLX_RESPONSE_CACHE_ENTRIES", "responses kept per loaded model by the exact response cache", int)
    response_cache_bytes: int = _setting(
        16 << 20, "LOCALMLX_RESPONSE_CACHE_BYTES", "bytes of text kept per loaded model by the exact response cache",
        int)
    prefix_cache: bool = _setting(
        True, "LOCALMLX_PREFIX_CACHE",
        "keep KV caches of recent prompts per model, so a prompt that extends one (the next turn "
        "of a chat) skips its shared prefix", _bool)
    prompt_cache_size: int = _setting(
        10, "LOCALMLX_PROMPT_CACHE_SIZE", "how many prompt KV caches to keep per model", int)
    prompt_cache_bytes: int = _setting(
        1 << 30, "LOCALMLX_PROMPT_CACHE_BYTES", "byte budget of the prompt KV caches of each model", int)
    batching: bool = _setting(
        True, "LOCALMLX_BATCHING",
        "decode concurrent generations on one model together; false runs them one at a time, "
        "in arrival order (models whose caches cannot merge always do)", _bool)
    max_batch_size: int = _setting(
        16, "LOCALMLX_MAX_BATCH_SIZE",
        "generations decoded together on one model; more wait in the queue", _positive_int)
    prefill_step_size: int = _setting(
        512, "LOCALMLX_PREFILL_STEP_SIZE",
        "prompt tokens processed per step: smaller keeps other streams flowing during a long prompt",
        _positive_int)
    stream_buffer_bytes: int = _setting(
        256 << 10, "LOCALMLX_STREAM_BUFFER_BYTES",
        "unsent text one stream may hold while its client reads slowly; past it that request "
        "pauses (the others go on) until the client catches up", _positive_int)
    max_line_bytes: int = _setting(
        16 << 20, "LOCALMLX_MAX_LINE_BYTES",
        "longest accepted request line; longer ones get -32017", int)
    max_pending_requests: int = _setting(
        1024, "LOCALMLX_MAX_PENDING_REQUESTS",
        "lines read from stdin and not yet answered; past it the sidecar stops reading until "
        "answers are written (the client's writes then wait in the pipe)", _positive_int)
    max_pending_bytes: int = _setting(
        64 << 20, "LOCALMLX_MAX_PENDING_BYTES",
        "bytes of those lines; past it reading stops the same way", _positive_int)
    max_queue: int = _setting(
        32, "LOCALMLX_MAX_QUEUE",
        "requests waiting for the engine before new ones get -32015 busy", int)
    max_loaded_models: int = _setting(
        2, "LOCALMLX_MAX_LOADED_MODELS",
        "models kept in memory; loading one more unloads the least recently used", int)
    allowed_orgs: tuple[str, ...] = _setting(
        ("mlx-community",), "LOCALMLX_ALLOWED_ORGS",
        "comma-separated Hub owners whose repos may be downloaded and loaded ('*': any)",
        lambda s: tuple(o.strip() for o in s.split(",") if o.strip()))
    quantization: str = _setting(
        "none", "LOCALMLX_QUANTIZATION",
        "after a download, convert a repo that is not MLX at this width with mlx-lm's converter: "
        "4bit, 8bit or none (MLX repos are used as they are)", _quantization)
    keep_originals: bool = _setting(
        False, "LOCALMLX_KEEP_ORIGINALS",
        "keep the downloaded originals of a converted model in the Hugging Face cache", _bool)
    memory_budget: int = _setting(
        0, "LOCALMLX_MEMORY_BUDGET",
        "bytes all loaded models may take together (suffixes K, M, G; 0: 70%% of physical "
        "memory); loading past it unloads idle models, least recently used first", _bytes)
    offload_inactive: float = _setting(
        -1.0, "LOCALMLX_OFFLOAD_INACTIVE",
        "how long a model stays loaded after its last use, as keepAlive ('5m', '1h', seconds; "
        "-1: until unloaded; 0: right after each reply)", _duration)
    allowed_roots: tuple[Path, ...] = _setting(
        (), "LOCALMLX_ALLOWED_ROOTS",
        f"extra directories ('{os.pathsep}'-separated) a local model path may live "
        "under, besides the models dir and the Hugging Face cache", _paths)
    blas: str = _setting(
        "auto", "LOCALMLX_BLAS",
        "BLAS for MLX on a Linux CPU: auto (an optimized one such as OpenBLAS when installed, else "
        "the wheel's bundled one), bundled, or an absolute path to a BLAS shared library", _blas_choice)
    inject_faults: tuple[str, ...] = _setting(
        (), "LOCALMLX_INJECT_FAULTS",
        "for tests of failure handling only: comma-separated faults to cause once each "
        "('generation': the next generation raises inside mlx-lm's decode step; 'method:NAME': the "
        "next call of method NAME raises inside the method)",
        lambda s: tuple(f.strip() for f in s.split(",") if f.strip()))
    log_level: str = _setting(
        "INFO", "LOCALMLX_LOG_LEVEL", "stderr log level (DEBUG, INFO, WARNING, ERROR)", str)
    log_format: str = _setting(
        "text", "LOCALMLX_LOG_FORMAT", "stderr log format: text, or json (one {time, level, logger, "
        "message} object per line; the node client asks for it)", _log_format)

    def with_overrides(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _fields() -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(Settings)]


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f, setting in _fields():
        raw = environ.get(setting.env)
        if raw is None:
            continue
        try:
            values[f.name] = setting.parse(raw)
        except ValueError as exc:
            raise SystemExit(f"localmlx: bad {setting.env}={raw!r}: {exc}") from None
    return Settings(**values)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; its help names the environment variable under it."""
    for f, setting in _fields():
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            type=setting.parse, metavar=f.name.split("_")[-1].upper(),
            help=f"{setting.help} [env {setting.env}; default {f.default!s}]")


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    base = settings_from_env(environ)
    return base.with_overrides(**{f.name: getattr(args, f.name, None) for f, _ in _fields()})


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The setting flags given on a command line, as the LOCALMLX_* variables a spawned
    sidecar reads."""
    env = {}
    for f, setting in _fields():
        value = getattr(args, f.name, None)
        if value is not None:
            env[setting.env] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return env

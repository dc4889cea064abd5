"""Models held in memory: load, describe, unload, least-recently-used eviction.

Runs on the engine thread only; other threads read `describe_all()` snapshots.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..demo_model import ensure_demo_model
from ..errors import ModelLoadFailed, OutOfMemory
from ..hub import ModelLocation
from .memory import is_out_of_memory

log = logging.getLogger("localmlx.registry")

Progress = Callable[[str, float, float | None, str], None]

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length", "n_ctx", "model_max_length")


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict[str, Any]
    description: dict[str, Any]
    last_used: float = field(default_factory=time.monotonic)

    @property
    def context_length(self) -> int | None:
        return self.description["contextLength"]


def _context_length(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    out = {"bits": q["bits"]}
    if "group_size" in q:
        out["groupSize"] = q["group_size"]
    if "mode" in q:
        out["mode"] = q["mode"]
    return out


def _warm_up(model: Any, tokenizer: Any) -> None:
    """Run two decode steps once, so kernel compilation is paid at load time and not in
    the first request's time to first token."""
    from mlx_lm import stream_generate

    for _ in stream_generate(model, tokenizer, [0], max_tokens=2):
        pass


def describe(name: str, path: Path, model: Any, config: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_reduce
    from mlx_lm.utils import get_total_parameters

    nbytes = tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0)
    return {
        "model": name,
        "path": str(path),
        "type": str(config.get("model_type", "unknown")),
        "parameters": int(get_total_parameters(model)),
        "quantization": _quantization(config),
        "contextLength": _context_length(config),
        "bytes": int(nbytes),
    }


class ModelRegistry:
    def __init__(self, max_loaded: int) -> None:
        self.max_loaded = max_loaded
        self._models: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel | None:
        loaded = self._models.get(name)
        if loaded is not None:
            loaded.last_used = time.monotonic()
        return loaded

    def peek(self, name: str) -> LoadedModel | None:
        """Like get, without counting as a use."""
        return self._models.get(name)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def describe_all(self) -> list[dict[str, Any]]:
        return [m.description for m in list(self._models.values())]

    def load(self, location: ModelLocation, progress: Progress) -> tuple[LoadedModel, bool]:
        """Returns (model, already_loaded)."""
        existing = self.get(location.name)
        if existing is not None:
            return existing, True
        started = time.perf_counter()
        try:
            path = self._materialize(location, progress)
            self._make_room()
            progress("weights", 1, 3, "step")
            from mlx_lm import load

            model, tokenizer, config = load(str(path), return_config=True)
            progress("warmup", 2, 3, "step")
            _warm_up(model, tokenizer)
            description = describe(location.name, path, model, config)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory(f"Out of memory loading {location.name}: {exc}",
                                  model=location.name) from exc
            log.exception("load of %s failed", location.name)
            raise ModelLoadFailed(f"Model load failed for {location.name}: {exc}",
                                  model=location.name, reason=type(exc).__name__) from exc
        description["loadTimeMs"] = round((time.perf_counter() - started) * 1000, 3)
        loaded = LoadedModel(location.name, path, model, tokenizer, config, description)
        self._models[location.name] = loaded
        progress("ready", 3, 3, "step")
        log.info("loaded %s from %s in %.0f ms", location.name, path, description["loadTimeMs"])
        return loaded, False

    def unload(self, name: str) -> bool:
        loaded = self._models.pop(name, None)
        if loaded is None:
            return False
        del loaded
        self._release_memory()
        log.info("unloaded %s", name)
        return True

    def unload_all(self) -> None:
        for name in list(self._models):
            self.unload(name)

    def _make_room(self) -> None:
        while self._models and len(self._models) >= self.max_loaded:
            oldest = min(self._models.values(), key=lambda m: m.last_used)
            log.info("unloading %s to make room (max %d loaded)", oldest.name, self.max_loaded)
            self.unload(oldest.name)

    @staticmethod
    def _materialize(location: ModelLocation, progress: Progress) -> Path:
        if location.source == "embedded":
            progress("build", 0, 3, "step")
            return ensure_demo_model(location.path.parent)
        if location.path is None:  # a Hub repo, auto-download on
            progress("download", 0, 3, "step")
            from huggingface_hub import snapshot_download
            from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

            return Path(snapshot_download(location.repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
        progress("resolve", 0, 3, "step")
        with open(location.path / "config.json", "rb") as f:
            json.load(f)  # fail early and clearly on a broken config
        return location.path

    @staticmethod
    def _release_memory() -> None:
        import mlx.core as mx

        gc.collect()
        mx.clear_cache()

"""Adapters on disk: where they live, what they are, and the names they are served under.

An adapter is a directory as mlx-lm writes it (`adapter_config.json`, `adapters.safetensors`),
kept in the models dir under `adapters/<name>`, or anywhere under the allowed roots. A run
of `models/finetune` adds `localmlx-training.json`: the run that made it. Served with its base
model, it is the model `<base>+<name>`. Nothing here touches MLX.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParams, ModelNotFound

log = logging.getLogger("localmlx.adapters")

ADAPTERS_DIRNAME = "adapters"
RUNS_DIRNAME = ".runs"  # under adapters/: the checkpoints of unfinished training runs
TRAINING_FILE = "localmlx-training.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
CHECKPOINT = "checkpoint.safetensors"  # in a run's folder: the adapter's weights at its last checkpoint
CHECKPOINT_STATE = "checkpoint.json"  # beside it, written after it: {"iteration": n}
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    base: str | None
    fine_tune_type: str
    rank: int | None
    num_layers: int | None
    bytes: int
    created_at: str | None
    training: dict[str, Any] | None

    def describe(self, loaded_as: list[str]) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "base": self.base, "fineTuneType": self.fine_tune_type,
                "rank": self.rank, "numLayers": self.num_layers, "bytes": self.bytes,
                "createdAt": self.created_at, "training": self.training, "loadedAs": loaded_as}


def name_from(text: str) -> str | None:
    """`text` made into an adapter (or model folder) name, or None when nothing of it is left."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:128]
    return name if name and ADAPTER_NAME.match(name) else None


def last_checkpoint(run: Path) -> int | None:
    """The iteration of the whole checkpoint in a training run's folder, if it has one."""
    try:
        state = json.loads((run / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        return None
    return state["iteration"] if (run / CHECKPOINT).is_file() else None


def adapters_dir(models_dir: Path) -> Path:
    return models_dir / ADAPTERS_DIRNAME


def variant_name(base: str, adapter: str) -> str:
    return f"{base}+{adapter}"


def split_variant(ref: str) -> tuple[str, str] | None:
    """`<base>+<adapter>` as (base, adapter), when the part after the last + can name one."""
    base, plus, adapter = ref.rpartition("+")
    return (base, adapter) if plus and base and ADAPTER_NAME.match(adapter) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_adapter(path: Path, name: str) -> Adapter:
    """The adapter in `path`; -32602 when it is not one mlx-lm can load."""
    config = _read_json(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if config is None or not weights.is_file():
        raise InvalidParams(f"Not an adapter: {name} needs {CONFIG_FILE} and {WEIGHTS_FILE} (as mlx-lm writes them)",
                            errors=[{"path": "/adapter", "message": "not an mlx-lm adapter directory"}],
                            adapter=name)
    training = _read_json(path / TRAINING_FILE)
    lora = config.get("lora_parameters")
    lora = lora if isinstance(lora, dict) else {}
    base = training.get("model") if training else config.get("model")
    stamp = datetime.datetime.fromtimestamp(weights.stat().st_mtime, datetime.UTC).isoformat(timespec="seconds")
    kind = config.get("fine_tune_type", "lora")
    return Adapter(name=name, path=path, base=base if isinstance(base, str) else None,
                   fine_tune_type=kind if kind in ("lora", "dora", "full") else "lora",
                   rank=_as_int(lora.get("rank")), num_layers=_as_int(config.get("num_layers")),
                   bytes=weights.stat().st_size, created_at=stamp, training=training)


def list_adapters(models_dir: Path) -> list[Adapter]:
    root = adapters_dir(models_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and ADAPTER_NAME.match(path.name):
            try:
                found.append(read_adapter(path, path.name))
            except InvalidParams:
                log.warning("skipping %s: not an adapter directory", path)
    return found


def named_adapter(models_dir: Path, name: str) -> Adapter:
    path = adapters_dir(models_dir) / name
    if not ADAPTER_NAME.match(name) or not path.is_dir():
        raise ModelNotFound(f"Adapter not found: no '{name}' in {adapters_dir(models_dir)}",
                            adapter=name, adaptersDir=str(adapters_dir(models_dir)))
    return read_adapter(path, name)


def delete_adapter(models_dir: Path, name: str) -> int:
    """Delete a stored adapter; its folder is renamed aside first, so that a crash half-way
    never leaves a half adapter that looks complete. Returns the bytes freed."""
    adapter = named_adapter(models_dir, name)
    freed = sum(f.stat().st_size for f in adapter.path.rglob("*") if f.is_file() and not f.is_symlink())
    aside = adapter.path.with_name(f".{name}.deleting-{uuid.uuid4().hex[:8]}")
    os.rename(adapter.path, aside)
    shutil.rmtree(aside, ignore_errors=True)
    log.info("deleted adapter %s (%d bytes)", name, freed)
    return freed


def publish(staged: Path, final: Path, overwrite: bool) -> None:
    """Move a complete adapter directory into place in one rename (a replaced one is renamed
    aside first, then removed): readers see the old adapter or the new one, never a mix."""
    aside = None
    if final.exists():
        if not overwrite:
            raise InvalidParams(f"An adapter named {final.name} exists: choose another name or pass overwrite",
                                errors=[{"path": "/name", "message": "exists"}], adapter=final.name)
        aside = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    os.rename(staged, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)

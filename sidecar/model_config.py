"""What a model's config.json says about it: architecture, quantization, context length.
Pure reading, no MLX: used for listings and by the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length", "n_ctx", "model_max_length")


def context_length(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    out = {"bits": q["bits"]}
    if "group_size" in q:
        out["groupSize"] = q["group_size"]
    if "mode" in q:
        out["mode"] = q["mode"]
    return out


def vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def read_config(model_dir: Path) -> dict[str, Any] | None:
    """A model's config.json; None when it cannot be read or is not an object."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def summary(model_dir: Path) -> dict[str, Any]:
    """type, quantization and contextLength of a model on disk (nulls when unreadable)."""
    config = read_config(model_dir)
    if config is None:
        return {"type": None, "quantization": None, "contextLength": None}
    kind = config.get("model_type")
    return {"type": kind if isinstance(kind, str) else None, "quantization": quantization(config),
            "contextLength": context_length(config)}

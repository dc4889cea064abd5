"""Which models embed, read from their files alone (no MLX): sentence-transformers'
modules.json and 1_Pooling/config.json, and config.json's model_type and architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ENCODER = "encoder"  # BERT family: bidirectional, run by sidecar/embeddings/bert.py
DECODER = "decoder"  # an mlx-lm causal model read through its inner `model` (Qwen3-Embedding)

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "modernbert"})
_DECODER_ARCHITECTURES = frozenset({"Qwen3Model", "Qwen2Model", "LlamaModel", "MistralModel", "Gemma3TextModel"})
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_lasttoken": "lasttoken"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _config(model_dir: Path) -> dict[str, Any]:
    config = _read_json(model_dir / "config.json")
    return config if isinstance(config, dict) else {}


def is_sentence_transformer(model_dir: Path) -> bool:
    return (model_dir / "modules.json").is_file() or (model_dir / "1_Pooling" / "config.json").is_file()


def embedding_kind(model_dir: Path, name: str = "") -> str | None:
    """ENCODER, DECODER, or None for a model that generates text."""
    config = _config(model_dir)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if config.get("model_type") in ENCODER_TYPES:
        return ENCODER
    named = "embedding" in name.lower() or "embedding" in str(config.get("_name_or_path", "")).lower()
    if is_sentence_transformer(model_dir) or named or _DECODER_ARCHITECTURES.intersection(architectures):
        return DECODER
    return None


def pooling(model_dir: Path, kind: str) -> str:
    """mean, cls or lasttoken: what 1_Pooling/config.json says, else the kind's usual one."""
    config = _read_json(model_dir / "1_Pooling" / "config.json")
    if isinstance(config, dict):
        for key, mode in _POOLING_MODES.items():
            if config.get(key):
                return mode
    return "mean" if kind == ENCODER else "lasttoken"

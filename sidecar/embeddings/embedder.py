"""An embedding model as the engine holds it: tokens in, one pooled vector per text out.

Encoders (the BERT family) run sidecar/embeddings/bert.py; decoder embedding models
(Qwen3-Embedding) are mlx-lm's own model classes read through their inner `model` module,
whose output is the final-normed hidden states. Batches are padded on the right: an encoder
masks the padding, and a causal decoder's real tokens never see the padding after them, so
each row's own last token (its `length - 1`) is exactly what it would be alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_model
from transformers import AutoTokenizer

from ..model_config import context_length
from .bert import BertModel
from .detect import DECODER, ENCODER, pooling


@dataclass
class Embedder:
    kind: str  # ENCODER or DECODER
    pooling: str  # mean, cls or lasttoken
    network: Any  # an mlx.nn.Module: BertModel, or the inner model of an mlx-lm causal LM
    dimensions: int  # the size of a full vector
    max_tokens: int | None  # the longest input it takes
    tokens_per_second: float | None = None  # padded tokens, as last measured (sizes micro-batches)

    def embed(self, batch: list[list[int]]) -> Any:
        """Pooled vectors (len(batch), dimensions), float32, not normalized."""
        lengths = mx.array([len(tokens) for tokens in batch])
        width = max(len(tokens) for tokens in batch)
        padded = mx.array([tokens + [0] * (width - len(tokens)) for tokens in batch])
        hidden = self.network(padded, lengths) if self.kind == ENCODER else self.network(padded)
        return _pool(hidden.astype(mx.float32), lengths, self.pooling)


def _pool(hidden: Any, lengths: Any, mode: str) -> Any:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    keep = (mx.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
    return (hidden * keep[..., None]).sum(axis=1) / lengths[:, None].astype(hidden.dtype)


def load_embedder(path: Path, kind: str) -> tuple[Embedder, dict[str, Any]]:
    """The model of an embedding checkpoint and its config (on the engine thread)."""
    if kind == ENCODER:
        network, config = _load_encoder(path)
        max_tokens = network.max_tokens
    else:
        model, config = _load_decoder(path)
        network, max_tokens = model.model, context_length(config)
    hidden: Any = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return Embedder(kind, pooling(path, kind), network, int(hidden), max_tokens), config


def _weights(path: Path) -> dict[str, Any]:
    weights: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = mx.load(str(file))
        assert isinstance(tensors, dict)  # what a .safetensors file holds
        weights.update(tensors)
    return weights


def _load_encoder(path: Path) -> tuple[Any, dict[str, Any]]:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    network = BertModel(config)
    weights = BertModel.sanitize(_weights(path))
    quantization = config.get("quantization")
    if isinstance(quantization, dict):  # as mlx-lm quantizes: the layers the checkpoint has scales for
        nn.quantize(network, quantization["group_size"], quantization["bits"],
                    class_predicate=lambda name, _: f"{name}.scales" in weights)
    network.load_weights(list(weights.items()), strict=True)
    network.eval()
    mx.eval(network.parameters())
    return network, config


def _load_decoder(path: Path) -> tuple[Any, dict[str, Any]]:
    """mlx-lm's model class for the checkpoint. Embedding checkpoints often hold only the inner
    model (no `model.` prefix, no lm_head): names are prefixed, and every inner weight must be there."""
    given: set[str] = set()

    def classes(config: dict[str, Any]) -> tuple[type, type]:
        model_class, args_class = _get_classes(config)

        class Checkpoint(model_class):  # type: ignore[misc, valid-type]
            def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
                if weights and not any(name.startswith("model.") for name in weights):
                    weights = {f"model.{name}": value for name, value in weights.items()}
                weights = super().sanitize(weights) if hasattr(super(), "sanitize") else weights
                given.update(weights)
                return weights

        return Checkpoint, args_class

    model, config = load_model(path, strict=False, get_model_classes=classes)
    missing = [name for name in dict(tree_flatten(model.model.parameters())) if f"model.{name}" not in given]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    return model, config


def load_tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(path))


__all__ = ["DECODER", "ENCODER", "Embedder", "load_embedder", "load_tokenizer"]

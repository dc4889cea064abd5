"""A compact BERT encoder in MLX (BERT, RoBERTa and XLM-RoBERTa checkpoints): embeddings,
post-LayerNorm encoder layers, and the hidden states of every token. Parameter names are the
Hugging Face ones, so a checkpoint's safetensors load as they are."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_ACTIVATIONS = {"gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
                "relu": nn.relu, "silu": nn.silu}


class Embeddings(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))

    def __call__(self, tokens: mx.array, offset: int) -> mx.array:
        positions = mx.arange(offset, offset + tokens.shape[1])
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class Dense(nn.Module):
    """A linear layer followed by a residual LayerNorm (BERT's "output" blocks)."""

    def __init__(self, inputs: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, hidden = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(hidden // self.heads), mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(batch, length, hidden)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads)  # the checkpoint's name for it
        self.output = Dense(hidden, hidden, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.activation = _ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.activation(self.dense(x))


class Layer(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        self.attention = Attention(hidden, config["num_attention_heads"], eps)
        self.intermediate = Intermediate(hidden, config["intermediate_size"], config.get("hidden_act", "gelu"))
        self.output = Dense(config["intermediate_size"], hidden, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.layer = [Layer(config) for _ in range(config["num_hidden_layers"])]


class BertModel(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("model_type") == "modernbert":
            raise ValueError("ModernBERT encoders are not supported yet (BERT, RoBERTa and XLM-RoBERTa are)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position embeddings {config['position_embedding_type']!r} are not supported")
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        # RoBERTa counts positions from padding_idx + 1
        self.position_offset = config.get("pad_token_id", 1) + 1 if "roberta" in config.get("model_type", "") else 0
        self.max_tokens = config["max_position_embeddings"] - self.position_offset

    def __call__(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        """Hidden states (batch, length, hidden) of right-padded `tokens`; padding is masked out."""
        x = self.embeddings(tokens, self.position_offset)
        mask = (mx.arange(tokens.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names to ours: the task heads' prefix goes; pooler, heads and buffers are dropped."""
        out = {}
        for name, value in weights.items():
            for prefix in ("bert.", "roberta.", "model."):
                name = name.removeprefix(prefix)
            if name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
                out[name] = value
        return out

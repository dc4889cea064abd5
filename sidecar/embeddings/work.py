"""One embed request's work: tokenized off the engine thread, then run on it one
micro-batch per scheduler turn, so a big batch never holds streaming generations back for
long and its memory stays bounded.

Inputs run longest first (so a micro-batch holds little padding), and a micro-batch is sized
in padded tokens (rows × longest row): as many as the model embedded in about `TURN_S`
last time, measured on this machine (Metal or CPU, big model or small), between
`MIN_BATCH_TOKENS` and `MAX_BATCH_TOKENS`. An input longer than that runs alone. Vectors
come back in the order of the input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextLengthExceeded, InvalidParams
from ..length_bound import fewest_tokens
from ..text import clean_text

TURN_S = 0.2  # about how long one micro-batch may hold the engine thread
FIRST_BATCH_TOKENS = 512  # before the model has been timed
MIN_BATCH_TOKENS = 64
MAX_BATCH_TOKENS = 8192  # bounds the activations of one micro-batch


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int | None,
             per_token: tuple[int, int] | None = None) -> list[list[int]]:
    """Each text with the model's special tokens. An input longer than the model takes is
    refused (-32016), not truncated: the client chunks it, and no vector silently drops text.
    With `per_token` (see length_bound), one whose length alone shows it is too long is
    refused before anything is tokenized."""
    if max_tokens is not None and per_token is not None:
        for index, text in enumerate(texts):
            if (fewest := fewest_tokens(text, per_token)) > max_tokens:
                raise ContextLengthExceeded(
                    f"input[{index}] is at least {fewest} tokens, judged by its length ({len(text)} characters); "
                    f"the model takes at most {max_tokens}", index=index, tokens=fewest, limit=max_tokens,
                    judgedBy="length")
    rows = [list(ids) for ids in tokenizer([clean_text(t) for t in texts], add_special_tokens=True)["input_ids"]]
    for index, tokens in enumerate(rows):
        if not tokens:
            raise InvalidParams(f"input[{index}] is empty after tokenization",
                                errors=[{"path": f"/input/{index}", "message": "no tokens"}])
        if max_tokens is not None and len(tokens) > max_tokens:
            raise ContextLengthExceeded(
                f"input[{index}] is {len(tokens)} tokens; the model takes at most {max_tokens}",
                index=index, tokens=len(tokens), limit=max_tokens)
    return rows


def next_batch(lengths: list[int], order: list[int], start: int, budget: int) -> list[int]:
    """The inputs of the next micro-batch: `order[start:]` is longest first, so the first row
    is the longest and rows × its length ≤ budget (at least one row)."""
    longest = lengths[order[start]]
    rows = max(1, budget // longest)
    return order[start:start + rows]


@dataclass(eq=False)
class EmbeddingWork:
    loaded: Any  # the LoadedModel whose `embedder` runs it
    tokens: list[list[int]]
    dimensions: int
    normalize: bool
    progress: Callable[..., None] = lambda *_: None  # $/progress: phase "embed", inputs done of total
    order: list[int] = field(init=False)  # input indices, longest first (stable)
    finished: int = 0  # inputs embedded so far (a prefix of `order`)
    vectors: list[Any] = field(init=False)
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.tokens)), key=lambda i: -len(self.tokens[i]))
        self.vectors = [None] * len(self.tokens)

    @property
    def done(self) -> bool:
        return self.finished == len(self.tokens)

    def step(self) -> bool:
        """Run the next micro-batch (on the engine thread); True once every input has its vector."""
        import mlx.core as mx  # here: the engine imports this module at start-up, MLX only with a model

        embedder = self.loaded.embedder
        started = time.perf_counter()
        self.started_at = self.started_at or started
        rate = embedder.tokens_per_second
        budget = FIRST_BATCH_TOKENS if rate is None else int(rate * TURN_S)
        budget = max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, budget))
        indices = next_batch([len(t) for t in self.tokens], self.order, self.finished, budget)
        pooled = embedder.embed([self.tokens[i] for i in indices])[:, : self.dimensions]
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        for index, row in zip(indices, pooled.tolist(), strict=True):  # tolist: the batch has run
            self.vectors[index] = row
        padded = len(indices) * len(self.tokens[indices[0]])
        embedder.tokens_per_second = padded / max(time.perf_counter() - started, 1e-6)
        self.finished += len(indices)
        self.progress("embed", self.finished, len(self.tokens), "inputs")
        return self.done

    def result(self, queued_at: float) -> dict[str, Any]:
        tokens = sum(len(t) for t in self.tokens)
        queue_ms = ((self.started_at or queued_at) - queued_at) * 1000
        return {"model": self.loaded.name, "vectors": self.vectors, "dimensions": self.dimensions,
                "usage": {"promptTokens": tokens, "totalTokens": tokens},
                "timings": {"queueMs": round(queue_ms, 3), "totalMs": 0.0}}  # totalMs: set by the method

"""Per-request sampling: a sampler that owns its random key, and the logits processors.

mlx-lm's `make_sampler` draws from MLX's global random key, so a request's tokens would
depend on what else ran (and a batch would share one stream of draws). Here every request's
sampler derives the key of its n-th draw from (seed, n) alone: the same seed gives the same
tokens whether the request runs alone, in a batch, or is parked and resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidParams

if TYPE_CHECKING:  # MLX is imported on the engine thread, when used
    import mlx.core as mx
    from mlx_lm.sample_utils import LogitsProcessor, Sampler

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment


def _draw_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): well-mixed, distinct keys for every draw."""
    z = (seed * _GOLDEN + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    repetition_context_size: int = 20

    @property
    def deterministic(self) -> bool:
        """Same request, same tokens: greedy, or sampled with a fixed seed."""
        return self.temperature == 0 or self.seed is not None


class KeyedSampler:
    """Samples row-wise with its own key per draw; `rewind` undoes draws that were thrown
    away (a parked request recomputes its next token and must draw the same one)."""

    def __init__(self, params: SamplingParams, vocab_size: int | None, draw_seed: int) -> None:
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        self._temperature = params.temperature
        self._seed = params.seed if params.seed is not None else draw_seed
        self._step = 0
        self._filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < params.top_p < 1:
            self._filters.append(lambda x: apply_top_p(x, params.top_p))
        if params.min_p > 0:
            self._filters.append(lambda x: apply_min_p(x, params.min_p))
        # topK at or above the vocabulary keeps every token: the same as no topK.
        if params.top_k > 0 and (vocab_size is None or params.top_k < vocab_size):
            self._filters.append(lambda x: apply_top_k(x, params.top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        drawn = self.draw_at(logprobs, self._step)
        self._step += 1
        return drawn

    def draw_at(self, logprobs: mx.array, step: int) -> mx.array:
        """Draw `step` of this request, without moving its count: speculative decoding draws
        each output position with that position's key, however many drafts it threw away."""
        import mlx.core as mx

        key = mx.random.key(_draw_seed(self._seed, step))
        for keep_likely in self._filters:
            logprobs = keep_likely(logprobs)
        return mx.random.categorical(logprobs * (1.0 / self._temperature), key=key)

    def rewind(self, draws: int = 1) -> None:
        self._step = max(0, self._step - draws)

    def seek(self, step: int) -> None:
        """The next draw is draw `step` (a generation handed over after speculating)."""
        self._step = step


def draw_at(sampler: Sampler, logprobs: mx.array, step: int) -> mx.array:
    """Output position `step`'s token under `sampler`: keyed by the position for a sampled
    request; greedy needs no key."""
    if isinstance(sampler, KeyedSampler):
        return sampler.draw_at(logprobs, step)
    return sampler(logprobs)


def make_sampler(params: SamplingParams, vocab_size: int | None, draw_seed: int) -> Sampler:
    """Greedy requests share mlx-lm's one greedy sampler, so a greedy batch samples in one call.
    `draw_seed` seeds a sampled request that gave no seed of its own."""
    from mlx_lm.sample_utils import greedy_sampler

    return greedy_sampler if params.temperature == 0 else KeyedSampler(params, vocab_size, draw_seed)


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int | None) -> None:
    if not bias or vocab_size is None:
        return
    outside = sorted(token for token in bias if token >= vocab_size)
    if outside:
        raise InvalidParams(
            f"logitBias names token {outside[0]}, beyond the model's vocabulary of {vocab_size}",
            errors=[{"path": f"/logitBias/{token}", "message": f"token id must be < {vocab_size}"}
                    for token in outside[:8]])


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    from mlx_lm.sample_utils import make_logits_processors as mlx_lm_processors

    def penalty(value: float | None, neutral: float) -> float | None:
        return None if value is None or value == neutral else value

    size = params.repetition_context_size
    return mlx_lm_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=penalty(params.repetition_penalty, 1.0), repetition_context_size=size,
        presence_penalty=penalty(params.presence_penalty, 0.0), presence_context_size=size,
        frequency_penalty=penalty(params.frequency_penalty, 0.0), frequency_context_size=size)


def reset_global_random_state() -> None:
    """A sampler that fails mid-trace can leave MLX's global random key without a value;
    mlx-lm's compiled sampling helpers take it as an input, so give it a fresh one."""
    import mlx.core as mx

    mx.random.seed(int.from_bytes(os.urandom(8), "little"))

"""A generation's run on its own: mlx-lm's single-stream `generate_step`, its prompt in chunks
between steps, and how a run's KV cache is shared with the prefix cache and handed on.

MLX and mlx-lm are imported where they are used, on the engine thread: this module is
imported at start-up, and `initialize` does not wait for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .generation import Generation
from .registry import LoadedModel

if TYPE_CHECKING:
    from mlx_lm.sample_utils import LogitsProcessor

KV_GROUP_SIZE = 64  # mlx-lm's default group size for a quantized KV cache


def fetch_prefix(loaded: LoadedModel, prompt: list[int]) -> tuple[Any, list[int]]:
    """The longest cached prefix of `prompt` (a private copy) and the tokens left to compute.
    At least one token is always left: the model must run on something to sample."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    if loaded.prefix_cache is None:
        return None, prompt
    cache, rest = loaded.prefix_cache.fetch_nearest_cache(0, prompt)
    if cache is not None and not rest:
        if not can_trim_prompt_cache(cache):
            return None, prompt
        trim_prompt_cache(cache, 1)
        rest = prompt[-1:]
    return (cache, rest) if cache is not None else (None, prompt)


def keep_prefix(loaded: LoadedModel, tokens: list[int], cache: Any) -> None:
    """Remember the KV of `tokens` for later requests that share a prefix with them."""
    if loaded.prefix_cache is not None and tokens and cache:
        loaded.prefix_cache.insert_cache(0, list(tokens), cache)


def caches_step_back(loaded: LoadedModel) -> bool:
    """Moving a running generation (into a batch, or out of it to pause) steps its cache
    back one token: plain KV caches always can."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(loaded.model))


def step_back(generation: Generation, cache: Any) -> None:
    """The cache holds the last emitted token, and the next token was already drawn from
    it: drop that token from the cache and take the draw back, to recompute both."""
    from mlx_lm.models.cache import trim_prompt_cache

    trim_prompt_cache(cache, 1)
    rewind = getattr(generation.sampler, "rewind", None)
    if rewind is not None:
        rewind()


def _with_history(processors: list[LogitsProcessor], history: list[int]) -> list[LogitsProcessor]:
    """`generate_step` shows logits processors only the tokens it was given; a batch shows
    the whole prompt. Prepend the rest, so penalties see the same context either way."""
    if not processors or not history:
        return processors
    import mlx.core as mx

    before = mx.array(history, dtype=mx.uint32)

    def seeing_history(process: LogitsProcessor) -> LogitsProcessor:
        return lambda tokens, logits: process(mx.concatenate([before, tokens.astype(mx.uint32)]), logits)

    return [seeing_history(p) for p in processors]


def unpark(generation: Generation) -> tuple[Any, list[int], int]:
    """A parked generation's (cache, tokens in it, last token), taken back from it."""
    assert generation.parked is not None  # a lane parks it before it is unparked
    parked, generation.parked = generation.parked, None
    return parked


class LaneRun:
    """What a lane asks of a generation running on its own, whatever steps it."""

    generation: Generation

    def step(self) -> bool:
        """One step; True when the generation is done."""
        raise NotImplementedError

    def close(self, keep: bool = True) -> None:
        raise NotImplementedError

    @property
    def cancelled_while_throttled(self) -> bool:
        """No step will see its cancel: a throttled run is not stepped."""
        return self.generation.throttled and self.generation.job.cancelled

    def stop(self) -> Generation:
        """Stop between steps (cancelled, or its lane closing): the generation, finished."""
        self.close()
        self.generation.cancel_now()
        return self.generation


class SoloRun(LaneRun):
    """One generation through mlx-lm's `generate_step`, its prompt processed in chunks
    between steps (so control work and other models are served during a long prompt)."""

    def __init__(self, loaded: LoadedModel, generation: Generation, prefill_step: int,
                 resume: tuple[Any, list[int], int] | None = None) -> None:
        """`resume`: (cache, the tokens in it, the next token to feed) of a generation taken
        out of a batch, its prompt long done."""
        from mlx_lm.models.cache import make_prompt_cache

        self.loaded = loaded
        self.generation = generation
        self._prefill_step = prefill_step
        self._kv_bits, max_kv_size = generation.kv_options
        self._steps: Any = None  # the generate_step generator, once the prompt is in
        if resume is not None:
            self.cache, self.history, self._last_prompt_token = resume
            self._to_prefill: list[int] = []
            return
        if generation.plain_kv:
            cache, rest = fetch_prefix(loaded, generation.prompt)
        else:  # its own kind of cache: none from the prefix cache (plain KV only) fits it
            cache, rest = None, generation.prompt
        generation.cached_tokens = len(generation.prompt) - len(rest)
        self.cache = cache if cache is not None else make_prompt_cache(loaded.model, max_kv_size=max_kv_size)
        self.history = list(generation.prompt[: generation.cached_tokens])  # the tokens in the cache
        self._to_prefill = rest[:-1]
        self._last_prompt_token = rest[-1]

    def step(self) -> bool:
        """One prompt chunk or one token; True when the generation is done."""
        generation = self.generation
        if generation.job.cancelled:
            generation.cancel_now()
            return True
        if self._to_prefill:
            self._prefill_chunk()
            return False
        return self._decode()

    def _decode(self) -> bool:
        """One step once the prompt is in: here one token."""
        generation = self.generation
        token, _ = next(self._decoding())  # never exhausted: the generation ends at max_tokens first
        self.history.append(token)
        last = generation.completion_tokens + 1 >= generation.max_tokens
        eos = token in self.loaded.tokenizer.eos_token_ids
        generation.on_token(token, "stop" if eos else ("length" if last else None))
        return generation.done

    def _prefill_chunk(self) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        chunk, self._to_prefill = self._to_prefill[: self._prefill_step], self._to_prefill[self._prefill_step:]
        with mx.stream(generation_stream):
            self.loaded.model(mx.array(chunk)[None], cache=self.cache)
            self._quantize_cache()
            mx.eval([c.state for c in self.cache])
        self.history.extend(chunk)
        cached = self.generation.cached_tokens
        self.generation.on_prefill(len(self.history) - cached, len(self.generation.prompt) - cached)

    def _quantize_cache(self) -> None:
        if self._kv_bits is not None:
            from mlx_lm.generate import maybe_quantize_kv_cache

            maybe_quantize_kv_cache(self.cache, quantized_kv_start=0, kv_group_size=KV_GROUP_SIZE,
                                    kv_bits=self._kv_bits)

    def _decoding(self) -> Any:
        if self._steps is None:
            import mlx.core as mx
            from mlx_lm.generate import generate_step

            generation = self.generation
            processors = _with_history(generation.logits_processors, self.history)
            self._steps = generate_step(
                mx.array([self._last_prompt_token]), self.loaded.model, max_tokens=generation.max_tokens,
                sampler=generation.sampler, logits_processors=processors, prompt_cache=self.cache,
                kv_bits=self._kv_bits, kv_group_size=KV_GROUP_SIZE, quantized_kv_start=0)
            self.history.append(self._last_prompt_token)
            generation.on_prompt_done()
        return self._steps

    def close(self, keep: bool = True) -> None:
        if self._steps is not None:
            self._steps.close()
        if keep and self.generation.plain_kv:
            keep_prefix(self.loaded, self.history, self.cache)

    def hand_over(self) -> tuple[list[int], Any, list[int]]:
        """Stop here and return (tokens to feed next, cache, tokens in the cache), so the
        generation continues elsewhere exactly as it would have continued here."""
        if self._steps is None:  # still in its prompt
            return [*self._to_prefill, self._last_prompt_token], self.cache, self.history
        self._steps.close()
        step_back(self.generation, self.cache)
        return self.history[-1:], self.cache, self.history[:-1]

"""Where a model's generations run, one step at a time, on the engine thread.

`BatchLane` keeps one mlx-lm `BatchGenerator` per model: generations join and leave it
between steps, and each step advances every one of them. A generation that is alone on its
model runs as a `SoloRun` instead (mlx-lm's single-stream `generate_step`, a few percent
faster than a batch of one) and moves into the batch, KV cache and all, when another
arrives. `SoloLane` runs generations one after another, in order, for models whose caches
cannot merge into a batch. Every lane routes each sampled token to its `Generation` and
hands back the ones that finished.

MLX and mlx-lm are imported where they are used, on the engine thread: this module is
imported at start-up, and `initialize` does not wait for them.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from .generation import Generation
from .registry import LoadedModel

if TYPE_CHECKING:
    from mlx_lm.sample_utils import LogitsProcessor

log = logging.getLogger("localmlx.engine")

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


def _caches_step_back(loaded: LoadedModel) -> bool:
    """Moving a running generation (into a batch, or out of it to pause) steps its cache
    back one token: plain KV caches always can."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(loaded.model))


def _step_back(generation: Generation, cache: Any) -> None:
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


def _unpark(generation: Generation) -> tuple[Any, list[int], int]:
    """A parked generation's (cache, tokens in it, last token), taken back from it."""
    assert generation.parked is not None  # a lane parks it before it is unparked
    parked, generation.parked = generation.parked, None
    return parked


class SoloRun:
    """One generation through mlx-lm's `generate_step`, its prompt processed in chunks
    between steps (so control work and other models are served during a long prompt)."""

    def __init__(self, loaded: LoadedModel, generation: Generation, prefill_step: int) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.loaded = loaded
        self.generation = generation
        self._prefill_step = prefill_step
        self._kv_bits, max_kv_size = generation.kv_options
        if generation.plain_kv:
            cache, rest = fetch_prefix(loaded, generation.prompt)
        else:  # its own kind of cache: none from the prefix cache (plain KV only) fits it
            cache, rest = None, generation.prompt
        generation.cached_tokens = len(generation.prompt) - len(rest)
        self.cache = cache if cache is not None else make_prompt_cache(loaded.model, max_kv_size=max_kv_size)
        self.history = list(generation.prompt[: generation.cached_tokens])  # the tokens in the cache
        self._to_prefill = rest[:-1]
        self._last_prompt_token = rest[-1]
        self._steps: Any = None  # the generate_step generator, once the prompt is in

    def step(self) -> bool:
        """One prompt chunk or one token; True when the generation is done."""
        generation = self.generation
        if generation.job.cancelled:
            generation.cancel_now()
            return True
        if self._to_prefill:
            self._prefill_chunk()
            return False
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

    @property
    def cancelled_while_throttled(self) -> bool:
        """No step will see its cancel: a throttled run is not stepped."""
        return self.generation.throttled and self.generation.job.cancelled

    def stop(self) -> Generation:
        """Stop between steps (cancelled, or its lane closing): the generation, finished."""
        self.close()
        self.generation.cancel_now()
        return self.generation

    def hand_over(self) -> tuple[list[int], Any, list[int]]:
        """Stop here and return (tokens to feed next, cache, tokens in the cache), so the
        generation continues elsewhere exactly as it would have continued here."""
        if self._steps is None:  # still in its prompt
            return [*self._to_prefill, self._last_prompt_token], self.cache, self.history
        self._steps.close()
        _step_back(self.generation, self.cache)
        return self.history[-1:], self.cache, self.history[:-1]


class BatchLane:
    def __init__(self, loaded: LoadedModel, max_batch: int, prefill_step: int) -> None:
        from mlx_lm.generate import BatchGenerator

        self.loaded = loaded
        self.max_batch = max_batch
        self._prefill_step = prefill_step
        self._batch = BatchGenerator(loaded.model, completion_batch_size=max_batch,
                                     prefill_batch_size=min(8, max_batch), prefill_step_size=prefill_step)
        self._by_uid: dict[int, Generation] = {}
        self._parked: list[Generation] = []
        self._solo: SoloRun | None = None
        self._can_move = _caches_step_back(loaded)
        # Requests that want their own kind of KV cache (quantized, bounded) cannot join the
        # batch: they run one at a time beside it, a step each in turn.
        self._apart = SoloLane(loaded, max_batch, prefill_step)
        self._apart_turn = False

    @property
    def active(self) -> int:
        return len(self._by_uid) + len(self._parked) + (self._solo is not None) + self._apart.active

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    @property
    def has_work(self) -> bool:
        return self._batch_has_work or self._apart.has_work

    @property
    def _batch_has_work(self) -> bool:
        return bool(self._by_uid) or (self._solo is not None and not self._solo.generation.throttled)

    @property
    def paused(self) -> int:
        solo_paused = int(self._solo is not None and self._solo.generation.throttled)
        return len(self._parked) + solo_paused + self._apart.paused

    def generations(self) -> list[Generation]:
        solo = [self._solo.generation] if self._solo is not None else []
        return [*self._by_uid.values(), *self._parked, *solo, *self._apart.generations()]

    def admit(self, generation: Generation) -> None:
        if not generation.plain_kv:
            self._apart.admit(generation)
            return
        if self._can_move and not self._by_uid and not self._parked and self._solo is None:
            self._solo = SoloRun(self.loaded, generation, self._prefill_step)
            return
        self._move_solo_into_batch()
        cache, rest = fetch_prefix(self.loaded, generation.prompt)
        generation.cached_tokens = len(generation.prompt) - len(rest)
        self._insert(generation, rest, cache, generation.prompt[: generation.cached_tokens],
                     generation.max_tokens)

    def _move_solo_into_batch(self) -> None:
        solo, self._solo = self._solo, None
        if solo is None:
            return
        generation = solo.generation
        tokens, cache, history = solo.hand_over()
        remaining = generation.max_tokens - generation.completion_tokens
        self._insert(generation, tokens, cache, history, remaining)

    def _insert(self, generation: Generation, tokens: list[int], cache: Any, history: list[int],
                max_tokens: int) -> None:
        stops = self.loaded.eos_stops
        assert stops is not None  # only an embedding model has none, and it has no lane
        (uid,) = self._batch.insert(
            [tokens], max_tokens=[max_tokens], caches=[cache] if cache is not None else None,
            all_tokens=[history], samplers=[generation.sampler],
            logits_processors=[generation.logits_processors], stop_sequences=[stops])
        self._by_uid[uid] = generation

    def step(self) -> list[Generation]:
        """One decode step for the batch (and one prefill chunk for joiners), or one step of
        the generation running alone, or of one running apart. Returns those that finished."""
        self._apart_turn = not self._apart_turn
        if self._apart.has_work and (self._apart_turn or not self._batch_has_work):
            return self._apart.step()
        solo = self._solo
        if solo is not None:
            if not solo.step():
                return []
            self._solo = None
            solo.close()
            return [solo.generation]
        prompt_done, tokens = self._batch.next()
        for response in prompt_done:
            generation = self._by_uid.get(response.uid)
            if generation is not None:
                generation.on_prefill(*response.progress)
                if response.end_of_prompt:
                    generation.on_prompt_done()
        finished: list[Generation] = []
        for response in tokens:
            generation = self._by_uid[response.uid]
            generation.on_token(response.token, response.finish_reason)
            if response.finish_reason is not None:  # the batch dropped it already
                del self._by_uid[response.uid]
                keep_prefix(self.loaded, response.all_tokens, response.prompt_cache)
                finished.append(generation)
        stopped = [uid for uid, g in self._by_uid.items() if g.done or g.job.cancelled]
        finished.extend(self._remove(stopped))
        self._park_throttled()
        return finished

    def _remove(self, uids: list[int]) -> list[Generation]:
        if not uids:
            return []
        caches = self._batch.remove(uids, return_prompt_caches=True)
        removed = []
        for uid in uids:
            generation = self._by_uid.pop(uid)
            generation.cancel_now()
            cache, tokens = caches.get(uid, (None, None))
            keep_prefix(self.loaded, tokens, cache)
            removed.append(generation)
        return removed

    # ---- back-pressure -------------------------------------------------------------------

    def _park_throttled(self) -> None:
        """Take out of the batch the generations whose client has not read their stream:
        the others go on; a parked one keeps its KV cache and resumes where it stopped.
        (A generation running alone is simply not stepped while throttled.)"""
        throttled = [uid for uid, g in self._by_uid.items() if g.throttled and g.first_token_at]
        if not throttled or not self._can_move:
            return
        caches = self._batch.remove(throttled, return_prompt_caches=True)
        for uid in throttled:
            generation = self._by_uid.pop(uid)
            cache, tokens = caches[uid]
            _step_back(generation, cache)
            generation.parked = (cache, list(tokens[:-1]), tokens[-1])
            self._parked.append(generation)
            stream = generation.stream  # there is one: only a stream throttles
            log.info("request %r paused: its client has not read %d bytes of its stream",
                     generation.request.request_id, stream.pending_bytes if stream is not None else 0)

    def resume_drained(self) -> None:
        self._apart.resume_drained()
        for generation in [g for g in self._parked if g.drained and not g.job.cancelled]:
            self._parked.remove(generation)
            cache, history, last = _unpark(generation)
            log.info("request %r resumed", generation.request.request_id)
            remaining = generation.max_tokens - generation.completion_tokens
            self._insert(generation, [last], cache, history, max(1, remaining))

    def take_cancelled(self) -> list[Generation]:
        """Cancelled generations that no step will see (paused ones): finished now."""
        done = [g for g in self._parked if g.job.cancelled]
        for generation in done:
            self._parked.remove(generation)
            cache, history, _ = _unpark(generation)
            keep_prefix(self.loaded, history, cache)
            generation.cancel_now()
        solo = self._solo
        if solo is not None and solo.cancelled_while_throttled:
            self._solo = None
            done.append(solo.stop())
        return done + self._apart.take_cancelled()

    def stop_all(self) -> list[Generation]:
        stopped = self._remove(list(self._by_uid))
        for generation in self._parked:
            generation.parked = None
            generation.cancel_now()
        stopped.extend(self._parked)
        self._parked.clear()
        solo, self._solo = self._solo, None
        if solo is not None:
            stopped.append(solo.stop())
        return stopped + self._apart.stop_all()

    def close(self) -> None:
        self._apart.close()
        self._batch.close()


class SoloLane:
    """Generations one at a time, in arrival order: for models whose caches cannot merge
    into a batch, and for every model when batching is off."""

    def __init__(self, loaded: LoadedModel, max_waiting: int, prefill_step: int) -> None:
        self.loaded = loaded
        self.max_batch = max_waiting
        self._prefill_step = prefill_step
        self._waiting: collections.deque[Generation] = collections.deque()
        self._current: SoloRun | None = None

    @property
    def active(self) -> int:
        return len(self._waiting) + (self._current is not None)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    @property
    def has_work(self) -> bool:
        current = self._current
        return not current.generation.throttled if current is not None else bool(self._waiting)

    @property
    def paused(self) -> int:
        return int(self._current is not None and self._current.generation.throttled)

    def generations(self) -> list[Generation]:
        current = [self._current.generation] if self._current is not None else []
        return [*current, *self._waiting]

    def admit(self, generation: Generation) -> None:
        """Queued by when its request line was read: requests are tokenized on worker threads
        and can reach the engine out of order, but they run in the order they were sent."""
        arrived = generation.request.received_at
        position = len(self._waiting)
        while position > 0 and self._waiting[position - 1].request.received_at > arrived:
            position -= 1
        self._waiting.insert(position, generation)

    def step(self) -> list[Generation]:
        if self._current is None:
            if not self._waiting:
                return []
            self._current = SoloRun(self.loaded, self._waiting.popleft(), self._prefill_step)
        current = self._current
        if not current.step():
            return []
        self._current = None
        current.close()
        return [current.generation]

    def resume_drained(self) -> None:
        pass  # a throttled generation simply is not stepped (see has_work)

    def take_cancelled(self) -> list[Generation]:
        """Cancelled generations that no step will see: waiting ones, a throttled current one."""
        done = [g for g in self._waiting if g.job.cancelled]
        for generation in done:
            self._waiting.remove(generation)
            generation.cancel_now()
        current = self._current
        if current is not None and current.cancelled_while_throttled:
            self._current = None
            done.append(current.stop())
        return done

    def stop_all(self) -> list[Generation]:
        current, self._current = self._current, None
        stopped = [current.stop()] if current is not None else []
        for generation in self._waiting:
            generation.cancel_now()
        stopped.extend(self._waiting)
        self._waiting.clear()
        return stopped

    def close(self) -> None:
        if self._current is not None:
            self._current.close(keep=False)

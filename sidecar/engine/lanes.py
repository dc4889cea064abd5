"""Where a model's generations run, one step at a time, on the engine thread.

`BatchLane` keeps one mlx-lm `BatchGenerator` per model: generations join and leave it
between steps, and each step advances every one of them. `SoloLane` runs generations one
after another, in order, for models whose caches cannot merge into a batch. Both route
each sampled token to its `Generation` and hand back the ones that finished.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from .generation import Generation
from .registry import LoadedModel

log = logging.getLogger("localmlx.engine")


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


class BatchLane:
    def __init__(self, loaded: LoadedModel, max_batch: int, prefill_step: int) -> None:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        self.loaded = loaded
        self.max_batch = max_batch
        self._batch = BatchGenerator(loaded.model, completion_batch_size=max_batch,
                                     prefill_batch_size=min(8, max_batch), prefill_step_size=prefill_step)
        self._by_uid: dict[int, Generation] = {}
        self._parked: list[Generation] = []
        # Parking steps a cache back one token: plain KV caches always can.
        self._can_park = all(type(c) is KVCache for c in make_prompt_cache(loaded.model))

    @property
    def active(self) -> int:
        return len(self._by_uid) + len(self._parked)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    @property
    def has_work(self) -> bool:
        return bool(self._by_uid)

    @property
    def paused(self) -> int:
        return len(self._parked)

    def generations(self) -> list[Generation]:
        return [*self._by_uid.values(), *self._parked]

    def admit(self, generation: Generation) -> None:
        cache, rest = fetch_prefix(self.loaded, generation.prompt)
        generation.cached_tokens = len(generation.prompt) - len(rest)
        self._insert(generation, rest, cache, generation.prompt[: generation.cached_tokens],
                     generation.max_tokens)

    def _insert(self, generation: Generation, tokens: list[int], cache: Any, history: list[int],
                max_tokens: int) -> None:
        (uid,) = self._batch.insert(
            [tokens], max_tokens=[max_tokens], caches=[cache] if cache is not None else None,
            all_tokens=[history], samplers=[generation.sampler],
            logits_processors=[generation.logits_processors], stop_sequences=[self.loaded.eos_stops])
        self._by_uid[uid] = generation

    def step(self) -> list[Generation]:
        """One decode step for the batch (and one prefill chunk for joiners). Returns the
        generations that finished, their results ready to build."""
        prompt_done, tokens = self._batch.next()
        for response in prompt_done:
            if response.end_of_prompt and response.uid in self._by_uid:
                self._by_uid[response.uid].on_prompt_done()
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
        the others go on; a parked one keeps its KV cache and resumes where it stopped."""
        from mlx_lm.models.cache import trim_prompt_cache

        throttled = [uid for uid, g in self._by_uid.items() if g.throttled and g.first_token_at]
        if not throttled or not self._can_park:
            return
        caches = self._batch.remove(throttled, return_prompt_caches=True)
        for uid in throttled:
            generation = self._by_uid.pop(uid)
            cache, tokens = caches[uid]
            # The cache holds the last emitted token and a next token was already drawn
            # from it: step back one token and take that draw back, then recompute it.
            trim_prompt_cache(cache, 1)
            rewind = getattr(generation.sampler, "rewind", None)
            if rewind is not None:
                rewind()
            generation.parked = (cache, list(tokens[:-1]), tokens[-1])
            self._parked.append(generation)
            log.info("request %r paused: its client has not read %d bytes of its stream",
                     generation.request.request_id, generation.stream.pending_bytes)

    def resume_drained(self) -> None:
        for generation in [g for g in self._parked if g.drained and not g.job.cancelled]:
            self._parked.remove(generation)
            cache, history, last = generation.parked
            generation.parked = None
            log.info("request %r resumed", generation.request.request_id)
            remaining = generation.max_tokens - generation.completion_tokens
            self._insert(generation, [last], cache, history, max(1, remaining))

    def take_cancelled(self) -> list[Generation]:
        """Cancelled generations that no step will see (parked ones): finished now."""
        done = [g for g in self._parked if g.job.cancelled]
        for generation in done:
            self._parked.remove(generation)
            cache, history, last = generation.parked
            keep_prefix(self.loaded, history, cache)
            generation.parked = None
            generation.cancel_now()
        return done

    def stop_all(self) -> list[Generation]:
        stopped = self._remove(list(self._by_uid))
        for generation in self._parked:
            generation.parked = None
            generation.cancel_now()
        stopped.extend(self._parked)
        self._parked.clear()
        return stopped

    def close(self) -> None:
        self._batch.close()


class _PrefillCancelled(Exception):
    """Raised from mlx-lm's prompt-progress callback: a long prompt stops between chunks."""


class SoloLane:
    """One generation at a time through mlx-lm's `generate_step`, the rest waiting in order."""

    def __init__(self, loaded: LoadedModel, max_waiting: int, prefill_step: int) -> None:
        self.loaded = loaded
        self.max_batch = max_waiting
        self._prefill_step = prefill_step
        self._waiting: collections.deque[Generation] = collections.deque()
        self._current: Generation | None = None
        self._steps: Any = None
        self._cache: Any = None
        self._history: list[int] = []

    @property
    def active(self) -> int:
        return len(self._waiting) + (self._current is not None)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    @property
    def has_work(self) -> bool:
        current = self._current
        return not current.throttled if current is not None else bool(self._waiting)

    @property
    def paused(self) -> int:
        return int(self._current is not None and self._current.throttled)

    def generations(self) -> list[Generation]:
        return [g for g in (self._current, *self._waiting) if g is not None]

    def admit(self, generation: Generation) -> None:
        self._waiting.append(generation)

    def _start_next(self) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        generation = self._waiting.popleft()
        cache, rest = fetch_prefix(self.loaded, generation.prompt)
        generation.cached_tokens = len(generation.prompt) - len(rest)
        self._cache = cache if cache is not None else make_prompt_cache(self.loaded.model)
        self._history = list(generation.prompt)
        self._current = generation

        def stop_prefill_when_cancelled(processed: int, total: int) -> None:
            if generation.job.cancelled:
                raise _PrefillCancelled

        self._steps = generate_step(
            mx.array(rest), self.loaded.model, max_tokens=generation.max_tokens, sampler=generation.sampler,
            logits_processors=generation.logits_processors, prompt_cache=self._cache,
            prefill_step_size=self._prefill_step, prompt_progress_callback=stop_prefill_when_cancelled)

    def step(self) -> list[Generation]:
        if self._current is None:
            if not self._waiting:
                return []
            self._start_next()
        generation = self._current
        if generation.job.cancelled:
            return [self._end(keep=True)]
        try:
            token, _ = next(self._steps)
        except _PrefillCancelled:
            return [self._end(keep=False)]
        except StopIteration:  # max_tokens reached on the step before
            generation.finish_reason = generation.finish_reason or "length"
            return [self._end(keep=True)]
        self._history.append(token)
        last = generation.completion_tokens + 1 >= generation.max_tokens
        reason = "stop" if token in self.loaded.tokenizer.eos_token_ids else ("length" if last else None)
        generation.on_token(token, reason)
        return [self._end(keep=True)] if generation.done else []

    def _end(self, keep: bool) -> Generation:
        generation = self._current
        if self._steps is not None:
            self._steps.close()
        if keep:
            keep_prefix(self.loaded, self._history, self._cache)
        self._current, self._steps, self._cache, self._history = None, None, None, []
        generation.cancel_now()
        return generation

    def resume_drained(self) -> None:
        pass  # a throttled generation simply is not stepped (see has_work)

    def take_cancelled(self) -> list[Generation]:
        """Cancelled generations that no step will see: waiting ones, a throttled current one."""
        done = [g for g in self._waiting if g.job.cancelled]
        for generation in done:
            self._waiting.remove(generation)
            generation.cancel_now()
        current = self._current
        if current is not None and current.throttled and current.job.cancelled:
            done.append(self._end(keep=True))
        return done

    def stop_all(self) -> list[Generation]:
        stopped = [self._end(keep=True)] if self._current is not None else []
        for generation in self._waiting:
            generation.cancel_now()
        stopped.extend(self._waiting)
        self._waiting.clear()
        return stopped

    def close(self) -> None:
        self._steps = None

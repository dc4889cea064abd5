"""Where a model's generations run, one step at a time, on the engine thread.

`BatchLane` keeps one mlx-lm `BatchGenerator` per model: generations join and leave it
between steps, and each step advances every one of them. A generation that is alone on its
model runs on its own instead (a `SoloRun`: mlx-lm's single-stream `generate_step`, a few
percent faster than a batch of one; or a `SpeculativeRun`, when it drafts) and moves into the
batch, KV cache and all, when another arrives; one that drafts leaves the batch again when it
is the last one left. `SoloLane` runs generations one after another, in order, for models whose caches
cannot merge into a batch. Every lane routes each sampled token to its `Generation` and
hands back the ones that finished.

MLX and mlx-lm are imported where they are used, on the engine thread: this module is
imported at start-up, and `initialize` does not wait for them.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from .generation import Generation
from .registry import LoadedModel
from .runs import LaneRun, SoloRun, caches_step_back, fetch_prefix, keep_prefix, step_back, unpark
from .speculation import SPECULATE_AGAIN_AFTER, SpeculativeRun, run_alone

log = logging.getLogger("localmlx.engine")


class BatchLane:
    def __init__(self, loaded: LoadedModel, max_batch: int, prefill_step: int) -> None:
        from .prefill_groups import EvenPrefillBatchGenerator

        self.loaded = loaded
        self.max_batch = max_batch
        self._prefill_step = prefill_step
        self._batch: Any = EvenPrefillBatchGenerator(loaded.model, completion_batch_size=max_batch,
                                     prefill_batch_size=min(8, max_batch), prefill_step_size=prefill_step)
        self._by_uid: dict[int, Generation] = {}
        self._parked: list[Generation] = []
        self._solo: SoloRun | None = None
        self._can_move = caches_step_back(loaded)
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
            self._solo = run_alone(self.loaded, generation, self._prefill_step, self._can_move)
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
        self._speculate_again()
        return finished

    def _speculate_again(self) -> None:
        """The last generation in the batch goes back to drafting on its own, when it drafts
        and has enough left to gain from it (it leaves as a parked one does)."""
        if len(self._by_uid) != 1 or self._parked or self._solo is not None or not self._can_move:
            return
        ((uid, generation),) = self._by_uid.items()
        left = generation.max_tokens - generation.completion_tokens
        if (generation.prepared.speculation is None or generation.first_token_at is None
                or generation.throttled or left < SPECULATE_AGAIN_AFTER):
            return
        cache, tokens = self._batch.remove([uid], return_prompt_caches=True)[uid]
        del self._by_uid[uid]
        step_back(generation, cache)
        self._solo = SpeculativeRun(self.loaded, generation, self._prefill_step,
                                    resume=(cache, list(tokens[:-1]), tokens[-1]))

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
            step_back(generation, cache)
            generation.parked = (cache, list(tokens[:-1]), tokens[-1])
            self._parked.append(generation)
            stream = generation.stream  # there is one: only a stream throttles
            log.info("request %r paused: its client has not read %d bytes of its stream",
                     generation.request.request_id, stream.pending_bytes if stream is not None else 0)

    def resume_drained(self) -> None:
        self._apart.resume_drained()
        for generation in [g for g in self._parked if g.drained and not g.job.cancelled]:
            self._parked.remove(generation)
            cache, history, last = unpark(generation)
            log.info("request %r resumed", generation.request.request_id)
            remaining = generation.max_tokens - generation.completion_tokens
            self._insert(generation, [last], cache, history, max(1, remaining))

    def take_cancelled(self) -> list[Generation]:
        """Cancelled generations that no step will see (paused ones): finished now."""
        done = [g for g in self._parked if g.job.cancelled]
        for generation in done:
            self._parked.remove(generation)
            cache, history, _ = unpark(generation)
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
        self._current: LaneRun | None = None
        self._trims: bool | None = None  # its caches can step back (asked on first use)

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
            self._current = self._run(self._waiting.popleft())
        current = self._current
        if not current.step():
            return []
        self._current = None
        current.close()
        return [current.generation]

    def _run(self, generation: Generation) -> LaneRun:
        if self.loaded.vision is not None:
            from ..vision.run import VisionRun

            return VisionRun(self.loaded, generation, self._prefill_step)
        if self._trims is None:
            self._trims = caches_step_back(self.loaded)
        return run_alone(self.loaded, generation, self._prefill_step, self._trims)

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

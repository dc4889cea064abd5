"""Speculative decoding for a generation alone on its model.

A drafter guesses the next few tokens cheaply: a small draft model that shares the target's
vocabulary, or the continuation of an n-gram that already occurred in the prompt or the output
(prompt lookup: what vLLM calls `ngram` and llama.cpp `lookup`). The target checks every guess
in one forward pass and keeps the longest prefix it would have produced itself, plus one token
of its own; mlx-lm's `trim_prompt_cache` takes the rest back out of both KV caches.

Why not mlx-lm's `speculative_generate_step`: it samples every checked position in one call of
a sampler that it shares with the draft model, so a seeded request's draws would depend on how
many guesses were thrown away, and it has no prompt lookup. Here the token at output position n
is drawn with position n's own key (`sampling.draw_at`), as it is without speculation: greedy
and seeded requests give the tokens they give without it. Logits processors (penalties, token
masks, the thinking budget) see each position's sequence once, in order, and only ever an
accepted prefix: exactly what they see without speculation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams
from .generation import Generation
from .registry import LoadedModel
from .runs import SoloRun, fetch_prefix, keep_prefix
from .sampling import KeyedSampler, draw_at

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.sample_utils import LogitsProcessor, Sampler

log = logging.getLogger("localmlx.engine")

MIN_DRAFT, FIRST_DRAFT, MAX_DRAFT = 1, 3, 8  # adaptive draft length, when the request sets none
LOOKUP_NGRAMS = (4, 3, 2)  # prompt lookup matches the longest of these suffixes first
SPECULATE_AGAIN_AFTER = 16  # a generation left alone in a batch goes back to speculating only
# when at least this many tokens remain: leaving the batch costs a cache copy


@dataclass(frozen=True)
class Speculation:
    """How a generation drafts: with a draft model (which wins), else from its own n-grams."""

    draft: LoadedModel | None
    num_draft_tokens: int | None  # None: adaptive

    @property
    def method(self) -> str:
        return "draft" if self.draft is not None else "promptLookup"


class DraftLength:
    """How many tokens to draft: fixed when asked, else grown while every guess is accepted and
    cut back to just past the first rejected one."""

    def __init__(self, fixed: int | None) -> None:
        self._fixed = fixed
        self.tokens = fixed or FIRST_DRAFT

    def update(self, drafted: int, accepted: int) -> None:
        if self._fixed is not None or drafted == 0:
            return
        if accepted == drafted:
            self.tokens = min(self.tokens + 1, MAX_DRAFT)
        else:
            self.tokens = max(MIN_DRAFT, accepted + 1)


class DraftModelDrafter:
    """Guesses with a small model that keeps its own KV cache of the sequence: `fed` tokens of
    it, always a prefix of what the target has accepted."""

    def __init__(self, draft: LoadedModel, prompt: list[int]) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.draft = draft
        cache, rest = fetch_prefix(draft, prompt)
        self.cache = cache if cache is not None else make_prompt_cache(draft.model)
        self.fed = len(prompt) - len(rest)

    def catch_up(self, tokens: list[int], chunk: int) -> bool:
        """Feed one chunk of what it has not seen but the last token; True when there was none
        (the last one goes in with the first guess)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        behind = tokens[self.fed:-1][:chunk]
        if not behind:
            return True
        with mx.stream(generation_stream):
            self.draft.model(mx.array(behind)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
        self.fed += len(behind)
        return False

    def propose(self, tokens: list[int], count: int, first_step: int, sampler: Sampler,
                processors: list[LogitsProcessor]) -> mx.array:
        """`count` guesses after `tokens`, each drawn with the key of the position it guesses
        (after the request's penalties): left lazy, so the target's check runs in the same
        evaluation."""
        import mlx.core as mx

        y = mx.array(tokens[self.fed:], dtype=mx.uint32)
        seen = mx.array(tokens, dtype=mx.uint32) if processors else None
        guesses = []
        for j in range(count):
            logits = self.draft.model(y[None], cache=self.cache)[:, -1, :]
            if seen is not None:
                if j:
                    seen = mx.concatenate([seen, y])
                for process in processors:
                    logits = process(seen, logits)
            y = draw_at(sampler, logits - mx.logsumexp(logits, axis=-1, keepdims=True), first_step + j)
            mx.async_eval(y)  # type: ignore[no-untyped-call]  # (untyped in MLX's stubs)
            guesses.append(y)
        self.fed = len(tokens) + count - 1  # the last guess is not in its cache yet
        return mx.concatenate(guesses).astype(mx.uint32)

    def accept(self, length_before: int, drafted: int, accepted: int) -> None:
        """Keep the accepted guesses in its cache, drop the others."""
        from mlx_lm.models.cache import trim_prompt_cache

        kept = min(accepted, drafted - 1)
        trim_prompt_cache(self.cache, (drafted - 1) - kept)
        self.fed = length_before + kept

    def close(self, tokens: list[int]) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        if self.fed > len(tokens):
            trim_prompt_cache(self.cache, self.fed - len(tokens))
            self.fed = len(tokens)
        keep_prefix(self.draft, tokens[: self.fed], self.cache)


class PromptLookupDrafter:
    """Guesses that what followed the last occurrence of the sequence's final n-gram follows
    again. An index of every n-gram's latest end grows with the sequence."""

    def __init__(self) -> None:
        self._latest_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at or before this position are indexed

    def catch_up(self, tokens: list[int], chunk: int) -> bool:
        return True

    def propose(self, tokens: list[int], count: int, first_step: int, sampler: Sampler,
                processors: list[LogitsProcessor]) -> list[int]:
        self._index(tokens, len(tokens) - 1)  # not the final n-gram itself: it has no continuation
        for n in LOOKUP_NGRAMS:
            end = self._latest_end.get(tuple(tokens[-n:])) if len(tokens) > n else None
            if end is not None:
                return tokens[end: end + count]
        return []

    def _index(self, tokens: list[int], upto: int) -> None:
        for end in range(self._indexed + 1, upto + 1):
            for n in LOOKUP_NGRAMS:
                if end >= n:
                    self._latest_end[tuple(tokens[end - n: end])] = end
        self._indexed = max(self._indexed, upto)

    def accept(self, length_before: int, drafted: int, accepted: int) -> None:
        pass  # rejected guesses were never part of the sequence it indexes

    def close(self, tokens: list[int]) -> None:
        pass


Drafter = DraftModelDrafter | PromptLookupDrafter


def _drafter_for(generation: Generation, speculation: Speculation) -> Drafter:
    if speculation.draft is not None:
        return DraftModelDrafter(speculation.draft, generation.prompt)
    return PromptLookupDrafter()


class SpeculativeRun(SoloRun):
    """One generation decoding speculatively: its prompt as a `SoloRun`'s, then rounds of
    guess-and-check. `tokens` is the whole sequence (prompt and output); the target's cache holds
    all of it but the last token, which goes in first in the next check."""

    def __init__(self, loaded: LoadedModel, generation: Generation, prefill_step: int,
                 resume: tuple[Any, list[int], int] | None = None) -> None:
        speculation = generation.prepared.speculation
        assert speculation is not None  # run_alone only speculates what asked to
        super().__init__(loaded, generation, prefill_step, resume)
        self.tokens: list[int] = []  # filled once the prompt is in
        self._length = DraftLength(speculation.num_draft_tokens)
        if generation.drafter is None:
            generation.drafter = _drafter_for(generation, speculation)
        self._drafter: Drafter = generation.drafter
        if generation.drafted_tokens is None:
            generation.drafted_tokens = 0

    def _decode(self) -> bool:
        """Once the prompt is in: the drafter catches up (a chunk a step), then guess and check."""
        if not self.tokens:
            self.tokens = [*self.history, self._last_prompt_token]
        if not self._drafter.catch_up(self.tokens, self._prefill_step):
            return False
        self.generation.on_prompt_done()
        return self._guess_and_check()

    def _guess_and_check(self) -> bool:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import trim_prompt_cache

        generation = self.generation
        first_step = generation.completion_tokens
        count = min(self._length.tokens, generation.max_tokens - first_step - 1)
        with mx.stream(generation_stream):
            proposed = (self._drafter.propose(self.tokens, count, first_step, generation.sampler,
                                              generation.sampling_processors) if count > 0 else [])
            guesses = mx.array(proposed, dtype=mx.uint32) if isinstance(proposed, list) else proposed
            drafted = int(guesses.shape[0])
            pending = mx.array(self.tokens[-1:], dtype=mx.uint32)
            checked = mx.concatenate([pending, guesses]) if drafted else pending
            logits = self.loaded.model(checked[None], cache=self.cache)[0]
            guessed, drawn = self._check(logits, guesses, drafted, first_step)
        accepted = 0
        while accepted < drafted and drawn[accepted] == guessed[accepted]:
            accepted += 1
        trim_prompt_cache(self.cache, drafted - accepted)
        self._drafter.accept(len(self.tokens), drafted, accepted)
        self._length.update(drafted, accepted)
        generation.drafted_tokens = (generation.drafted_tokens or 0) + drafted
        generation.accepted_tokens += accepted
        return self._emit([*guessed[:accepted], drawn[accepted]], accepted)

    def _check(self, logits: mx.array, guesses: mx.array, drafted: int, first_step: int) -> tuple[list[int], list[int]]:
        """(the guesses, the target's own token at each position up to the first that differs)."""
        import mlx.core as mx

        generation = self.generation
        sampler = generation.sampler
        if not generation.logits_processors:  # every position at once, in one evaluation
            rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if isinstance(sampler, KeyedSampler):
                drawn = mx.concatenate([sampler.draw_at(rows[i: i + 1], first_step + i) for i in range(drafted + 1)])
            else:  # greedy: no key, one argmax over every row
                drawn = sampler(rows)
            mx.eval(drawn, guesses)
            return _token_ids(guesses), _token_ids(drawn)
        guessed = _token_ids(guesses)  # evaluated here: the processors must see them
        sequence = mx.array(self.tokens, dtype=mx.uint32)
        own: list[int] = []
        for i in range(drafted + 1):
            seen = mx.concatenate([sequence, mx.array(guessed[:i], dtype=mx.uint32)]) if i else sequence
            row = logits[i: i + 1]
            for process in generation.logits_processors:
                row = process(seen, row)
            own.extend(_token_ids(draw_at(sampler, row - mx.logsumexp(row, axis=-1, keepdims=True), first_step + i)))
            if i == drafted or own[i] != guessed[i]:
                break
        return guessed, own

    def _emit(self, emitted: list[int], accepted: int) -> bool:
        """Route the round's tokens; a generation that ends partway gives the cache back the
        tokens after its end, so the cache holds exactly `tokens` but the last."""
        from mlx_lm.models.cache import trim_prompt_cache

        generation = self.generation
        eos_ids = self.loaded.tokenizer.eos_token_ids
        for index, token in enumerate(emitted):
            self.tokens.append(token)
            last = generation.completion_tokens + 1 >= generation.max_tokens
            generation.on_token(token, "stop" if token in eos_ids else ("length" if last else None))
            if generation.done:
                trim_prompt_cache(self.cache, accepted - index)
                return True
        return False

    def close(self, keep: bool = True) -> None:
        tokens = self.tokens or [*self.history, self._last_prompt_token]
        in_cache = tokens[:-1] if self.tokens else self.history
        self._drafter.close(in_cache)
        self.generation.drafter = None
        if keep:
            keep_prefix(self.loaded, in_cache, self.cache)

    def hand_over(self) -> tuple[list[int], Any, list[int]]:
        """Into a batch: the next token to feed, the cache and what is in it; the drafter stays
        with the generation, for when it is alone again. Nothing was drawn ahead here: the
        next draw is the next output position's."""
        if not self.tokens:
            return [*self._to_prefill, self._last_prompt_token], self.cache, self.history
        rewind_to = getattr(self.generation.sampler, "seek", None)
        if rewind_to is not None:
            rewind_to(self.generation.completion_tokens)
        return self.tokens[-1:], self.cache, self.tokens[:-1]


def check_draft(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft model must speak the target's vocabulary: its guesses are the target's token ids."""
    sizes = (target.vocab_size, draft.vocab_size)
    if draft.embedder is not None or sizes[0] != sizes[1]:
        what = "is an embedding model" if draft.embedder is not None else f"has {sizes[1]} tokens, {target.name} {sizes[0]}"
        raise InvalidParams(f"Model {draft.name} cannot draft for {target.name}: it {what}",
                            errors=[{"path": "/draftModel", "message": "not the target's vocabulary"}],
                            model=target.name, draftModel=draft.name)


def _token_ids(tokens: mx.array) -> list[int]:
    ids: list[int] = tokens.reshape(-1).tolist()  # type: ignore[assignment]  # a 1-D array: a list of ints
    return ids


def run_alone(loaded: LoadedModel, generation: Generation, prefill_step: int, trims: bool) -> SoloRun:
    """A generation alone on its model: speculative when it asked to draft, its KV cache is
    plain and can step back (`trims`), and so can its draft model's; else a `SoloRun`."""
    speculation = generation.prepared.speculation
    if speculation is None or not trims or not generation.plain_kv or loaded.sharded:
        return SoloRun(loaded, generation, prefill_step)
    if speculation.draft is not None and not _trims(speculation.draft):
        log.info("request %r: draft model %s has a cache that cannot step back; decoding without it",
                 generation.request.request_id, speculation.draft.name)
        return SoloRun(loaded, generation, prefill_step)
    return SpeculativeRun(loaded, generation, prefill_step)


def _trims(loaded: LoadedModel) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    return bool(can_trim_prompt_cache(make_prompt_cache(loaded.model)))

"""Prompts prefilled together only when they are of a size (engine/prefill_groups.py), on the
demo model: which waiting prompts join a pass, that nothing overtakes a prompt that waits, the
rows the passes cost against mlx-lm's own BatchGenerator, and the same greedy tokens."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from sidecar.engine.prefill_groups import MAX_WAIT_PASSES, EvenPrefillBatchGenerator
from sidecar.engine.registry import LoadedModel

STEP = 64  # prefill chunk: a 200-token prompt takes 4 passes


class CountingModel:
    """The real model, counting its calls (each reads all the weights) and the rows of every
    prompt pass (batch x tokens, padding included)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls = 0
        self.prompt_rows = 0
        self.prompt_passes = 0

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> Any:
        self.calls += 1
        if inputs.shape[1] > 1:
            self.prompt_rows += inputs.shape[0] * inputs.shape[1]
            self.prompt_passes += 1
        return self._model(inputs, cache=cache, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def tokens(demo: LoadedModel, n: int, seed: int) -> list[int]:
    """A prompt of n tokens (ids from the demo vocabulary, deterministic)."""
    vocab = demo.tokenizer.vocab_size
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(n)]


def generate_all(cls: type[BatchGenerator], demo: LoadedModel,
                 prompts: list[list[int]]) -> tuple[dict[int, list[int]], CountingModel]:
    model = CountingModel(demo.model)
    batch = cls(model, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=STEP)
    uids = batch.insert(prompts, max_tokens=[12] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    for _ in range(500):
        _, responses = batch.next()
        for response in responses:
            out[response.uid].append(response.token)
        if all(len(t) == 12 for t in out.values()):
            batch.close()
            return {uids.index(uid): t for uid, t in out.items()}, model
    raise AssertionError("the batch did not finish")


def test_a_waiting_prompt_joins_a_pass_only_within_twice_the_others_and_none_overtakes(demo: LoadedModel) -> None:
    batch = EvenPrefillBatchGenerator(demo.model, prefill_batch_size=8, prefill_step_size=STEP)
    short, long = tokens(demo, 20, 1), tokens(demo, 200, 2)
    batch.insert([short, tokens(demo, 30, 3), long, tokens(demo, 25, 4)], max_tokens=[4] * 4)
    assert batch._fitting(8) == 2  # 20 and 30 tokens pass together; the long one (a 64-token chunk) waits
    assert batch._fitting(1) == 1  # never more than the slots
    batch.close()

    batch = EvenPrefillBatchGenerator(demo.model, prefill_batch_size=8, prefill_step_size=STEP)
    batch.insert([long, short, tokens(demo, 200, 5)], max_tokens=[4] * 3)
    assert batch._fitting(8) == 1  # the long one leads; the short one waits, and the long one behind it too
    batch.close()


def test_a_short_prompt_behind_a_long_prefill_waits_a_few_passes_not_the_whole_prompt(
        demo: LoadedModel) -> None:
    batch = EvenPrefillBatchGenerator(demo.model, prefill_batch_size=8, prefill_step_size=16)
    (long,) = batch.insert([tokens(demo, 300, 6)], max_tokens=[2])  # 19 passes of 16 tokens
    batch.next()
    (short,) = batch.insert([tokens(demo, 6, 7)], max_tokens=[2])
    joined_at = long_done_at = None
    for turn in range(1, 40):
        prompt_responses, _ = batch.next()
        for response in prompt_responses:
            if response.uid == short and joined_at is None:
                joined_at = turn
            if response.uid == long and response.end_of_prompt:
                long_done_at = turn
        if long_done_at is not None:
            break
    batch.close()
    assert joined_at is not None and long_done_at is not None
    assert 1 < joined_at <= MAX_WAIT_PASSES + 1 < long_done_at  # kept out at first, then in, padded


def test_mixed_prompts_cost_fewer_rows_and_give_the_same_tokens_as_mlx_lms_batch(demo: LoadedModel) -> None:
    prompts = [tokens(demo, 180, 10)] + [tokens(demo, 12 + i, 11 + i) for i in range(6)]
    plain, plain_model = generate_all(BatchGenerator, demo, prompts)
    even, even_model = generate_all(EvenPrefillBatchGenerator, demo, prompts)
    assert even == plain
    useful = sum(len(p) - 1 for p in prompts)  # the last token of each goes to decoding
    assert even_model.prompt_rows <= 1.5 * useful
    assert plain_model.prompt_rows >= 2 * even_model.prompt_rows

"""A prompt's first decoding step taken inside the batch's step (engine/first_step.py), on the
demo model, against mlx-lm's own BatchGenerator: no model call of its own per admission, the
first token at the same step, and the same tokens, greedy and seeded, penalties and stop
tokens included."""

from __future__ import annotations

from mlx_lm.generate import BatchGenerator

from sidecar.engine.first_step import FirstStepInTheBatch
from sidecar.engine.registry import LoadedModel
from sidecar.engine.sampling import SamplingParams, make_logits_processors, make_sampler

from .test_prefill_groups import CountingModel, tokens

STEP = 64


def first_token_step(cls: type[BatchGenerator], demo: LoadedModel) -> tuple[int, int]:
    """A prompt joins a batch that is decoding another: the `next()` call that brings its
    first token, and the model calls made from its insertion to then."""
    model = CountingModel(demo.model)
    batch = cls(model, prefill_step_size=STEP)
    batch.insert([tokens(demo, 20, 1)], max_tokens=[40])
    while not batch.next()[1]:
        pass
    (uid,) = batch.insert([tokens(demo, 40, 2)], max_tokens=[4])
    calls = model.calls
    for turn in range(1, 10):
        _, generated = batch.next()
        if any(r.uid == uid for r in generated):
            batch.close()
            return turn, model.calls - calls
    raise AssertionError("no token in 9 steps")


def test_a_new_prompt_gets_its_first_token_at_mlx_lms_step_with_one_model_call_fewer(demo: LoadedModel) -> None:
    plain_turn, plain_calls = first_token_step(BatchGenerator, demo)
    turn, calls = first_token_step(FirstStepInTheBatch, demo)
    # mlx-lm: step + prefill; step + the last token alone; step (the first token out)
    assert (plain_turn, plain_calls) == (3, 5)
    # here: step + prefill; step (the last token in it); step (the first token out)
    assert (turn, calls) == (3, 4)


def run_staggered(cls: type[BatchGenerator], demo: LoadedModel, params: list[SamplingParams],
                  prompts: list[list[int]], stop: list[list[int]]) -> tuple[dict[int, list[int]], int]:
    """Prompts that arrive one per step while the earlier ones decode, each with its own
    sampler, processors and stop tokens; every request's tokens, and the model calls made."""
    model = CountingModel(demo.model)
    batch = cls(model, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=STEP,
                stop_tokens=stop)
    out: dict[int, list[int]] = {}
    order: list[int] = []
    finished: set[int] = set()
    for turn in range(200):
        if turn < len(prompts):
            sampling = params[turn]
            (uid,) = batch.insert([prompts[turn]], max_tokens=[1 + 3 * turn],
                                  samplers=[make_sampler(sampling, demo.tokenizer.vocab_size, draw_seed=turn)],
                                  logits_processors=[make_logits_processors(sampling)])
            out[uid] = []
            order.append(uid)
        _, generated = batch.next()
        for response in generated:
            out[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
        if len(finished) == len(prompts):
            batch.close()
            return {order.index(uid): t for uid, t in out.items()}, model.calls
    raise AssertionError("the batch did not finish")


def test_staggered_admissions_give_mlx_lms_tokens_greedy_and_seeded_with_fewer_calls(demo: LoadedModel) -> None:
    prompts = [tokens(demo, 30 + 7 * i, 20 + i) for i in range(5)] + [tokens(demo, 100, 30)]  # the last: 2 passes
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=7),
              SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.7, top_p=0.9, seed=11, presence_penalty=0.5),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3)]
    # a stop token that a prompt ends with must not stop it: only output tokens count
    stop = [[prompts[2][-1]], [prompts[4][-1]]]
    plain, plain_calls = run_staggered(BatchGenerator, demo, params, prompts, stop)
    ours, calls = run_staggered(FirstStepInTheBatch, demo, params, prompts, stop)
    assert ours == plain
    assert len(ours[0]) == 1  # max_tokens 1: one token, then done
    assert calls <= plain_calls - len(prompts) + 1  # the first prompt finds an idle batch

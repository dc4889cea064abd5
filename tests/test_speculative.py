"""Speculative decoding: a generation alone on its model drafts (with a draft model, or from its
own n-grams) and gives exactly the tokens it gives without drafting — greedy and seeded, with
penalties and token masks, moving into a batch and back out of it.

In process, lanes are stepped by hand as the scheduler steps them; then through the real
sidecar, over the protocol. The draft/target pair is built so that both give the same logits
(the target is the draft plus layers that add nothing), so every guess is accepted; the demo
model (random weights, which loop) gives prompt lookup guesses that are sometimes right.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.engine.generation import Generation, GenerationRequest, prepare
from sidecar.engine.jobs import CancelReason, Job
from sidecar.engine.lanes import BatchLane, SoloLane
from sidecar.engine.registry import LoadedModel, ModelOptions, ModelRegistry
from sidecar.engine.sampling import SamplingParams
from sidecar.engine.speculation import PromptLookupDrafter, Speculation
from sidecar.hub import ModelLocator
from sidecar.settings import Settings
from tests import families
from tests.conftest import Sidecars
from tests.speculative_models import build_speculative_pair, pair_names
from tests.test_lanes import run

DRAFT, TARGET = pair_names("tiny")
LOOPING = "The sea and the mountains were old friends, and every morning they " * 3


@pytest.fixture(scope="module")
def pair_dir(models_dir: Path) -> Path:
    build_speculative_pair(models_dir, size="tiny")
    return models_dir


def load(models_dir: Path, name: str) -> LoadedModel:
    settings = Settings(models_dir=models_dir, prefix_cache=False)
    location = ModelLocator(settings).resolve(name)
    return ModelRegistry(settings).load(location, location.path, ModelOptions(), lambda *_, **__: None)


@pytest.fixture(scope="module")
def demo(models_dir: Path) -> LoadedModel:
    return load(models_dir, "demo")


@pytest.fixture(scope="module")
def target(pair_dir: Path) -> LoadedModel:
    return load(pair_dir, TARGET)


@pytest.fixture(scope="module")
def draft(pair_dir: Path) -> LoadedModel:
    return load(pair_dir, DRAFT)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def generation(loaded: LoadedModel, loop: asyncio.AbstractEventLoop, prompt: str, *,
               speculation: Speculation | None, max_tokens: int = 48, sampling: SamplingParams | None = None,
               response_format: dict[str, Any] | None = None, stop: list[str] | None = None) -> Generation:
    request = GenerationRequest(prompt, time.perf_counter(), None, prompt, max_tokens,
                                sampling or SamplingParams(temperature=0.0), stop or [], stream=False,
                                response_format=response_format)
    prepared = prepare(loaded, request)
    prepared.speculation = speculation
    return Generation(Job("generate", loop, model=loaded.name), loaded, prepared, None)


def alone(loaded: LoadedModel, g: Generation, lane_kind: type[BatchLane] | type[SoloLane] = BatchLane) -> Generation:
    lane = lane_kind(loaded, 4, 512)
    lane.admit(g)
    run(lane, [g])
    lane.close()
    return g


def tokens_of(g: Generation) -> tuple[str, int, str | None]:
    result = g.result()
    return result.text or "", result.completion_tokens, result.finish_reason


SAMPLINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "seeded": SamplingParams(temperature=0.9, seed=1234),
    "seeded top-p": SamplingParams(temperature=1.2, top_p=0.9, seed=99),
    "penalties": SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                                frequency_penalty=0.2, logit_bias={7: 3.0}),
}


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_a_draft_model_gives_the_tokens_of_decoding_without_it(
        target: LoadedModel, draft: LoadedModel, loop: asyncio.AbstractEventLoop, sampling: SamplingParams) -> None:
    plain = alone(target, generation(target, loop, LOOPING, speculation=None, sampling=sampling))
    drafted = alone(target, generation(target, loop, LOOPING, speculation=Speculation(draft, None), sampling=sampling))
    assert tokens_of(drafted) == tokens_of(plain)
    timings = drafted.result().timings
    assert "draftedTokens" not in plain.result().timings
    assert timings["draftedTokens"] > 0
    # The pair gives identical logits: every guess drawn with its position's key is the target's.
    assert timings["acceptedTokens"] == timings["draftedTokens"]


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_prompt_lookup_gives_the_tokens_of_decoding_without_it(
        demo: LoadedModel, loop: asyncio.AbstractEventLoop, sampling: SamplingParams) -> None:
    plain = alone(demo, generation(demo, loop, LOOPING, speculation=None, sampling=sampling, max_tokens=80))
    looked = alone(demo, generation(demo, loop, LOOPING, speculation=Speculation(None, None), sampling=sampling,
                                    max_tokens=80))
    assert tokens_of(looked) == tokens_of(plain)
    assert looked.result().timings["draftedTokens"] >= looked.result().timings["acceptedTokens"] >= 0


def test_greedy_prompt_lookup_on_a_looping_model_accepts_guesses(demo: LoadedModel, loop: asyncio.AbstractEventLoop) -> None:
    looked = alone(demo, generation(demo, loop, LOOPING, speculation=Speculation(None, 4), max_tokens=80))
    timings = looked.result().timings
    assert timings["acceptedTokens"] > 0, timings


def test_a_token_mask_holds_while_drafting(target: LoadedModel, draft: LoadedModel,
                                          loop: asyncio.AbstractEventLoop) -> None:
    """Guesses outside the grammar are rejected by the mask; the output is the masked output."""
    response_format = {"type": "json_schema", "schema": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}}
    plain = alone(target, generation(target, loop, "Give me JSON:", speculation=None, max_tokens=60,
                                     response_format=response_format))
    drafted = alone(target, generation(target, loop, "Give me JSON:", speculation=Speculation(draft, 4),
                                       max_tokens=60, response_format=response_format))
    assert tokens_of(drafted) == tokens_of(plain)
    assert drafted.result().timings["draftedTokens"] > 0


def test_a_stop_string_ends_a_drafting_generation_where_it_ends_one_without(
        target: LoadedModel, draft: LoadedModel, loop: asyncio.AbstractEventLoop) -> None:
    plain = alone(target, generation(target, loop, LOOPING, speculation=None, max_tokens=60))
    text = plain.result().text or ""
    stop = text[len(text) // 2:][:3]  # somewhere in the middle, likely inside a guessed run
    assert stop
    ends: list[tuple[str, int, str | None]] = []
    for speculation in (None, Speculation(draft, 8), Speculation(None, 8)):
        g = generation(target, loop, LOOPING, speculation=speculation, max_tokens=60, stop=[stop])
        ends.append(tokens_of(alone(target, g)))
    assert ends[0][2] == "stop_sequence" and ends[1] == ends[0] and ends[2] == ends[0]


def test_the_last_guesses_never_pass_max_tokens(target: LoadedModel, draft: LoadedModel,
                                                loop: asyncio.AbstractEventLoop) -> None:
    for limit in (1, 2, 5, 9):
        drafted = alone(target, generation(target, loop, LOOPING, speculation=Speculation(draft, 8), max_tokens=limit))
        plain = alone(target, generation(target, loop, LOOPING, speculation=None, max_tokens=limit))
        assert tokens_of(drafted) == tokens_of(plain)
        assert drafted.completion_tokens == limit


def test_a_solo_lane_drafts_too(target: LoadedModel, draft: LoadedModel, loop: asyncio.AbstractEventLoop) -> None:
    plain = alone(target, generation(target, loop, LOOPING, speculation=None), SoloLane)
    drafted = alone(target, generation(target, loop, LOOPING, speculation=Speculation(draft, None)), SoloLane)
    assert tokens_of(drafted) == tokens_of(plain)
    assert drafted.result().timings["draftedTokens"] > 0


@pytest.mark.parametrize("sampling", [SAMPLINGS["greedy"], SAMPLINGS["seeded"]], ids=["greedy", "seeded"])
def test_a_drafting_generation_moves_into_the_batch_and_back_with_the_same_tokens(
        target: LoadedModel, draft: LoadedModel, loop: asyncio.AbstractEventLoop, sampling: SamplingParams) -> None:
    prompts = [LOOPING, "Tell me about the wind", "A story of the old harbour"]
    expected = [tokens_of(alone(target, generation(target, loop, p, speculation=None, sampling=sampling, max_tokens=64)))
                for p in prompts]
    lane = BatchLane(target, 4, 512)
    first = generation(target, loop, prompts[0], speculation=Speculation(draft, 3), sampling=sampling, max_tokens=64)
    lane.admit(first)
    for _ in range(3):
        lane.step()
    assert 0 < first.completion_tokens < 64
    company = [generation(target, loop, p, speculation=None, sampling=sampling, max_tokens=16) for p in prompts[1:]]
    for other in company:
        lane.admit(other)  # the drafting one moves into the batch
    run(lane, company)
    drafted_in_batch = first.drafted_tokens
    run(lane, [first])  # alone again: it drafts again
    lane.close()
    assert tokens_of(first) == expected[0]
    assert [tokens_of(g)[0] for g in company] == [
        tokens_of(alone(target, generation(target, loop, p, speculation=None, sampling=sampling, max_tokens=16)))[0]
        for p in prompts[1:]]
    assert first.drafted_tokens is not None and drafted_in_batch is not None
    assert first.drafted_tokens > drafted_in_batch


def test_a_cancel_stops_a_drafting_generation_at_its_next_round(
        target: LoadedModel, draft: LoadedModel, loop: asyncio.AbstractEventLoop) -> None:
    lane = BatchLane(target, 4, 512)
    g = generation(target, loop, LOOPING, speculation=Speculation(draft, 4), max_tokens=200)
    lane.admit(g)
    for _ in range(4):
        lane.step()
    made = g.completion_tokens
    g.job.cancel_reason = CancelReason.CLIENT
    assert lane.step() == [g]
    assert g.finish_reason == "cancelled" and g.completion_tokens == made
    lane.close()


def test_prompt_lookup_guesses_what_followed_the_last_occurrence_of_the_longest_suffix() -> None:
    drafter = PromptLookupDrafter()
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 1, 2, 3, 4]
    assert drafter.propose(tokens, 3, 0, None, []) == [5, 9, 2]  # "1 2 3 4" beats the later "2 3 4"
    assert PromptLookupDrafter().propose(tokens[1:], 3, 0, None, []) == [6, 7, 1]  # the latest "2 3 4"
    assert drafter.propose([*tokens, 6, 8], 3, 0, None, []) == []  # "4 6 8", "6 8" never seen before
    assert PromptLookupDrafter().propose([5, 5], 4, 0, None, []) == []  # nothing before the suffix
    assert PromptLookupDrafter().propose([1, 2, 1, 2], 4, 0, None, []) == [1, 2]  # only what exists


# ---- over the protocol ---------------------------------------------------------------------------


def chat(client: Any, model: str, **params: Any) -> dict[str, Any]:
    return client.request("generate", {"model": model, "prompt": LOOPING, "maxTokens": 40, "temperature": 0, "cache": False,
                                       **params})


def test_over_the_protocol_a_draft_model_is_loaded_counted_and_unloaded_with_its_target(
        sidecars: Sidecars, pair_dir: Path) -> None:
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(pair_dir), LOCALMLX_DRAFT_MODELS=f"{TARGET}={DRAFT}")
    plain = chat(client, TARGET, draftModel=None)
    drafted = chat(client, TARGET)
    assert drafted["text"] == plain["text"]
    assert drafted["usage"]["completionTokens"] == plain["usage"]["completionTokens"]
    assert drafted["usage"]["cachedTokens"] > 0  # the prefix cache serves a drafting request too
    assert "draftedTokens" not in plain["timings"]
    assert drafted["timings"]["acceptedTokens"] == drafted["timings"]["draftedTokens"] > 0
    status = client.request("server/status")
    loaded = {m["model"]: m for m in status["models"]}
    assert set(loaded) == {TARGET, DRAFT}
    assert loaded[TARGET]["draftModel"] == DRAFT
    assert status["memory"]["modelBytes"] == loaded[TARGET]["bytes"] + loaded[DRAFT]["bytes"]
    assert client.request("models/unload", {"model": TARGET})["unloaded"] is True
    assert client.request("server/status")["models"] == []


def test_over_the_protocol_prompt_lookup_is_a_request_option_and_a_model_default(
        sidecars: Sidecars, models_dir: Path) -> None:
    client = sidecars.spawn()
    plain = chat(client, "demo")
    looked = chat(client, "demo", promptLookup=True, numDraftTokens=4)
    assert looked["text"] == plain["text"] and looked["timings"]["draftedTokens"] > 0
    loaded = client.request("models/load", {"model": "demo", "promptLookup": True})
    assert loaded["promptLookup"] is True and loaded["draftModel"] is None
    assert chat(client, "demo")["timings"]["draftedTokens"] > 0
    assert "draftedTokens" not in chat(client, "demo", promptLookup=False)["timings"]


def test_over_the_protocol_a_draft_with_another_vocabulary_is_refused(sidecars: Sidecars, pair_dir: Path) -> None:
    other = families.build(pair_dir, next(f for f in families.FAMILIES if f.name == "llama3"), "bf16")
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(pair_dir))
    response = client.call("generate", {"model": TARGET, "prompt": "hi", "maxTokens": 4, "draftModel": other.name})
    error = response["error"]
    assert error["code"] == -32602 and "cannot draft" in error["message"] and "1088" in error["message"], error
    own = client.call("generate", {"model": TARGET, "prompt": "hi", "maxTokens": 4, "draftModel": TARGET})["error"]
    assert own["code"] == -32602
    assert chat(client, TARGET)["finishReason"] in ("length", "stop")  # still serving

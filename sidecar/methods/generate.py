"""generate (raw prompt), chat (messages through the chat template), tokenize."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from ..engine import CancelReason, GenerationRequest, GenerationResult
from ..engine.generation import GenerationOrder
from ..engine.response_cache import CachedResponse
from ..engine.sampling import SamplingParams
from ..errors import RpcError, ServerCancelled
from ..inflight import InFlightRequest
from ..profiles.apply import ProfileSetup
from ..profiles.service import AUTO
from ..protocol_defs import (
    BUSY,
    CONTEXT_LENGTH_EXCEEDED,
    FORBIDDEN,
    GENERATION_DEFAULTS,
    INVALID_PARAMS,
    MESSAGE_TOO_LARGE,
    MODEL_NOT_FOUND,
)
from ..settings import parse_duration
from .table import rpc_method


def _sampling(context: InFlightRequest, params: dict[str, Any]) -> SamplingParams:
    bias = params.get("logitBias")
    params = {**GENERATION_DEFAULTS, **params}
    return SamplingParams(
        temperature=params.get("temperature", context.settings.temperature),
        top_p=params["topP"], top_k=params["topK"], min_p=params["minP"],
        seed=params.get("seed"), repetition_penalty=params["repetitionPenalty"],
        presence_penalty=params["presencePenalty"], frequency_penalty=params["frequencyPenalty"],
        logit_bias={int(token): float(value) for token, value in bias.items()} if bias else None,
        repetition_context_size=params["repetitionContextSize"])


def _generation_request(context: InFlightRequest, params: dict[str, Any], setup: ProfileSetup) -> GenerationRequest:
    keep_alive = params.get("keepAlive")
    messages, prompt = params.get("messages"), params.get("prompt")
    return GenerationRequest(
        request_id=context.id, received_at=context.received_at, messages=messages, prompt=prompt,
        max_tokens=params.get("maxTokens", context.settings.max_tokens), sampling=_sampling(context, params),
        stop=list(params.get("stop", GENERATION_DEFAULTS["stop"])),
        stream=bool(params.get("stream", GENERATION_DEFAULTS["stream"])),
        use_response_cache=params.get("cache", GENERATION_DEFAULTS["cache"]),
        keep_alive=None if keep_alive is None else parse_duration(keep_alive),
        kv_bits=params.get("kvBits"), max_kv_size=params.get("maxKvSize"),
        response_format=params.get("responseFormat"),
        tools=params.get("tools"), tool_choice=params.get("toolChoice"),
        thinking=params.get("thinking"), thinking_budget=params.get("thinkingBudget"),
        progress=context.progress, draft_model=params.get("draftModel"),
        no_draft="draftModel" in params and params["draftModel"] is None,
        num_draft_tokens=params.get("numDraftTokens"), prompt_lookup=params.get("promptLookup"), **setup.extras)


def _replay(context: InFlightRequest, model: str, request: GenerationRequest, hit: CachedResponse) -> GenerationResult:
    """An exact-cache hit, delivered the way a generation is: the same chunks, then the result."""
    if request.stream:
        stream = context.open_stream()
        for piece in hit.pieces:
            stream.write_whole(piece)
    now = time.perf_counter()
    ms = round((now - request.received_at) * 1000, 3)
    timings = {"ttftMs": ms, "queueMs": 0.0, "promptMs": 0.0, "promptTokensPerSecond": 0.0,
               "generateMs": 0.0, "tokensPerSecond": 0.0, "totalMs": ms, "peakMemoryBytes": 0}
    return GenerationResult(model, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens,
                            cached_tokens=hit.prompt_tokens, timings=timings,
                            text=None if request.stream else "".join(hit.pieces), cached=True)


# Errors that say the request was wrong, not that the profile serving it failed.
_CLIENTS_OWN = frozenset({INVALID_PARAMS, CONTEXT_LENGTH_EXCEEDED, FORBIDDEN, MODEL_NOT_FOUND, BUSY, MESSAGE_TOO_LARGE})


async def _through_profiles(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    """chat and generate: through the profile the model names (or that "auto" chooses), whose
    outcome is measured for routing."""
    engine = context.engine
    profiles = engine.profiles
    if params.get("model") == AUTO:
        params, setup = await profiles.route(engine, params)
    else:
        params, setup = profiles.setup_for(params)
    try:
        result = await _run_generation(context, params, _generation_request(context, params, setup), setup)
    except RpcError as error:
        if error.code not in _CLIENTS_OWN:
            await profiles.record(setup, params, None, failed=True)
        raise
    await profiles.record(setup, params, result)
    if setup.profile is not None:
        result["profile"] = setup.profile.name
        if setup.routed_by is not None:
            result["routedBy"] = setup.routed_by
    return result


async def _run_generation(context: InFlightRequest, params: dict[str, Any],
                          request: GenerationRequest, setup: ProfileSetup) -> dict[str, Any]:
    """A cancel stops it at its next step, and it answers with what it generated so far."""
    engine = context.engine
    location = await engine.profiles.location(engine, params.get("model"), setup.adapter)
    context.model = location.name
    await engine.read_images(request)
    with contextlib.ExitStack() as holds:
        holds.enter_context(engine.holding(location.name))
        loaded = await engine.ensure_loaded(location, context.progress)
        hit = engine.cached_response(loaded, request)
        if hit is not None:
            return _replay(context, loaded.name, request, hit).to_wire()
        prepared = await engine.prepare(loaded, request)
        prepared.speculation = await engine.speculation_for(loaded, request, context.progress)
        if prepared.speculation is not None and prepared.speculation.draft is not None:
            holds.enter_context(engine.holding(prepared.speculation.draft.name))
        stream = context.open_stream() if request.stream else None
        job = engine.submit_generation(GenerationOrder(prepared, stream), loaded.name)
        result: GenerationResult = await context.outcome_of(job, engine.cancel)
    if result.cancel_reason not in (None, CancelReason.CLIENT):
        raise ServerCancelled(f"Generation cancelled by the server ({result.cancel_reason.value})",
                              reason=result.cancel_reason.value, usage=result.usage)
    return result.to_wire()


def _cancelled_before_the_engine(context: InFlightRequest, reason: CancelReason) -> dict[str, Any]:
    """A generation its client cancelled before the engine had it: finishReason cancelled,
    no tokens, as when the engine has it; one the server cancelled is -32802."""
    if reason is not CancelReason.CLIENT:
        raise reason.error()
    params = context.params if isinstance(context.params, dict) else {}
    model = context.model or params.get("model") or context.engine.default_model()
    return GenerationResult.cancelled_before_start(str(model), context.received_at, bool(params.get("stream")),
                                                   reason).to_wire()


@rpc_method("generate", when_cancelled=_cancelled_before_the_engine)
async def generate(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    return await _through_profiles(context, params)


@rpc_method("chat", when_cancelled=_cancelled_before_the_engine)
async def chat(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    return await _through_profiles(context, params)


@rpc_method("tokenize")
async def tokenize(context: InFlightRequest, params: dict[str, Any]) -> dict[str, Any]:
    engine = context.engine
    location, _ = await engine.resolve_named(params.get("model"))
    with engine.holding(location.name):
        loaded = await engine.ensure_loaded(location)
        tokens = await engine.tokenize(loaded, params["text"], params.get("addSpecialTokens", False))
    return {"model": location.name, "tokens": tokens}

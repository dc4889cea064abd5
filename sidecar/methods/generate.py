"""generate (raw prompt), chat (messages through the chat template), tokenize."""

from __future__ import annotations

import time
from typing import Any

from ..engine.generation import GenerationRequest
from ..errors import RequestCancelled, ServerCancelled
from . import rpc_method
from .models import run_job


def _generation_request(context: Any, params: dict[str, Any], *, messages: Any = None,
                        prompt: str | None = None) -> GenerationRequest:
    defaults = context.settings
    return GenerationRequest(
        request_id=context.id, received_at=context.received_at, messages=messages, prompt=prompt,
        max_tokens=params.get("maxTokens", defaults.max_tokens),
        temperature=params.get("temperature", defaults.temperature),
        top_p=params.get("topP", 0.0), top_k=params.get("topK", 0), min_p=params.get("minP", 0.0),
        repetition_penalty=params.get("repetitionPenalty"), seed=params.get("seed"),
        stop=list(params.get("stop", [])), stream=bool(params.get("stream", False)))


def _cancelled_before_start(model: str, request: GenerationRequest) -> dict[str, Any]:
    elapsed = round((time.perf_counter() - request.received_at) * 1000, 3)
    result: dict[str, Any] = {
        "model": model, "finishReason": "cancelled",
        "usage": {"promptTokens": 0, "completionTokens": 0, "totalTokens": 0, "cachedTokens": 0},
        "timings": {"ttftMs": elapsed, "queueMs": elapsed, "tokensPerSecond": 0.0, "totalMs": elapsed},
    }
    if not request.stream:
        result["text"] = ""
    return result


async def _run_generation(context: Any, params: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
    location = context.engine.resolve(params.get("model"))
    if context.cancel_reason == "client":
        return _cancelled_before_start(location.name, request)
    job = context.engine.submit_generation(location, request, context.progress)
    try:
        result = await run_job(context, job)
    except RequestCancelled:  # withdrawn from the queue by the client
        return _cancelled_before_start(location.name, request)
    if result["finishReason"] == "cancelled" and job.cancel_reason != "client":
        raise ServerCancelled(f"Generation cancelled by the server ({job.cancel_reason})",
                              reason=job.cancel_reason, usage=result["usage"])
    return result


@rpc_method("generate")
async def generate(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    return await _run_generation(context, params, _generation_request(context, params, prompt=params["prompt"]))


@rpc_method("chat")
async def chat(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    return await _run_generation(context, params, _generation_request(context, params, messages=params["messages"]))


@rpc_method("tokenize")
async def tokenize(context: Any, params: dict[str, Any]) -> dict[str, Any]:
    location = context.engine.resolve(params.get("model"))
    job = context.engine.submit_tokenize(location, params["text"], params.get("addSpecialTokens", False))
    return {"model": location.name, "tokens": await run_job(context, job)}

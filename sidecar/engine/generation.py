"""One generation on the engine thread: prompt -> prompt cache -> stream_generate -> chunks.

Stop strings are matched on decoded text and held back while they might still match, so
no part of one ever reaches the client. Cancellation is checked after every token.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ContextLengthExceeded, InvalidParams, OutOfMemory, RpcError

from .memory import MemoryTracker, is_out_of_memory
from .registry import LoadedModel
from .worker import Job


@dataclass
class GenerationRequest:
    request_id: Any
    received_at: float  # perf_counter when the request line was read
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    seed: int | None
    stop: list[str]
    stream: bool


def clean_text(text: str) -> str:
    """Lone surrogates (legal in JSON, not in UTF-8) become U+FFFD before tokenizing."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    if request.messages is not None:
        messages = [{"role": m["role"], "content": clean_text(m["content"])} for m in request.messages]
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidParams("This model has no chat template: use generate with a raw prompt",
                                errors=[{"path": "/messages", "message": "model has no chat template"}])
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    prompt = clean_text(request.prompt or "")
    bos = tokenizer.bos_token
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def _decode_rate(tokens: int, first_at: float, last_at: float) -> float:
    """Tokens after the first over the time after it: the steady decode speed."""
    return round((tokens - 1) / (last_at - first_at), 3) if tokens > 1 and last_at > first_at else 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class ChunkStream:
    """Numbered text chunks for one request: notifications when streaming, else a buffer."""

    def __init__(self, request: GenerationRequest, send: Callable[[dict[str, Any]], None]) -> None:
        self._request = request
        self._send = send
        self._parts: list[str] = []
        self.seq = 0
        self.first_at: float | None = None

    def emit(self, text: str) -> None:
        if not text:
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if self._request.stream:
            self._send({"requestId": self._request.request_id, "seq": self.seq, "text": text})
            self.seq += 1
        else:
            self._parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self._parts)


class StopMatcher:
    """Text-level stop strings on mlx-lm's TextStateMachine: matched strings end the
    generation; possible partial matches are held back until resolved."""

    def __init__(self, stop: list[str]) -> None:
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine
        self._state = TextStateMachine({"normal": [(s, None) for s in stop]}).make_state() if stop else None
        self.matched = False

    def feed(self, text: str) -> str:
        if self._state is None or not text:
            return text
        self._state, safe, state_name = self._machine.step(self._state, text)
        self.matched = state_name is None
        return safe

    def flush(self) -> str:
        if self._state is None or self.matched:
            return ""
        self._state, held, _ = self._machine.flush(self._state)
        return held


def _sampling(request: GenerationRequest, vocab_size: int | None) -> dict[str, Any]:
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    # topK at or above the vocabulary keeps every token: the same as no topK (mlx-lm refuses it).
    top_k = request.top_k if vocab_size is None or request.top_k < vocab_size else 0
    sampler = make_sampler(request.temperature, top_p=request.top_p, min_p=request.min_p, top_k=top_k)
    penalty = request.repetition_penalty
    processors = make_logits_processors(repetition_penalty=penalty) if penalty not in (None, 1.0) else None
    return {"sampler": sampler, "logits_processors": processors}


def _vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def _reset_random_state() -> None:
    """A sampler that fails mid-trace leaves MLX's global random key without a value, and
    every later sampled request would fail on it: give the key a fresh seed."""
    import mlx.core as mx

    mx.random.seed(int.from_bytes(os.urandom(8), "little"))


class _PrefillCancelled(Exception):
    """Raised from mlx-lm's prompt-progress callback: a long prompt stops between chunks."""


class Generator:
    """Runs generations for the engine thread, sharing one prompt cache across requests."""

    def __init__(self, prompt_cache: Any, memory: MemoryTracker) -> None:
        self.prompt_cache = prompt_cache  # mlx_lm LRUPromptCache, or None when disabled
        self.memory = memory

    def run(self, job: Job, loaded: LoadedModel, request: GenerationRequest,
            send_chunk: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        try:
            return self._run(job, loaded, request, send_chunk)
        except RpcError:  # refused before any sampling (context length, empty prompt)
            raise
        except Exception as exc:
            _reset_random_state()
            if is_out_of_memory(exc):
                raise OutOfMemory(f"Out of memory while generating: {exc}", model=loaded.name) from exc
            raise

    def _run(self, job: Job, loaded: LoadedModel, request: GenerationRequest,
             send_chunk: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        import mlx.core as mx
        from mlx_lm import stream_generate

        started = time.perf_counter()
        tokenizer = loaded.tokenizer
        prompt = prompt_tokens(tokenizer, request)
        if not prompt:
            raise InvalidParams("Prompt is empty after tokenization",
                                errors=[{"path": "/prompt", "message": "no tokens"}])
        max_tokens = request.max_tokens
        context = loaded.context_length
        if context is not None:
            if len(prompt) >= context:
                raise ContextLengthExceeded(
                    f"Prompt has {len(prompt)} tokens; the model's context is {context}",
                    promptTokens=len(prompt), contextLength=context)
            max_tokens = min(max_tokens, context - len(prompt))

        cache, rest = self._fetch_cache(loaded, prompt)
        if request.seed is not None:
            mx.random.seed(request.seed)
        self.memory.begin_request()

        chunks = ChunkStream(request, send_chunk)
        stops = StopMatcher(request.stop)
        cache_key = list(prompt)
        finish, last = "length", None
        first_token_at = last_token_at = 0.0

        def stop_prefill_when_cancelled(processed: int, total: int) -> None:
            if job.cancelled:
                raise _PrefillCancelled

        generation = stream_generate(loaded.model, tokenizer, mx.array(rest), max_tokens=max_tokens,
                                     prompt_cache=cache, prompt_progress_callback=stop_prefill_when_cancelled,
                                     **_sampling(request, _vocab_size(loaded.config)))
        try:
            for last in generation:
                last_token_at = time.perf_counter()
                first_token_at = first_token_at or last_token_at
                cache_key.append(last.token)
                chunks.emit(stops.feed(last.text))
                if stops.matched:
                    finish = "stop_sequence"
                    break
                if last.finish_reason is not None:
                    finish = last.finish_reason
                    chunks.emit(stops.flush())
                    break
                if job.cancelled:
                    finish = "cancelled"
                    break
        except _PrefillCancelled:
            finish, cache = "cancelled", None  # a half-filled cache is not worth keeping
        finally:
            generation.close()  # runs mlx-lm's clean-up (wired limit, stream sync)
        ended = time.perf_counter()

        if cache is not None and self.prompt_cache is not None:
            self.prompt_cache.insert_cache(loaded.name, cache_key, cache)

        completion = last.generation_tokens if last is not None else 0
        first_at = chunks.first_at or ended
        result: dict[str, Any] = {
            "model": loaded.name,
            "finishReason": finish,
            "usage": {"promptTokens": len(prompt), "completionTokens": completion,
                      "totalTokens": len(prompt) + completion,
                      "cachedTokens": len(prompt) - len(rest)},
            "timings": {
                "ttftMs": _ms(first_at - request.received_at),
                "queueMs": _ms(started - request.received_at),
                "promptMs": _ms(len(rest) / last.prompt_tps) if last is not None and last.prompt_tps else 0.0,
                "promptTokensPerSecond": round(last.prompt_tps, 3) if last is not None else 0.0,
                "generateMs": _ms(ended - first_at),
                "tokensPerSecond": _decode_rate(completion, first_token_at, last_token_at),
                "totalMs": _ms(ended - request.received_at),
                "peakMemoryBytes": self.memory.request_peak(),
            },
        }
        if not request.stream:
            result["text"] = chunks.text
        return result

    def _fetch_cache(self, loaded: LoadedModel, prompt: list[int]) -> tuple[Any, list[int]]:
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        if self.prompt_cache is None:
            return make_prompt_cache(loaded.model), prompt
        cache, rest = self.prompt_cache.fetch_nearest_cache(loaded.name, prompt)
        if cache is not None and not rest:
            # An exact hit still needs one token to run the model on.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache = None
        if cache is None:
            return make_prompt_cache(loaded.model), prompt
        return cache, rest

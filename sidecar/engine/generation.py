"""One generation, in three parts: prepare (off the engine thread), step (tokens routed to
text on the engine thread), finish (one result, built once).

Stop strings are matched on decoded text and held back while they might still match, so
no part of one ever reaches the client.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ContextLengthExceeded, InvalidParams, brief
from ..hub import Progress
from ..jsonrpc import RequestId
from ..length_bound import fewest_tokens
from ..outbox import ChunkStream
from ..schema import MAX_SCHEMA_VALUES, check_size
from ..text import clean_text
from .channels import ANSWER, REASONING, TOOL, OutputChannels, starts_in_reasoning
from .constraints import Constraint, compile_response_format, compile_tool_call
from .jobs import CancelReason, Job
from .reasoning import ThinkingBudget
from .registry import LoadedModel
from .sampling import SamplingParams, check_logit_bias, make_logits_processors, make_sampler
from .tools import ToolCallReader, check_tool_schemas, forces_a_call, marks_tool_calls, offered_tools, template_message

if TYPE_CHECKING:  # mlx-lm is imported on the engine thread, when used
    from mlx_lm.sample_utils import LogitsProcessor, Sampler

    from ..vision.images import MessageImage
    from ..vision.model import VisionInputs
    from .speculation import Speculation


@dataclass
class GenerationRequest:
    request_id: RequestId
    received_at: float  # perf_counter when the request line was read
    messages: list[dict[str, Any]] | None
    prompt: str | None
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    use_response_cache: bool = True
    keep_alive: float | None = None  # seconds; becomes its model's keep-alive
    kv_bits: int | None = None  # else the model's default
    max_kv_size: int | None = None  # else the model's default
    response_format: dict[str, Any] | None = None  # responseFormat; None or type text: free text
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    thinking: bool | None = None  # None: the template's default
    thinking_budget: int | None = None
    progress: Progress | None = None  # the request's $/progress reporter: prompt processing is reported
    draft_model: str | None = None  # draftModel; None: its model's default draft model
    no_draft: bool = False  # draftModel null: no draft model, whatever its model's default
    num_draft_tokens: int | None = None  # else its model's default, else adaptive
    prompt_lookup: bool | None = None  # None: its model's default
    chat_template: str | None = None  # a profile's template, used instead of the tokenizer's own
    context_length: int | None = None  # a profile's limit on prompt and output, below the model's own
    images: list[MessageImage] = field(default_factory=list)  # its messages' images, read and checked

    @property
    def method(self) -> str:
        return "chat" if self.messages is not None else "generate"


def check_length(loaded: LoadedModel, text: str) -> None:
    """-32016 for a prompt whose length alone shows that it cannot fit the model's context,
    before any of it is tokenized (see length_bound)."""
    context, per_token = loaded.context_length, loaded.bytes_per_token
    if context is None or per_token is None:
        return
    fewest = fewest_tokens(text, per_token)
    if fewest >= context:
        raise ContextLengthExceeded(
            f"Prompt is at least {fewest} tokens, judged by its length ({len(text)} characters); "
            f"the model's context is {context}", promptTokens=fewest, contextLength=context, judgedBy="length")


def prompt_tokens(loaded: LoadedModel, request: GenerationRequest, tools: list[dict[str, Any]]) -> list[int]:
    """The request as token ids: messages through the chat template (with `tools`, those
    offered), or the raw prompt. A text far too long for the context is refused before it
    is tokenized."""
    tokenizer = loaded.tokenizer
    if request.messages is not None:
        return list(tokenizer.encode(rendered_chat(loaded, request, tools), add_special_tokens=False))
    check_length(loaded, request.prompt or "")
    prompt = clean_text(request.prompt or "")
    bos = tokenizer.bos_token
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def rendered_chat(loaded: LoadedModel, request: GenerationRequest, tools: list[dict[str, Any]]) -> str:
    """The messages through the chat template (the profile's, else the model's), as text."""
    tokenizer = loaded.tokenizer
    assert request.messages is not None
    parts = loaded.vision is not None  # a vision template reads content parts; a text one, text
    messages = [template_message(m, clean_text, f"/messages/{i}", parts) for i, m in enumerate(request.messages)]
    if request.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise InvalidParams(f"Model {loaded.name} has no chat template: give it one in a profile (template or "
                            "template_file), or use generate with a raw prompt",
                            errors=[{"path": "/messages", "message": "model has no chat template"}], model=loaded.name)
    options: dict[str, Any] = {}
    if request.chat_template is not None:
        options["chat_template"] = request.chat_template
    if tools:
        options["tools"] = tools
    if request.thinking is not None:
        options["enable_thinking"] = request.thinking
    try:
        text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **options)
    except Exception as exc:  # the template refused these messages (jinja's raise_exception, ...)
        if type(exc).__module__.split(".")[0] != "jinja2":
            raise
        whose = "profile's" if request.chat_template is not None else "model's"
        line = getattr(exc, "lineno", None) or _template_line(exc)
        where = f" (template line {line})" if line else ""
        raise InvalidParams(f"The {whose} chat template failed on these messages{where}: {brief(exc)}",
                            errors=[{"path": "/messages", "message": brief(exc)}], templateLine=line) from None
    check_length(loaded, text)
    return text


def _template_line(exc: BaseException) -> int | None:
    """The template's line a render error happened on: jinja compiles a template to Python
    whose frames carry the template's line numbers (filename <template>)."""
    line = None
    trace = exc.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == "<template>":
            line = trace.tb_lineno
        trace = trace.tb_next
    return line


@dataclass
class PreparedGeneration:
    """Everything about a generation that needs no MLX: done before it reaches the engine."""

    request: GenerationRequest
    prompt: list[int]
    max_tokens: int  # clipped to the context
    tools: list[dict[str, Any]] = field(default_factory=list)  # offered to the model
    reasoning_first: bool = False  # the template opened a think block
    constraint: Constraint | None = None  # the token mask of a structured output or forced call
    # The seed of a sampled request that gave none: drawn here, once, so that every rank of a
    # group (which replays this prepared generation) draws the same tokens.
    draw_seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(8), "little"))
    speculation: Speculation | None = None  # how it drafts when alone on its model (see speculation)
    vision_inputs: VisionInputs | None = None  # a vision model's: token ids, pixel values (see vision.model)

    @property
    def reads_tool_calls(self) -> bool:
        return bool(self.tools)


def prepare(loaded: LoadedModel, request: GenerationRequest) -> PreparedGeneration:
    """Tokenize and check a request against its model (runs on a worker thread)."""
    if request.tools:
        check_tool_schemas(request.tools)
    schema = (request.response_format or {}).get("schema")
    if isinstance(schema, dict):
        check_size(schema, "/responseFormat/schema", levels=0, max_values=MAX_SCHEMA_VALUES)
    tools = offered_tools(request.tools, request.tool_choice) if request.messages is not None else []
    vision_inputs = None
    if loaded.vision is not None:  # the processor tokenizes, expanding each image into its tokens
        text = rendered_chat(loaded, request, tools) if request.messages is not None else clean_text(request.prompt or "")
        vision_inputs = loaded.vision.inputs(loaded.model, text, request.images)
        prompt = vision_inputs.tokens
    else:
        prompt = prompt_tokens(loaded, request, tools)
    if not prompt:
        raise InvalidParams("Prompt is empty after tokenization",
                            errors=[{"path": "/prompt", "message": "no tokens"}])
    check_logit_bias(request.sampling.logit_bias, loaded.vocab_size)
    max_tokens = request.max_tokens
    context = loaded.context_length
    if request.context_length is not None:
        context = request.context_length if context is None else min(context, request.context_length)
    if context is not None:
        if len(prompt) >= context:
            raise ContextLengthExceeded(
                f"Prompt has {len(prompt)} tokens; the model's context is {context}",
                promptTokens=len(prompt), contextLength=context)
        max_tokens = min(max_tokens, context - len(prompt))
    reasoning_first = request.messages is not None and starts_in_reasoning(loaded.tokenizer, prompt)
    reasoning = _reasoning_markers(loaded.tokenizer, request)
    constraint = _tool_call_constraint(loaded, request, tools, reasoning, reasoning_first)
    if constraint is None:
        constraint = compile_response_format(loaded.tokenizer, loaded.vocab_size, request.response_format,
                                             reasoning=reasoning, opened=reasoning_first)
    return PreparedGeneration(request, prompt, max_tokens, tools, reasoning_first, constraint,
                              vision_inputs=vision_inputs)


def _reasoning_markers(tokenizer: Any, request: GenerationRequest) -> tuple[str, str] | None:
    """A chat with a model that reasons (thinking not switched off): a constrained output
    lets the reasoning block come first, and constrains the answer after it."""
    if request.messages is None or request.thinking is False or not getattr(tokenizer, "has_thinking", False):
        return None
    return tokenizer.think_start, tokenizer.think_end


def _tool_call_constraint(loaded: LoadedModel, request: GenerationRequest, tools: list[dict[str, Any]],
                          reasoning: tuple[str, str] | None, reasoning_first: bool) -> Constraint | None:
    """toolChoice "required" or a named tool: the output is made to be one call in the
    model's own format (after the reasoning block, for a model that reasons)."""
    choice = request.tool_choice
    if not tools or not forces_a_call(choice):
        return None
    tokenizer = loaded.tokenizer
    framed = marks_tool_calls(tokenizer)
    parser = tokenizer.tool_parser.__module__.rsplit(".", 1)[-1] if framed else None
    return compile_tool_call(
        tokenizer, loaded.vocab_size, tools, "required" if choice == "required" else choice["function"]["name"],
        start=tokenizer.tool_call_start if framed else None, end=tokenizer.tool_call_end if framed else None,
        parser=parser, reasoning=reasoning, opened=reasoning_first)


@dataclass
class GenerationOrder:
    """What the engine thread is handed: the prepared generation and where its text goes."""

    prepared: PreparedGeneration
    stream: ChunkStream | None  # None: not streamed

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if count > 0 and seconds > 0 else 0.0


@dataclass
class GenerationResult:
    """The one response of a generation; `to_wire` is its protocol shape."""

    model: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: dict[str, float]
    text: str | None = None  # unstreamed requests only
    cached: bool = False  # served from the exact response cache
    cancel_reason: CancelReason | None = None
    reasoning: str | None = None  # unstreamed requests only, when there was some
    tool_calls: list[dict[str, Any]] | None = None  # unstreamed requests only, when there were some
    reasoning_tokens: int | None = None  # models that reason
    image_tokens: int | None = None  # prompt tokens that stand for images (a vision model's prompt)

    def to_wire(self) -> dict[str, Any]:
        result: dict[str, Any] = {"model": self.model, "finishReason": self.finish_reason,
                                  "usage": self.usage, "timings": self.timings}
        if self.text is not None:
            result["text"] = self.text
        if self.reasoning:
            result["reasoning"] = self.reasoning
        if self.tool_calls:
            result["toolCalls"] = self.tool_calls
        if self.cached:
            result["cached"] = True
        return result

    @property
    def usage(self) -> dict[str, int]:
        usage = {"promptTokens": self.prompt_tokens, "completionTokens": self.completion_tokens,
                 "totalTokens": self.prompt_tokens + self.completion_tokens,
                 "cachedTokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            usage["reasoningTokens"] = self.reasoning_tokens
        if self.image_tokens:
            usage["imageTokens"] = self.image_tokens
        return usage

    @classmethod
    def cancelled_before_start(cls, model: str, received_at: float, stream: bool,
                               reason: CancelReason) -> GenerationResult:
        """A generation cancelled before it ran a step: no tokens, all of its time queued."""
        elapsed = _ms(time.perf_counter() - received_at)
        return cls(model, "cancelled", 0, 0, 0,
                   {"ttftMs": elapsed, "queueMs": elapsed, "tokensPerSecond": 0.0, "totalMs": elapsed},
                   text=None if stream else "", cancel_reason=reason)


@dataclass(eq=False)
class Generation:
    """A generation admitted to the engine: routes each sampled token to text, stop strings
    and the client's stream, and keeps the numbers its result reports."""

    job: Job[GenerationResult]
    loaded: LoadedModel
    prepared: PreparedGeneration
    stream: ChunkStream | None  # None: not streamed
    sampler: Sampler = field(init=False)
    logits_processors: list[LogitsProcessor] = field(init=False)
    sampling_processors: list[LogitsProcessor] = field(init=False)
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    parked: tuple[Any, list[int], int] | None = None  # (mlx-lm cache, tokens, last token) while parked
    peak_memory: int = 0
    drafter: Any = None  # a speculative run's drafter, kept while the generation is in a batch
    drafted_tokens: int | None = None  # None: it never decoded speculatively
    accepted_tokens: int = 0
    _parts: list[str] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning_tokens: int = 0
    _recorded: list[str] | None = None
    admitted_at: float = 0.0
    prompt_done_at: float | None = None
    first_text_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    def __post_init__(self) -> None:
        sampling = self.request.sampling
        self.sampler = make_sampler(sampling, self.loaded.vocab_size, self.prepared.draw_seed)
        # Penalties and bias: functions of the sequence alone, so a draft model may apply them too.
        self.sampling_processors = make_logits_processors(sampling)
        self.logits_processors = list(self.sampling_processors)
        tokenizer = self.loaded.tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._channels = OutputChannels(tokenizer, self.request.stop, reasoning=self.request.method == "chat",
                                        tool_calls=self.prepared.reads_tool_calls,
                                        initial=self._first_channel(tokenizer))
        self._tool_calls = (ToolCallReader(tokenizer.tool_parser if marks_tool_calls(tokenizer) else None,
                                           self.prepared.tools) if self.prepared.reads_tool_calls else None)
        if self.prepared.constraint is not None:  # after the others: it sees the logits they made
            self.logits_processors.append(self.prepared.constraint.processor(len(self.prompt)))
        budget = self.request.thinking_budget
        if budget is not None and getattr(tokenizer, "has_thinking", False):
            self.logits_processors.append(
                ThinkingBudget(tokenizer, len(self.prompt), budget, self.prepared.reasoning_first))
        if self.request.use_response_cache and sampling.deterministic and self.loaded.response_cache is not None:
            self._recorded = []

    @property
    def _counts_reasoning(self) -> bool:
        return self.request.method == "chat" and getattr(self.loaded.tokenizer, "has_thinking", False)

    def _first_channel(self, tokenizer: Any) -> str:
        """Where the first text goes: reasoning when the template opened a think block; the
        tool call itself when a call is forced on a model without tool-call markers (its
        whole output is the call, as one JSON object)."""
        if self.prepared.reasoning_first:
            return REASONING
        if self.prepared.reads_tool_calls and forces_a_call(self.request.tool_choice) and not marks_tool_calls(tokenizer):
            return TOOL
        return ANSWER

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request

    @property
    def prompt(self) -> list[int]:
        return self.prepared.prompt

    @property
    def max_tokens(self) -> int:
        return self.prepared.max_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_options(self) -> tuple[int | None, int | None]:
        """(kvBits, maxKvSize) for this request: its own, else its model's; (None, None) is a
        plain KV cache, the only kind that batches and goes into the prefix cache."""
        options = self.loaded.options
        request = self.request
        return (request.kv_bits if request.kv_bits is not None else options.kv_bits,
                request.max_kv_size if request.max_kv_size is not None else options.max_kv_size)

    @property
    def plain_kv(self) -> bool:
        return self.kv_options == (None, None)

    @property
    def drained(self) -> bool:
        """Its client has read the stream down: a parked generation may go on."""
        return self.stream is None or self.stream.drained

    @property
    def throttled(self) -> bool:
        """The client has not read this stream down: generating more would only buffer it.
        Never on a sharded model: whether to step must not depend on rank 0's client (its
        stream buffers instead)."""
        return self.stream is not None and not self.loaded.sharded and self.stream.over_limit

    # ---- step ----------------------------------------------------------------------------

    def on_prefill(self, done: int, total: int) -> None:
        """Prompt tokens computed so far, of those not taken from the prefix cache (engine
        thread): `$/progress` phase "prefill" for a client that asked for progress (the
        reporter rate-limits it)."""
        if self.request.progress is not None and total > 0:
            computed = len(self.prompt) - self.cached_tokens  # a batch counts only what is left of it
            self.request.progress("prefill", computed - (total - done), computed, "tokens")

    def on_prompt_done(self) -> None:
        if self.prompt_done_at is None:
            self.prompt_done_at = time.perf_counter()
            computed = len(self.prompt) - self.cached_tokens
            self.on_prefill(computed, computed)

    def on_token(self, token: int, finish_reason: str | None) -> None:
        """One sampled token. `finish_reason` "stop" means an end-of-sequence token, which
        is counted but not shown; "length" means this was the last one allowed."""
        now = time.perf_counter()
        self.on_prompt_done()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.completion_tokens += 1
        if self._channels.channel == REASONING:
            self.reasoning_tokens += 1
        if finish_reason != "stop":
            self._detokenizer.add_token(token)
        if finish_reason is not None:
            self._detokenizer.finalize()
        self._route(self._channels.feed(self._detokenizer.last_segment))
        if self._channels.stopped:
            self.finish_reason = "stop_sequence"
        elif finish_reason is not None:
            self._route(self._channels.flush(complete=finish_reason == "stop"))
            self.finish_reason = finish_reason
        elif self.job.cancelled:
            self.finish_reason = "cancelled"

    def cancel_now(self) -> None:
        """Stopped between steps (cancelled, its model unloaded, or the engine closing)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _route(self, pieces: list[tuple[str, str]]) -> None:
        for channel, text in pieces:
            if channel == ANSWER:
                self._emit(text)
            elif channel == REASONING:
                self._emit_reasoning(text)
            elif self._tool_calls is not None:
                self._emit_tool_calls(self._tool_calls.read(text, unfinished=channel != TOOL))

    def _emit(self, text: str) -> None:
        if not text:
            return
        self.first_text_at = self.first_text_at or time.perf_counter()
        if self._recorded is not None:
            self._recorded.append(text)
        if self.stream is not None:
            self.stream.write(text)
        else:
            self._parts.append(text)

    def _emit_reasoning(self, text: str) -> None:
        self.first_text_at = self.first_text_at or time.perf_counter()
        self._recorded = None  # the response cache replays plain text only
        if self.stream is not None:
            self.stream.write(text, channel="reasoning")
        else:
            self._reasoning.append(text)

    def _emit_tool_calls(self, calls: list[dict[str, Any]]) -> None:
        self.first_text_at = self.first_text_at or time.perf_counter()
        self._recorded = None
        first = len(self.tool_calls)
        self.tool_calls.extend(calls)
        if self.stream is not None:
            self.stream.write_tool_calls([{"index": first + i, **call} for i, call in enumerate(calls)])

    # ---- finish --------------------------------------------------------------------------

    def result(self) -> GenerationResult:
        ended = time.perf_counter()
        received = self.request.received_at
        first_text = self.first_text_at or ended
        prompt_done = self.prompt_done_at or ended
        computed = len(self.prompt) - self.cached_tokens
        prompt_s = prompt_done - self.admitted_at if self.admitted_at else 0.0
        decode_s = (self.last_token_at or 0.0) - (self.first_token_at or 0.0)
        timings = {
            "ttftMs": _ms(first_text - received),
            "queueMs": _ms((self.admitted_at or ended) - received),
            "promptMs": _ms(prompt_s),
            "promptTokensPerSecond": _rate(computed, prompt_s),
            "generateMs": _ms(ended - first_text),
            "tokensPerSecond": _rate(self.completion_tokens - 1, decode_s),
            "totalMs": _ms(ended - received),
            "peakMemoryBytes": self.peak_memory,
        }
        if self.drafted_tokens is not None:
            timings["draftedTokens"] = self.drafted_tokens
            timings["acceptedTokens"] = self.accepted_tokens
        if self.prepared.constraint is not None:
            timings["maskMsPerToken"] = self.prepared.constraint.mask_ms_per_token
        finish = self.finish_reason or "cancelled"
        if finish == "stop" and self.tool_calls:
            finish = "tool_calls"
        streamed = self.request.stream
        return GenerationResult(
            self.loaded.name, finish, len(self.prompt), self.completion_tokens,
            self.cached_tokens, timings, text=None if streamed else "".join(self._parts),
            cancel_reason=self.job.cancel_reason if self.finish_reason == "cancelled" else None,
            reasoning=None if streamed else "".join(self._reasoning) or None,
            tool_calls=None if streamed else self.tool_calls or None,
            reasoning_tokens=self.reasoning_tokens if self._counts_reasoning else None,
            image_tokens=self.prepared.vision_inputs.image_tokens if self.prepared.vision_inputs else None)

    @property
    def recording(self) -> list[str] | None:
        """The text pieces as emitted, for the response cache (complete runs only)."""
        if self._recorded is None or self.finish_reason in (None, "cancelled"):
            return None
        return self._recorded

"""Constrained decoding: a token mask that keeps the generated text inside a grammar (a JSON
Schema, any JSON object, or a forced tool call), built by llguidance and applied as an mlx-lm
logits processor.

llguidance's own MLX helper is a Metal kernel; here the mask is a plain `mx.where`, so it runs
on every MLX backend. Grammars compile on a worker thread (`compile_constraint`, from
`prepare`); the engine thread only computes one mask per token.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams

if TYPE_CHECKING:  # llguidance is imported when a grammar is first compiled
    from llguidance import LLMatcher
    from llguidance._lib import JsonCompileOptions  # a TypedDict of its stubs only

log = logging.getLogger("localmlx.engine")

# JSON layout the mask allows between tokens: one space, or a newline and an indent (as
# llama.cpp's JSON grammars do), so both compact and pretty-printed JSON fit but a model (or
# random weights) cannot spend its budget on blanks. A schema's own "x-guidance" overrides it.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})"}
GRAMMARS_PER_MODEL = 32  # compiled grammars kept per loaded model (least recently used go)
_SHORT = 240


# ---- grammars (pure: no tokenizer) ------------------------------------------------------------


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for a `responseFormat`, or None for plain text."""
    schema = _requested_schema(response_format)
    if schema is None:
        return None
    try:
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise _cannot_compile(str(exc), "/responseFormat/schema") from None


def _requested_schema(response_format: dict[str, Any] | None) -> Any:
    """The JSON Schema a `responseFormat` asks for (any object for json_object), or None for
    plain text."""
    kind = (response_format or {}).get("type", "text")
    if response_format is None or kind == "text":
        return None
    return {"type": "object"} if kind == "json_object" else response_format["schema"]


def _tool_call_schema(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """{"name": <allowed name>, "arguments": <that tool's parameters>} for each allowed tool."""
    functions = [t.get("function") or {} for t in tools if t.get("type", "function") == "function"]
    allowed = [f for f in functions if choice == "required" or f.get("name") == choice]
    if not allowed:
        raise InvalidParams(f"toolChoice names {choice!r}, which is not one of the tools",
                            errors=[{"path": "/toolChoice", "message": "no tool has this name"}])
    no_arguments = {"type": "object", "properties": {}, "additionalProperties": False}
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or no_arguments}}
               for f in allowed]
    return {"x-guidance": JSON_OPTIONS, **(options[0] if len(options) == 1 else {"anyOf": options})}


# How each mlx-lm tool parser frames one call's JSON between its start and end strings.
# Parsers whose body is not {"name", "arguments"} JSON (pythonic, qwen3_coder's XML, glm47,
# ...) are not listed: a forced tool call is refused for them.
_JSON_BODIES = {None: ("", ""), "json_tools": ("\n", "\n"), "mistral": ("[", "]")}


# ---- compiling against a model's tokenizer ----------------------------------------------------


class _ModelGrammars:
    """One loaded model's llguidance tokenizer and its recently compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int | None) -> None:
        import llguidance.hf

        hf = tokenizer._tokenizer
        self.tokenizer_size = len(hf)
        # The logits can be wider than the tokenizer (padding rows): the mask covers them all.
        self.n_vocab = max(vocab_size or 0, self.tokenizer_size)
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.hf = hf
        self.ll = llguidance.hf.from_tokenizer(hf, n_vocab=self.n_vocab, eos_token=self.eos_ids)
        self._compiled: collections.OrderedDict[str, LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str, path: str) -> LLMatcher:
        """A fresh matcher for `grammar` (a copy of the compiled one, which stays unused)."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        error = LLMatcher.validate_grammar(grammar, self.ll)
        if error:
            raise _cannot_compile(error, path)
        compiled = LLMatcher(self.ll, grammar, log_level=0)
        if compiled.is_error():
            raise _cannot_compile(compiled.get_error(), path)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > GRAMMARS_PER_MODEL:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def literal(self, text: str) -> str:
        """`text` as a lark expression: special tokens (which no string literal can produce) by
        id, the rest as quoted strings."""
        parts: list[str] = []
        run: list[int] = []
        for token in self.hf.encode(text, add_special_tokens=False):
            if self.ll.is_special_token(token):
                if run:
                    parts.append(json.dumps(self.hf.decode(run), ensure_ascii=False))
                    run = []
                parts.append(f"<[{token}]>")
            else:
                run.append(token)
        if run:
            parts.append(json.dumps(self.hf.decode(run), ensure_ascii=False))
        return " ".join(parts) or '""'


_by_tokenizer: weakref.WeakKeyDictionary[Any, _ModelGrammars] = weakref.WeakKeyDictionary()
_by_tokenizer_lock = threading.Lock()


def _grammars(tokenizer: Any, vocab_size: int | None) -> _ModelGrammars:
    """Per loaded model (its tokenizer object), built once: ~2 s for a 150k vocabulary. It
    goes with the tokenizer when the model is unloaded."""
    with _by_tokenizer_lock:
        grammars = _by_tokenizer.get(tokenizer)
        if grammars is None:
            grammars = _by_tokenizer[tokenizer] = _ModelGrammars(tokenizer, vocab_size)
        return grammars


def prepare_grammars(tokenizer: Any, vocab_size: int | None) -> None:
    """Build a model's llguidance tokenizer now (a group's ranks do it while loading): it holds
    the GIL for seconds, which a follower must not spend inside a request, silent to its
    heartbeats while rank 0 waits for it."""
    _grammars(tokenizer, vocab_size)


def _cannot_compile(reason: str, path: str) -> InvalidParams:
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    # llguidance's regex errors end in the useful line ("error: look-around ... not supported").
    short = next((line.removeprefix("error:").strip() for line in reversed(lines) if line.startswith("error:")),
                 lines[0] if lines else "invalid")
    short = short if len(short) <= _SHORT else short[:_SHORT] + "…"
    return InvalidParams(f"The schema cannot be compiled into a token mask: {short}",
                         errors=[{"path": path, "message": short}])


def compile_constraint(tokenizer: Any, vocab_size: int | None, grammar: str,
                       path: str = "/responseFormat/schema") -> Constraint:
    """A constraint for one request (runs on a worker thread: compiling can take a while).
    `tokenizer` is mlx-lm's TokenizerWrapper; `vocab_size` the model's logits width if known.
    Raises InvalidParams (path `path`) when the grammar does not compile."""
    grammars = _grammars(tokenizer, vocab_size)
    return Constraint(grammars.matcher(grammar, path), grammars)


def compile_tool_call(tokenizer: Any, vocab_size: int | None, tools: list[dict[str, Any]], choice: str, *,
                      start: str | None, end: str | None, parser: str | None = None,
                      reasoning: tuple[str, str] | None = None, opened: bool = False) -> Constraint:
    """A constraint that makes the model call a tool (toolChoice "required" or a tool's name).

    `tools`: OpenAI function tools, [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]. `choice`: "required" (any of them) or one tool's name. `start`/`end`: the
    model's tool-call framing (`tokenizer.tool_call_start` / `tool_call_end`; None when it has
    none). `parser`: the model's mlx-lm tool parser module name (`tokenizer.tool_parser.__module__`
    tail: "json_tools", "mistral", ...), None when unknown. `reasoning`: (start, end) to allow
    one free-text reasoning block (e.g. ("<think>", "</think>")) before the call, else None;
    `opened`: the prompt already opened that block, so the output starts inside it.

    The output is then exactly:
      [reasoning start, free text, reasoning end]  (optional, only when `reasoning` is given)
      start "\\n" {"name": <allowed name>, "arguments": <object valid for that tool>} "\\n" end
    for json_tools (Hermes, Qwen); `start [ {...} ]` for mistral; the bare JSON object when
    `start` is None. "name" comes first, and a tool without "parameters" takes `{}`. After the
    call only end-of-sequence is allowed (one call). Other formats (pythonic, qwen3_coder XML,
    glm47, ...) raise InvalidParams at path /toolChoice, as does a `choice` naming no tool; a
    parameters schema llguidance cannot compile raises InvalidParams at path /tools.
    """
    if start is None:
        parser = None
    elif parser is None:
        parser = "json_tools"  # framing but no parser named: the Hermes/Qwen JSON body
    elif parser not in _JSON_BODIES:
        raise InvalidParams(
            f"toolChoice {'required' if choice == 'required' else 'naming a tool'} is not supported for this "
            f"model's tool-call format ({parser or start})",
            errors=[{"path": "/toolChoice", "message": f"unsupported tool-call format {parser or start}"}])
    grammars = _grammars(tokenizer, vocab_size)
    before, after = _JSON_BODIES[parser]
    call = [f"%json {json.dumps(_tool_call_schema(tools, choice))}"]
    if before:
        call.insert(0, json.dumps(before))
    if after:
        call.append(json.dumps(after))
    if start is not None:
        call.insert(0, grammars.literal(start))
        if end:
            call.append(grammars.literal(end))
    rules = [f"start: {_reasoning_prefix(reasoning, opened)}call", f"call: {' '.join(call)}",
             *_reasoning_rules(grammars, reasoning, opened)]
    from llguidance import LLMatcher

    return Constraint(grammars.matcher(LLMatcher.grammar_from_lark("\n".join(rules)), "/tools"), grammars)


def _reasoning_prefix(reasoning: tuple[str, str] | None, opened: bool) -> str:
    return "" if reasoning is None else "think " if opened else "think? "


def _reasoning_rules(grammars: _ModelGrammars, reasoning: tuple[str, str] | None, opened: bool) -> list[str]:
    """The free-text reasoning block that may come before the constrained part (or must, when
    the template opened it), then a blank line or two, as models write it."""
    if reasoning is None:
        return []
    think_start, think_end = grammars.literal(reasoning[0]), grammars.literal(reasoning[1])
    opening = "" if opened else f"{think_start} "
    if think_end.startswith("<["):  # a special token: free text cannot contain it
        return [f"think: {opening}/(?s:.*)/ {think_end} /\\n{{1,2}}/?"]
    # plain text: the block ends at the first end string
    return [f"think: {opening}think_text /\\n{{1,2}}/?",
            f"think_text[lazy]: /(?s:.*){_regex_escape(reasoning[1])}/"]


def compile_response_format(tokenizer: Any, vocab_size: int | None, response_format: dict[str, Any] | None, *,
                            reasoning: tuple[str, str] | None = None, opened: bool = False) -> Constraint | None:
    """The constraint for a `responseFormat` (None for plain text). With `reasoning`, the
    model may reason first (`opened`: it already is) and the JSON is its answer."""
    grammar = response_format_grammar(response_format)
    if grammar is None:
        return None
    if reasoning is None:
        return compile_constraint(tokenizer, vocab_size, grammar)
    from llguidance import LLMatcher

    grammars = _grammars(tokenizer, vocab_size)
    schema = _requested_schema(response_format)
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": JSON_OPTIONS}
    rules = [f"start: {_reasoning_prefix(reasoning, opened)}answer", f"answer: %json {json.dumps(schema)}",
             *_reasoning_rules(grammars, reasoning, opened)]
    return Constraint(grammars.matcher(LLMatcher.grammar_from_lark("\n".join(rules)), "/responseFormat/schema"),
                      grammars)


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


# ---- the mask, on the engine thread -----------------------------------------------------------


@dataclass(eq=False)
class Constraint:
    """One request's grammar state. `processor(prompt_length)` is its mlx-lm logits processor;
    `mask_ms_per_token` what it cost."""

    matcher: LLMatcher
    grammars: _ModelGrammars
    mask_seconds: float = 0.0
    masks: int = 0

    @property
    def mask_ms_per_token(self) -> float:
        return round(self.mask_seconds * 1000 / self.masks, 4) if self.masks else 0.0

    def processor(self, prompt_length: int) -> MaskProcessor:
        return MaskProcessor(self, prompt_length)


class MaskProcessor:
    """Masks logits to the tokens the grammar allows next.

    mlx-lm shows a processor the whole sequence so far (solo: the history `lanes` prepends;
    batch: `all_tokens`), prompt included, shape (n,). The grammar consumes only the tokens
    past what it has seen, so it stays right when the generation moves from a solo run into a
    batch (which shows the last token again) or is parked and resumed; a shorter sequence (a
    token taken back) is rolled back."""

    def __init__(self, constraint: Constraint, prompt_length: int) -> None:
        import mlx.core as mx
        import numpy as np

        self._constraint = constraint
        self._matcher = constraint.matcher
        grammars = constraint.grammars
        self._n_vocab = grammars.n_vocab
        self._seen = prompt_length  # sequence length the matcher has consumed up to
        self._mask: Any = None  # the mask at `_seen`: a repeated call (after a hand-over) reuses it
        self._eos_only = np.zeros(self._n_vocab, dtype=bool)
        self._eos_only[grammars.eos_ids] = True
        self._beyond_tokenizer = grammars.tokenizer_size
        self._neg_inf = mx.array(-float("inf"))
        self._broken = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        mx.eval(tokens)  # the last token's forward pass is not the mask's cost
        started = time.perf_counter()
        length = tokens.shape[-1]
        if length != self._seen:
            self._advance(tokens, length)
            self._mask = None
        if self._mask is None:
            self._mask = self._allowed(logits.shape[-1])
        masked = mx.where(self._mask, logits, self._neg_inf.astype(logits.dtype))
        self._constraint.mask_seconds += time.perf_counter() - started
        self._constraint.masks += 1
        return masked

    def _advance(self, tokens: Any, length: int) -> None:
        if length < self._seen:
            self._matcher.rollback(self._seen - length)
        else:
            new = tokens[self._seen:].tolist()
            if not self._broken and not self._matcher.is_stopped() and not self._matcher.consume_tokens(new):
                self._broken = True  # cannot happen with the mask applied; end the output cleanly
                log.warning("token mask: the grammar rejected a token (%s); only end of sequence from here",
                            self._matcher.get_error()[:_SHORT])
        self._seen = length

    def _allowed(self, width: int) -> Any:
        import mlx.core as mx
        import numpy as np

        matcher = self._matcher
        if self._broken or matcher.is_stopped():
            allowed = self._eos_only  # the grammar is complete: only end of sequence
        else:
            bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: self._n_vocab].astype(bool)
            allowed[self._beyond_tokenizer:] = False  # padding rows of the embedding
            if matcher.is_accepting():
                allowed |= self._eos_only
        if width != allowed.shape[0]:  # logits narrower or wider than the vocabulary we know
            allowed = np.pad(allowed[:width], (0, max(0, width - allowed.shape[0])))
        return mx.array(allowed)

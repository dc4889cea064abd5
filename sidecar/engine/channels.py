"""Where generated text goes: the answer, the reasoning, or a tool call.

Decoded text is matched against the model's control strings (``<think>``/``</think>``, its
tool-call markers) and the request's stop strings with mlx-lm's TextStateMachine, which strips
the markers and holds back text that might still be part of one. The transitions are mlx-lm's
(``make_text_state_machine``) except that stop strings end the answer instead of being
dropped from it, and only apply to the answer: a stop string inside reasoning or a tool call
is content there, not the end of the response.
"""

from __future__ import annotations

from typing import Any

from .tools import marks_tool_calls

ANSWER, REASONING, TOOL = "normal", "reasoning", "tool"
UNFINISHED_TOOL = "unfinished_tool"

# mlx-lm's TextStateMachine state, which it leaves untyped: (channel, trie node, its states,
# held-back text); the channel is None once a stop string has matched.
MachineState = tuple[str | None, Any, Any, str]


def _transitions(tokenizer: Any, stop: list[str], reasoning: bool,
                 tool_calls: bool) -> dict[str, list[tuple[str, str | None]]]:
    transitions: dict[str, list[tuple[str, str | None]]] = {ANSWER: []}
    if reasoning and getattr(tokenizer, "has_thinking", False):
        transitions[ANSWER].append((tokenizer.think_start, REASONING))
        transitions[REASONING] = [(tokenizer.think_end, ANSWER)]
    if tool_calls and marks_tool_calls(tokenizer):
        transitions[ANSWER].append((tokenizer.tool_call_start, TOOL))
        if REASONING in transitions:
            transitions[REASONING].append((tokenizer.tool_call_start, TOOL))
        end = tokenizer.tool_call_end
        transitions[TOOL] = [(end, ANSWER)] if end else []
    for marker in (getattr(tokenizer, "structural_markers", ()) or ()) if reasoning else ():
        transitions[ANSWER].append((marker, ANSWER))
    transitions[ANSWER].extend((s, None) for s in stop)
    return transitions


def starts_in_reasoning(tokenizer: Any, prompt: list[int]) -> bool:
    """The template opened a think block the model is to continue (DeepSeek-R1, Qwen3 with
    a forced think prefix): its first tokens are reasoning."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    opened: int = tokenizer.rfind_think_start(prompt)
    closed: int = tokenizer.rfind_think_end(prompt)
    return opened > closed


class OutputChannels:
    """Feed decoded text; get back (channel, text) pieces in order. A tool call's text comes
    back whole, as one TOOL piece, once its end marker has arrived; one still open when the
    generation ends comes back from `flush` as TOOL (formats that end at end-of-sequence) or
    UNFINISHED_TOOL (its end marker never came)."""

    def __init__(self, tokenizer: Any, stop: list[str], *, reasoning: bool, tool_calls: bool,
                 initial: str = ANSWER) -> None:
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine
        transitions = _transitions(tokenizer, stop, reasoning, tool_calls)
        transitions.setdefault(initial, [])
        self._ends_with_marker = bool(transitions.get(TOOL))
        self._state: MachineState = TextStateMachine(transitions).make_state(initial)
        self._tool_text: list[str] | None = None
        self.stopped = False  # a stop string matched: the answer is over

    @property
    def channel(self) -> str | None:
        return self._state[0]

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self.stopped or not text:
            return []
        self._state, segments = self._machine.split(self._state, text)
        return self._route(segments)

    def flush(self, complete: bool = True) -> list[tuple[str, str]]:
        """The end of generation (`complete`: by end-of-sequence, not cut off by maxTokens):
        release held-back text, and any tool call still open."""
        pieces: list[tuple[str, str]] = []
        if not self.stopped:
            channel = self.channel
            self._state, held, _ = self._machine.flush(self._state)
            pieces = self._route([(channel, held)])
        if self._tool_text is not None:
            text, self._tool_text = "".join(self._tool_text), None
            pieces.append((TOOL if complete and not self._ends_with_marker else UNFINISHED_TOOL, text))
        return pieces

    def _route(self, segments: list[tuple[str | None, str]]) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        for channel, text in segments:
            if channel == TOOL:
                if self._tool_text is None:
                    self._tool_text = []
                self._tool_text.append(text)
                continue
            if self._tool_text is not None:  # left the tool state: the call is complete
                pieces.append((TOOL, "".join(self._tool_text)))
                self._tool_text = None
            if channel is None:
                self.stopped = True
                break
            if text:
                pieces.append((channel, text))
        return pieces

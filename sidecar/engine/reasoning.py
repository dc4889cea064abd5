"""thinkingBudget: once a reasoning block has used its budget, the model is made to close it.

A logits processor (mlx-lm's interface: it sees the prompt and every token so far) that
follows the think markers token by token and, after `budget` reasoning tokens, forces the
think-end marker's tokens one per step; the model then writes its answer as usual.
"""

from __future__ import annotations

from typing import Any


class ThinkingBudget:
    def __init__(self, tokenizer: Any, prompt_length: int, budget: int, reasoning: bool) -> None:
        self._start = tuple(tokenizer.think_start_tokens or ())
        self._end = tuple(tokenizer.think_end_tokens or ())
        self._seen = prompt_length
        self._budget = budget
        self._reasoning = reasoning
        self._spent = 0
        self._recent: list[int] = []

    def __call__(self, tokens: Any, logits: Any) -> Any:
        new = tokens[self._seen:].tolist() if tokens.shape[-1] > self._seen else []
        self._seen = max(self._seen, tokens.shape[-1])
        for token in new:
            self._follow(int(token))
        if not self._reasoning or self._spent < self._budget or not self._end:
            return logits
        return _forced(logits, self._end[self._closing_progress()])

    def _follow(self, token: int) -> None:
        self._recent = [*self._recent, token][-max(len(self._start), len(self._end), 1):]
        if self._reasoning:
            self._spent += 1
            if self._ends_with(self._end):
                self._reasoning = False
        elif self._ends_with(self._start):
            self._reasoning, self._spent = True, 0

    def _ends_with(self, marker: tuple[int, ...]) -> bool:
        return bool(marker) and tuple(self._recent[-len(marker):]) == marker

    def _closing_progress(self) -> int:
        """How much of the end marker is already written (forcing resumes after it)."""
        for done in range(len(self._end) - 1, 0, -1):
            if tuple(self._recent[-done:]) == self._end[:done]:
                return done
        return 0


def _forced(logits: Any, token: int) -> Any:
    import mlx.core as mx

    allowed = mx.arange(logits.shape[-1]) == token
    return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))

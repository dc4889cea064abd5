"""A prompt's first decoding step taken inside the batch's step, not in a pass of its own.

mlx-lm's `BatchGenerator` prefills all of a prompt but its last token; at its next step it
decodes the batch, then puts the finished prompts' last tokens through the model on their
own (a `GenerationBatch` of the new rows, one step) and merges the rows into the batch. That
extra pass reads all the weights for a row or two: on this machine's benchmark model ~12 ms,
two thirds of a whole step of 4 rows, paid once per request.

Here the finished prompts join the decoding batch before its step, with their last tokens as
their inputs: the step that decodes the others also feeds them, and samples their first
tokens. That step emits nothing for them (their input is a prompt token, not a sampled one),
exactly as mlx-lm's own pass emits nothing; the first token comes out of the step after it,
as with mlx-lm, so a request waits no longer for it. Draws, logits processors, stop
sequences and token counts see the same sequence as mlx-lm's path; between two `next()` calls
the batch is in the state mlx-lm's would be in.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch, StopSequences


class _Admitted(GenerationBatch):
    """Rows whose first step has not run: the constructor's step is skipped, so their prompts'
    last tokens stay their next inputs."""

    def _step(self) -> tuple[list[int], list[mx.array]]:
        self._next_logprobs = [mx.array(0.0)] * len(self.uids)  # what no response will carry
        return [], []


class _Decoding(GenerationBatch):
    """The decoding batch; the rows in `starting` feed their prompt's last token at the next
    step, which emits nothing for them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starting: set[int] = set()

    def next(self) -> list[Any]:
        if not self.starting:
            return super().next()
        matchers = {}
        for i, uid in enumerate(self.uids):
            if uid in self.starting:  # a prompt token is not output: it cannot end one
                matchers[uid], self._matchers[i] = self._matchers[i], StopSequences().matcher()
                self._num_tokens[i] -= 1  # the step counts a token it does not output
        self.starting = set()
        try:
            responses = super().next()  # no starting row can finish: max_tokens >= 1, no stop
        finally:
            for i, uid in enumerate(self.uids):
                if uid in matchers:
                    self._matchers[i] = matchers[uid]
        return [r for r in responses if r.uid not in matchers]


class FirstStepInTheBatch(BatchGenerator):
    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._generation_batch = _Decoding.empty(model, self.sampler)

    def _next(self) -> tuple[list[Any], list[Any]]:
        admitted = self._admit_finished_prompts()
        prompt_responses, generation_responses = super()._next()  # type: ignore[no-untyped-call]
        return admitted + prompt_responses, generation_responses

    def _admit_finished_prompts(self) -> list[Any]:
        """The rows whose prompt has only its last token left leave the prefill batch and join
        the decoding one, that token their next input (mlx-lm's own test for the same)."""
        done = [i for i, entry in enumerate(self._currently_processing)
                if len(entry[0]) == 1 and len(entry[0][0]) == 1]
        if not done:
            return []
        last = [self._currently_processing[i][0][0][0] for i in done]
        progress = [(self._currently_processing[i][2],) * 2 for i in done]
        self._currently_processing = [e for i, e in enumerate(self._currently_processing) if i not in done]
        rows = self._prompt_batch.split(done)
        self._generation_batch.extend(_Admitted(
            self.model, rows.uids, mx.array(last, dtype=mx.uint32), rows.prompt_cache, rows.tokens, rows.samplers,
            self.sampler, rows.logits_processors, rows.stop_sequences, rows.max_tokens))
        self._generation_batch.starting.update(rows.uids)
        return [PromptProcessingBatch.Response(uid, p, True, True) for uid, p in zip(rows.uids, progress, strict=True)]

"""Prompts prefilled together only when they are of a size.

mlx-lm's `BatchGenerator` prefills the waiting prompts together, right-padded to the longest
chunk in the pass: a 600-token prompt beside six 100-token ones makes a pass of 7 x 512 rows
for 1,100 rows of work, 3x the compute, and on a tensor-parallel group 3x the bytes every
layer's all_sum moves (measured: an 8.7 s turn over a 1 ms link). Here a waiting prompt joins
a pass only while the longest chunk in it stays within `MAX_SPREAD` times the shortest; the
first prompt that does not fit waits, and so does everything behind it, so no prompt is ever
overtaken: it leads the next pass that has room. A prompt kept waiting `MAX_WAIT_PASSES`
passes (a short question behind a long document's many chunks) joins the next pass anyway,
padded: its first token is late by a few passes at most, not by the whole document. Which
prompts share a pass depends only on the queue and the passes so far, so every rank of a
group decides the same.
"""

from __future__ import annotations

from typing import Any

from .first_step import FirstStepInTheBatch

MAX_SPREAD = 2  # the longest chunk in a pass at most this many times the shortest
MAX_WAIT_PASSES = 4  # then a waiting prompt joins whatever pass comes next


def _next_chunk(segments: list[list[int]], step: int) -> int:
    """The prompt tokens this sequence puts through the next pass (0: it only has its last
    token left, which goes straight to decoding)."""
    if not segments or (len(segments) == 1 and len(segments[0]) <= 1):
        return 0
    return min(len(segments[0]), step)


class EvenPrefillBatchGenerator(FirstStepInTheBatch):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._passes = 0  # passes formed while prompts waited
        self._waiting_since: dict[int, int] = {}  # uid -> the pass it was first kept out of

    def _make_batch(self, n: int) -> Any:
        return super()._make_batch(self._fitting(n))

    def _fitting(self, n: int) -> int:
        """How many of the waiting prompts, in order, join the pass now (at most `n`)."""
        self._passes += 1
        queued = {sequence[0] for sequence in self._unprocessed_sequences}  # a removed one is forgotten
        self._waiting_since = {uid: since for uid, since in self._waiting_since.items() if uid in queued}
        step = self.prefill_step_size
        chunks = [c for c in (_next_chunk(seq[0], step) for seq in self._currently_processing) if c]
        shortest, longest = (min(chunks), max(chunks)) if chunks else (0, 0)
        waiting = list(self._unprocessed_sequences)[:n]
        taken = 0
        for sequence in waiting:
            chunk = _next_chunk(sequence[1], step)
            if chunk and longest and not self._waited_enough(sequence[0]):
                low, high = min(shortest, chunk), max(longest, chunk)
                if high > MAX_SPREAD * low:
                    break  # it waits for a pass of its size; nothing overtakes it
            if chunk:
                shortest, longest = min(shortest or chunk, chunk), max(longest, chunk)
            taken += 1
        for sequence in waiting[:taken]:
            self._waiting_since.pop(sequence[0], None)
        for sequence in waiting[taken:]:
            self._waiting_since.setdefault(sequence[0], self._passes)
        return taken

    def _waited_enough(self, uid: int) -> bool:
        since = self._waiting_since.get(uid)
        return since is not None and self._passes - since >= MAX_WAIT_PASSES

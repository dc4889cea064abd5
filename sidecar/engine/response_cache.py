"""The exact response cache: an identical deterministic request on the same loaded model is
answered with the text it produced before, without touching the model.

One per loaded model, so unloading or reloading a model drops its answers. Bounded by
entries and by bytes of text; least recently used goes first. Read from the event loop,
filled from the engine thread: a lock guards it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class CachedResponse:
    pieces: tuple[str, ...]  # the text as it was emitted, replayed as the same chunks
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(len(p.encode("utf-8", "surrogatepass")) for p in self.pieces) + 64


def response_key(request: Any) -> bytes | None:
    """What makes two requests give the same answer; None when they would not (sampling
    without a seed) or when the request asked not to be cached."""
    sampling = request.sampling
    if not request.use_response_cache or not sampling.deterministic:
        return None
    sampling_key = dataclasses.asdict(sampling)
    if sampling.temperature == 0:  # greedy: the seed and the sampling filters change nothing
        for name in ("seed", "top_p", "top_k", "min_p"):
            sampling_key.pop(name)
    described = {"messages": _messages_key(request), "prompt": request.prompt, "maxTokens": request.max_tokens,
                 "stop": request.stop, "sampling": sampling_key, "kv": [request.kv_bits, request.max_kv_size],
                 "responseFormat": _constraint_key(request.response_format),
                 "tools": [request.tools, request.tool_choice],
                 "thinking": [request.thinking, request.thinking_budget],
                 "template": [request.chat_template, request.context_length]}
    try:
        return orjson.dumps(described, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # a lone surrogate in the text: rare enough not to cache
        return None


def _messages_key(request: Any) -> Any:
    """The messages, each image named by its bytes' digest: a data: URL, a file path or a URL
    of the same picture give the same answer, and a file rewritten in place does not."""
    if not request.images:
        return request.messages
    digests = iter(image.digest for image in request.images)  # read in the order the parts come
    return [dict(message, content=[dict(part, image=next(digests)) if part.get("type") == "image" else part
                                   for part in message["content"]])
            if isinstance(message.get("content"), list) else message
            for message in request.messages]


def _constraint_key(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """responseFormat as it shapes the text: type text is the same as none."""
    return None if (response_format or {}).get("type", "text") == "text" else response_format


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, CachedResponse] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> CachedResponse | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, entry: CachedResponse) -> None:
        if self.max_entries <= 0 or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def describe(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}

"""Replays protocol/vectors/*.json against a real sidecar, as protocol/vectors/README.md says."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sidecar.client import Received, SidecarClient
from sidecar.protocol_defs import PROTOCOL_VERSION
from sidecar.transport import encode_message

VECTORS_DIR = Path(__file__).resolve().parent.parent / "protocol" / "vectors"
TYPE_PATTERNS = {
    "$any": lambda v: True,
    "$string": lambda v: isinstance(v, str),
    "$number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "$integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "$object": lambda v: isinstance(v, dict),
    "$array": lambda v: isinstance(v, list),
    "$null": lambda v: v is None,
}


def load_vectors() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(VECTORS_DIR.glob("*.json"))]


def matches(pattern: Any, value: Any) -> bool:
    if isinstance(pattern, str) and pattern in TYPE_PATTERNS:
        return TYPE_PATTERNS[pattern](value)
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and matches(p, value[k]) for k, p in pattern.items())
    if isinstance(pattern, list):
        if not isinstance(value, list) or len(value) != len(pattern):
            return False
        return _match_unordered(pattern, value)
    if isinstance(pattern, bool) or isinstance(value, bool):
        return type(pattern) is type(value) and pattern == value
    if isinstance(pattern, (int, float)) and isinstance(value, (int, float)):
        return pattern == value
    return type(pattern) is type(value) and pattern == value


def _match_unordered(patterns: list[Any], values: list[Any]) -> bool:
    """Batch responses may come in any order: find a one-to-one assignment."""
    def assign(i: int, used: frozenset[int]) -> bool:
        if i == len(patterns):
            return True
        return any(j not in used and matches(patterns[i], values[j]) and assign(i + 1, used | {j})
                   for j in range(len(values)))
    return assign(0, frozenset())


class Replayer:
    def __init__(self, client: SidecarClient) -> None:
        self.client = client
        self.matched: set[int] = set()  # indexes into client.received

    def run(self, vector: dict[str, Any]) -> None:
        if vector.get("initialize", True):
            self._send({"jsonrpc": "2.0", "id": "vector-init", "method": "initialize",
                        "params": {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "vectors"}}})
            self._expect({"jsonrpc": "2.0", "id": "vector-init", "result": "$object"})
        for step in vector["steps"]:
            self._step(step)
        self._send({"jsonrpc": "2.0", "id": "vector-end", "method": "ping"})
        self._expect({"jsonrpc": "2.0", "id": "vector-end", "result": {}})
        extra = [r.message for i, r in enumerate(self.client.received)
                 if i not in self.matched and _is_response(r.message)]
        assert not extra, f"unexpected responses: {extra}"
        assert self.client.junk == [], f"non-protocol output: {self.client.junk[:3]}"

    def _step(self, step: dict[str, Any]) -> None:
        if "send" in step:
            self._send(step["send"])
        elif "sendRaw" in step:
            self.client.send_raw(step["sendRaw"].encode("utf-8", "surrogatepass") + b"\n")
        elif "sendHex" in step:
            self.client.send_raw(bytes.fromhex(step["sendHex"]))
        elif "sendRepeat" in step:
            r = step["sendRepeat"]
            self.client.send_raw((r["prefix"] + r["unit"] * r["count"] + r["suffix"] + "\n").encode())
        elif "expect" in step:
            self._expect(step["expect"])
        elif "expectStream" in step:
            self._expect_stream(step["expectStream"])
        else:
            raise ValueError(f"unknown step {step}")

    def _send(self, message: Any) -> None:
        self.client.send_raw(encode_message(message))

    def _expect(self, pattern: Any, timeout: float = 60.0) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, item in enumerate(list(self.client.received)):
                if i not in self.matched and matches(pattern, item.message):
                    self.matched.add(i)
                    return item
            if self.client.process.poll() is not None and time.monotonic() > deadline - timeout + 1:
                break
            time.sleep(0.005)
        raise AssertionError(f"no message matched {pattern!r}; received "
                             f"{[r.message for r in self.client.received][-10:]}")

    def _expect_stream(self, spec: dict[str, Any]) -> None:
        id_ = spec["id"]
        response = self._expect({"jsonrpc": "2.0", "id": id_}, timeout=60.0)
        self.matched.discard(self.client.received.index(response))  # a later expect checks it
        chunks = [(i, r) for i, r in enumerate(self.client.received)
                  if isinstance(r.message, dict) and r.message.get("method") == "generate/chunk"
                  and matches(id_, r.message["params"]["requestId"])]
        response_index = self.client.received.index(response)
        assert len(chunks) >= spec.get("minChunks", 1), f"only {len(chunks)} chunks"
        assert [r.message["params"]["seq"] for _, r in chunks] == list(range(len(chunks))), "seq gap"
        assert all(i < response_index for i, _ in chunks), "a chunk arrived after the response"
        self.matched.update(i for i, _ in chunks)


def _is_response(message: Any) -> bool:
    if isinstance(message, list):
        return True
    return isinstance(message, dict) and "id" in message and "method" not in message

"""Helpers for the fuzz and soak suite (tests/test_fuzz.py, tests/test_soak.py).

Mode: `LOCALMLX_SOAK=long` (set by scripts/soak.sh) scales every count up; anything else is the
short mode CI runs. `LOCALMLX_SOAK_SEED` changes the seed of every random choice (default 0), so
a long run can explore new cases and any failure can be replayed with the same seed;
`LOCALMLX_SOAK_LINES` sets the size of the hostile mix in tests/test_soak.py.

`RawSidecar` is a second, deliberately independent client of the real process: it writes raw
bytes and keeps the exact text of every number it reads back, so an id can be checked to come
back as the very JSON number text that was sent (the normal client parses with orjson, which
turns a 30-digit integer into a float).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.client import sidecar_command
from sidecar.protocol_defs import INTERNAL_ERROR

LONG_MODE = os.environ.get("LOCALMLX_SOAK", "short").strip().lower() == "long"
SEED = int(os.environ.get("LOCALMLX_SOAK_SEED", "0"))


def scaled(short: int, long: int) -> int:
    return long if LONG_MODE else short


# ---- exact JSON numbers --------------------------------------------------------------------


class ExactInt(int):
    """An int that remembers the JSON text it was read from."""

    text: str

    def __new__(cls, text: str) -> ExactInt:
        value = super().__new__(cls, int(text))
        value.text = text
        return value


class ExactFloat(float):
    text: str

    def __new__(cls, text: str) -> ExactFloat:
        value = super().__new__(cls, float(text))
        value.text = text
        return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_exact(line: bytes) -> Any:
    """Strict JSON (no NaN/Infinity) whose numbers keep their text."""
    return json.loads(line.decode("utf-8"), parse_int=ExactInt, parse_float=ExactFloat,
                      parse_constant=_refuse_constant)


def key_of(value: Any) -> tuple:
    """How a response's id is matched to what was sent: numbers by their exact JSON text,
    strings by value, null as null; anything else can never match a request."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bad", repr(value))
    if isinstance(value, (ExactInt, ExactFloat)):
        return ("n", value.text)
    if isinstance(value, str):
        return ("s", value)
    return ("bad", repr(value))


def number_key(text: str) -> tuple:
    return ("n", text)


def string_key(text: str) -> tuple:
    return ("s", text)


NULL_KEY = ("null",)
OWN_CALL_PREFIX = "call-"  # the ids of RawSidecar.call's own requests


def is_own_call(key: tuple) -> bool:
    return key[0] == "s" and key[1].startswith(OWN_CALL_PREFIX)


def plain(value: Any) -> Any:
    """An exact-parsed value as plain Python (for comparisons and printing)."""
    if isinstance(value, ExactInt):
        return int(value)
    if isinstance(value, ExactFloat):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# ---- memory ---------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a live process, or None where /proc is missing (macOS)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_growth_failure(baseline: int | None, sampler: RssSampler, limit: int, what: str) -> str | None:
    """The RSS assertion: a failure message when the peak grew `limit` or more over `baseline`.
    Where /proc is missing (macOS) it is skipped, with a warning that says so."""
    if baseline is None or not sampler.samples:
        warnings.warn(f"RSS not checked ({what}): it is read from /proc/<pid>/status, which this platform "
                      f"does not have", stacklevel=2)
        return None
    growth = sampler.peak - baseline
    if growth < limit:
        return None
    return (f"RSS grew {growth / MiB:.0f} MiB over the {baseline / MiB:.0f} MiB baseline ({what}; limit "
            f"{limit / MiB:.0f} MiB)")


class RssSampler:
    """Samples a process's RSS every `interval` seconds on a daemon thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def spread(self, n: int) -> list[int]:
        """`n` samples evenly spread over the run (to tell a plateau from a steady climb)."""
        samples = [rss for _, rss in self.samples]
        if not samples:
            return []
        return [samples[min(len(samples) - 1, round(i * (len(samples) - 1) / max(1, n - 1)))] for i in range(n)]

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


MiB = 1 << 20


# ---- a raw client ---------------------------------------------------------------------------


@dataclass
class Seen:
    """What came back for one id: every response (there must be exactly one), in arrival order."""

    responses: list[dict[str, Any]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # index of each response in the transcript
    in_batch: list[bool] = field(default_factory=list)


class RawSidecar:
    """Spawns `python -m sidecar serve`; writes raw bytes; reads stdout on a thread, keeping
    exact ids, per-id responses, chunk sequences and anything that is not protocol."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            sidecar_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **env}, start_new_session=True)
        self.lock = threading.Condition()
        self.by_key: dict[tuple, Seen] = {}
        self.null_responses: list[dict[str, Any]] = []  # responses whose id is null (flattened)
        self.batches: list[list[dict[str, Any]]] = []  # array responses
        self.chunks: dict[tuple, list[tuple[int, int]]] = {}  # requestId key -> [(seq, index)]
        self.notifications: dict[str, int] = {}
        self.junk: list[bytes] = []  # stdout lines that are not one JSON-RPC message
        self.stderr_lines: list[str] = []
        self.count = 0  # messages read (a batch counts once)
        self.on_message: Callable[[Any], None] | None = None
        self._calls = itertools.count()
        threading.Thread(target=self._read, daemon=True, name="raw-reader").start()
        threading.Thread(target=self._drain_stderr, daemon=True, name="raw-stderr").start()

    # ---- wire --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Blocks as long as the pipe does: as fast as the sidecar reads, no faster."""
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, message: Any) -> None:
        self.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        buffer = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            with self.lock:
                for line in lines:
                    self._take(line)
                self.lock.notify_all()
        with self.lock:
            if buffer:
                self.junk.append(buffer)  # a last line without its newline
            self.lock.notify_all()

    def _take(self, line: bytes) -> None:
        try:
            message = loads_exact(line)
        except ValueError:
            self.junk.append(line)
            return
        index = self.count
        self.count += 1
        if isinstance(message, list) and message and all(_is_response(m) for m in message):
            self.batches.append(message)
            for response in message:
                self._response(response, index, True)
        elif _is_response(message):
            self._response(message, index, False)
        elif isinstance(message, dict) and isinstance(message.get("method"), str) and "id" not in message:
            method = message["method"]
            self.notifications[method] = self.notifications.get(method, 0) + 1
            params = message.get("params")
            if method == "generate/chunk" and isinstance(params, dict):
                self.chunks.setdefault(key_of(params.get("requestId")), []).append((params.get("seq"), index))
        else:
            self.junk.append(line)
            return
        if self.on_message is not None:
            self.on_message(message)

    def _response(self, response: dict[str, Any], index: int, in_batch: bool) -> None:
        key = key_of(response.get("id"))
        if key == NULL_KEY:
            self.null_responses.append(response)
        seen = self.by_key.setdefault(key, Seen())
        seen.responses.append(response)
        seen.order.append(index)
        seen.in_batch.append(in_batch)

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def reset(self) -> None:
        """Forget what was read so far (between independent rounds of traffic)."""
        with self.lock:
            self.by_key.clear()
            self.null_responses.clear()
            self.batches.clear()
            self.chunks.clear()
            self.notifications.clear()

    # ---- waiting -----------------------------------------------------------------------------

    def wait_for(self, keys: Any, timeout: float) -> list[tuple]:
        """Waits until every key has a response; returns the keys still missing at the deadline
        (or when the process has gone)."""
        keys = list(keys)
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                missing = [k for k in keys if k not in self.by_key]
                if not missing or self.process.poll() is not None:
                    return missing
                left = deadline - time.monotonic()
                if left <= 0:
                    return missing
                keys = missing
                self.lock.wait(min(left, 0.5))

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Waits (on arrivals, not sleeps) until `condition()` holds under the lock."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    return False
                self.lock.wait(min(left, 0.5))
            return True

    def wait_settled(self, keys: Any, timeout: float, poll: float = 2.0) -> list[tuple]:
        """Like `wait_for`, but once the sidecar is idle (no generation active or queued) and
        nothing more has arrived, the keys still missing will never come: return them then
        instead of waiting out the timeout."""
        keys = list(keys)
        deadline = time.monotonic() + timeout
        last_count = -1
        while True:
            keys = self.wait_for(keys, min(poll, max(0.0, deadline - time.monotonic())))
            if not keys or time.monotonic() >= deadline or self.process.poll() is not None:
                return keys
            requests = self.request("server/status", timeout=max(1.0, deadline - time.monotonic()))["requests"]
            with self.lock:
                count = self.count
            if requests["active"] == 0 and requests["queued"] == 0 and count == last_count + 1:
                return keys  # idle, and nothing but that status answer arrived since the last look
            last_count = count

    def call(self, method: str, params: Any = None, id_text: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        """One request with a fresh string id (or the given JSON id text); its response.
        `params` may be raw JSON text (a str), sent as it is."""
        id_text = id_text or json.dumps(f"{OWN_CALL_PREFIX}{next(self._calls)}")
        if params is not None and not isinstance(params, str):
            params = json.dumps(params)
        line = '{"jsonrpc":"2.0","id":%s,"method":%s%s}\n' % (
            id_text, json.dumps(method), "" if params is None else ',"params":' + params)
        key = key_of(loads_exact(id_text.encode()))
        self.write(line.encode())
        if self.wait_for([key], timeout):
            raise TimeoutError(f"no answer to {method} {id_text} within {timeout}s")
        with self.lock:
            return self.by_key[key].responses[0]

    def request(self, method: str, params: Any = None, timeout: float = 60.0) -> Any:
        response = self.call(method, params, timeout=timeout)
        assert "result" in response, response
        return plain(response["result"])

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> int:
        """shutdown, exit, wait; kills the process if it does not go."""
        try:
            if self.process.poll() is None:
                self.call("shutdown", timeout=timeout)
                self.write(b'{"jsonrpc":"2.0","method":"exit"}\n')
        except (OSError, TimeoutError):
            pass
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def internal_errors(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for seen in self.by_key.values() for r in seen.responses
                    if isinstance(r.get("error"), dict) and r["error"].get("code") == INTERNAL_ERROR]


def _is_response(message: Any) -> bool:
    return isinstance(message, dict) and message.get("jsonrpc") == "2.0" and "id" in message and (
        ("result" in message) != ("error" in message))


def well_formed_error(error: Any) -> bool:
    """Every error on the wire: an integer code, a non-empty message, a data object."""
    return (isinstance(error, dict) and isinstance(error.get("code"), int) and not isinstance(error.get("code"), bool)
            and isinstance(error.get("message"), str) and error["message"] != ""
            and isinstance(error.get("data"), dict))

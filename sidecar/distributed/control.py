"""The control link between rank 0 and each follower: ordered engine operations one way,
heartbeats both ways, one JSON object per line over TCP.

Rank 0 never waits on a collective to learn that a rank is gone: each link has a reader
thread (a closed connection is noticed at once), and a monitor thread pings every link and
declares a rank lost once it has been silent for the timeout (a stopped process, a cable
pulled). A follower answers pings from its reader thread, so a long step does not look like
a hang. An idle group sends one small ping per second per rank and nothing else.

One case needs more than a thread: a call into MLX that waits for its streams while holding
the GIL freezes every Python thread of rank 0, this monitor included, when a collective is
stuck on a silent peer. `mx.clear_cache`, which mlx-lm's decode loops call, was such a call;
it now waits with the GIL released first (engine/gil_waits.py). For any other, the monitor
keeps re-arming CPython's own C-level watchdog (`faulthandler`), which needs no GIL: if the
monitor misses its turns for the timeout and two heartbeats, the process dumps its threads'
stacks to stderr and exits (code 1), the client restarts it, and the followers it started go
with it (see lifeline.py). Only in that case do requests in flight see the exit rather than
-32019.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hmac
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .hostfile import Host

log = logging.getLogger("localmlx.group")

HEARTBEATS_PER_TIMEOUT = 5


@dataclass(frozen=True)
class RankLostInfo:
    rank: int
    host: str
    reason: str  # "exited" | "unresponsive" | "disconnected"
    detail: str

    def message(self) -> str:
        return f"Rank {self.rank} of the group ({self.host}) is lost: {self.detail}"


def _line(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


def _lines(sock: socket.socket) -> Any:
    """The messages arriving on `sock`, until it closes (then the generator ends)."""
    with sock.makefile("rb") as reader:
        for raw in reader:
            yield orjson.loads(raw)


@dataclass(eq=False)
class FollowerLink:
    """Rank 0's end of one follower's link."""

    host: Host
    process: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    last_seen: float = field(default_factory=time.monotonic)
    memory: dict[str, int] | None = None
    alive: bool = True
    loading_until: float = 0.0  # a load: it may be silent (busy loading) until then, or until it says it is done
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, data: bytes, wait: bool = True) -> bool:
        """False when the link's lock is taken and `wait` is False (the monitor never blocks)."""
        if not self.send_lock.acquire(blocking=wait):
            return False
        try:
            assert self.sock is not None  # sent to only once connected
            self.sock.sendall(data)
        finally:
            self.send_lock.release()
        return True

    def exit_status(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def describe(self, now: float) -> dict[str, Any]:
        return {"rank": self.host.rank, "host": self.host.ssh, "address": self.host.address, "alive": self.alive,
                "lastSeenMs": round((now - self.last_seen) * 1000, 3), "memory": self.memory}


class FollowerLinks:
    """All of rank 0's links: accept them, send to all in order, watch them."""

    def __init__(self, followers: list[Host], token: str, timeout_s: float,
                 on_lost: Callable[[RankLostInfo], None]) -> None:
        self.links = {host.rank: FollowerLink(host) for host in followers}
        self._token = token
        self._timeout = timeout_s
        self._on_lost = on_lost
        self._lost = threading.Event()  # set once the loss has been reported (see _lose)
        self._losing = threading.Lock()
        self._loss_reported = False
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._loads = threading.Condition()  # a follower said it has loaded

    def listen(self, address: str) -> int:
        """Listen on rank 0's own group address (never on every interface); the port."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, 0))
        self._listener.listen(len(self.links) + 4)
        return int(self._listener.getsockname()[1])

    def accept_all(self, deadline: float) -> list[FollowerLink]:
        """Wait for every follower to connect and prove the token; the links still missing
        at the deadline (or whose process has exited)."""
        listener = self._listener
        assert listener is not None  # listen() comes first
        while any(link.sock is None for link in self.links.values()):
            missing = [link for link in self.links.values() if link.sock is None]
            if time.monotonic() >= deadline or any(link.exit_status() is not None for link in missing):
                return missing
            listener.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            self._greet(sock)
        listener.close()
        return []

    def _greet(self, sock: socket.socket) -> None:
        sock.settimeout(5)
        try:
            hello = orjson.loads(sock.makefile("rb").readline())
            link = self.links.get(int(hello["rank"]))
            if link is None or link.sock is not None or not hmac.compare_digest(str(hello["token"]), self._token):
                raise ValueError("unknown rank or wrong token")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("refused a control connection: %s", exc)
            sock.close()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.sock = sock
        link.last_seen = time.monotonic()
        log.info("%s joined", link.host.describe())

    def watch(self) -> None:
        """Start the reader of every link and the monitor (and its backstop)."""
        self._arm_backstop(time.monotonic())
        for link in self.links.values():
            threading.Thread(target=self._read, args=(link,), name=f"rank-{link.host.rank}-link", daemon=True).start()
        threading.Thread(target=self._monitor, name="group-monitor", daemon=True).start()

    def send(self, message: dict[str, Any]) -> None:
        """To every follower, in rank order; a broken link is reported by its reader."""
        data = _line(message)
        for link in self.links.values():
            if link.alive:
                try:
                    link.send(data)
                except OSError as exc:
                    self._lose(link, "disconnected", f"sending to it failed: {exc}")

    def _read(self, link: FollowerLink) -> None:
        assert link.sock is not None
        detail = "its control connection closed"
        try:
            for message in _lines(link.sock):
                link.last_seen = time.monotonic()
                if "memory" in message:
                    link.memory = message["memory"]
                if "loaded" in message:
                    with self._loads:
                        link.loading_until = 0.0
                        self._loads.notify_all()
                    self._arm_backstop(time.monotonic())  # without the load's allowance now
                if "failed" in message:
                    detail = f"it failed: {message['failed']}"
        except (OSError, ValueError) as exc:
            detail = f"its control connection broke: {exc}"
        if self._closed.is_set():
            return
        if link.process is not None:  # a process that is exiting: let it finish, to say so
            with contextlib.suppress(subprocess.TimeoutExpired):
                link.process.wait(0.2)
        reason = "exited" if link.exit_status() is not None or detail.startswith("it failed") else "disconnected"
        self._lose(link, reason, detail)

    def expect_silence(self, seconds: float) -> None:
        """Loading holds a follower's GIL for seconds at a time (safetensors, the grammar
        tokenizer): a silence then is no fault, until it says it has loaded (or `seconds`
        pass). A closed link still is a fault at once."""
        for link in self.links.values():
            link.loading_until = time.monotonic() + seconds

    def wait_loaded(self) -> None:
        """Until every follower still alive has said it finished its load (or its allowance for
        silence ran out: the monitor then calls it lost)."""
        def done() -> bool:
            now = time.monotonic()
            return self._lost.is_set() or all(not link.alive or link.loading_until <= now
                                              for link in self.links.values())

        with self._loads:
            while not done():
                self._loads.wait(0.5)

    def wait_for_loss(self, seconds: float) -> bool:
        """Whether a link is (or within `seconds` turns out) lost: what made a collective fail."""
        return self._lost.wait(seconds)

    def _monitor(self) -> None:
        interval = self._timeout / HEARTBEATS_PER_TIMEOUT
        ping = 0
        last_turn = time.monotonic()
        while not self._closed.wait(interval):
            ping += 1
            now = time.monotonic()
            starved, last_turn = now - last_turn > 2 * interval, now
            self._arm_backstop(now)
            for link in self.links.values():
                if starved or now < link.loading_until:
                    # This process could not read the heartbeats (its own GIL was held), or a
                    # load is going on: count the silence from now.
                    link.last_seen = max(link.last_seen, now - interval)
                if not link.alive:
                    continue
                if now - link.last_seen > self._timeout:
                    self._lose(link, "unresponsive", f"no heartbeat for {now - link.last_seen:.1f} s")
                    continue
                with contextlib.suppress(OSError):  # its reader says why
                    link.send(_line({"ping": ping}), wait=False)

    def _arm_backstop(self, now: float) -> None:
        """Exit unless the monitor comes round again in time (a load may be silent longer)."""
        if self._closed.is_set():  # closing: cancelled for good
            return
        allowance = self._timeout * (1 + 2 / HEARTBEATS_PER_TIMEOUT)
        loading = max((link.loading_until - now for link in self.links.values()), default=0.0)
        faulthandler.dump_traceback_later(allowance + max(0.0, loading), exit=True)

    def _lose(self, link: FollowerLink, reason: str, detail: str) -> None:
        link.alive = False
        with self._losing:  # the sender and the monitor may both find the loss: one reports it
            if self._closed.is_set() or self._loss_reported:
                return
            self._loss_reported = True
        info = RankLostInfo(link.host.rank, link.host.ssh, reason, detail)
        log.error("%s", info.message())
        # Reported first, then waiters woken: the engine thread, woken in wait_for_loss, fails its
        # requests next, and their answers must reach the loop after the loss (-32019), not before.
        self._on_lost(info)
        self._lost.set()

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [link.describe(now) for link in self.links.values()]

    def close(self) -> None:
        """Followers exit when their link closes; one that cannot (stopped) is ended by its
        guard when its lifeline closes. Returns once each launcher has exited, which its guard
        does only after the follower is gone."""
        self._closed.set()
        faulthandler.cancel_dump_traceback_later()
        for link in self.links.values():
            if link.sock is not None:
                with contextlib.suppress(OSError):
                    link.sock.shutdown(socket.SHUT_RDWR)
                link.sock.close()
            if link.process is not None and link.process.stdin is not None:
                with contextlib.suppress(OSError):
                    link.process.stdin.close()
        for link in self.links.values():
            if link.process is not None:
                try:
                    link.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not exit; killing its launcher", link.host.describe())
                    link.process.kill()
                    link.process.wait()
        if self._listener is not None:
            self._listener.close()


class LeaderLink:
    """A follower's end: operations are queued for the main thread; pings are answered here
    at once with this rank's memory; when rank 0 goes, this process goes (nothing outlives
    the sidecar)."""

    def __init__(self, address: str, token: str, rank: int, memory: Callable[[], dict[str, int]]) -> None:
        self._address = address
        self._token = token
        self._rank = rank
        self._memory = memory
        self._ops: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def connect(self, deadline: float) -> None:
        host, _, port = self._address.rpartition(":")
        while True:
            try:
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=2)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._send({"rank": self._rank, "token": self._token})
        threading.Thread(target=self._read, name="leader-link", daemon=True).start()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._sock is not None
        with self._lock:
            self._sock.sendall(_line(message))

    def _read(self) -> None:
        assert self._sock is not None
        try:
            for message in _lines(self._sock):
                if "ping" in message:
                    self._send({"pong": message["ping"], "memory": self._memory()})
                else:
                    self._ops.put(message)
        except (OSError, ValueError):
            pass
        log.info("rank 0 is gone: exiting")
        os._exit(0)

    def next_op(self) -> dict[str, Any]:
        return self._ops.get()

    def report(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self._send(message)

    def report_failure(self, detail: str) -> None:
        self.report({"failed": detail})

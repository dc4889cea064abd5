"""Rank 0's view of the group: forming it (start the followers, wait for their links, then
mx.distributed.init with them), sending it engine operations, describing it, and losing it."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..settings import Settings
from . import launch
from .backend_env import apply_backend_env, backend_env, init_world
from .control import FollowerLinks, RankLostInfo
from .hostfile import GroupSpec

log = logging.getLogger("localmlx.group")

FORMATION_TIMEOUTS = 6  # forming may take this many heartbeat timeouts (SSH, imports, the ring)


class GroupFormationFailed(Exception):
    """The group could not be formed; the message names the host."""


class Group:
    """Formed on the engine thread (it calls mx.distributed.init); `send` from the engine
    thread only; `describe` from any thread."""

    def __init__(self, spec: GroupSpec, settings: Settings, on_lost: Callable[[RankLostInfo], None]) -> None:
        self.spec = spec
        self.settings = settings
        self.world: Any = None
        self._token = secrets.token_hex(16)  # the control link's proof; the ring itself has none
        self._links = FollowerLinks(list(spec.hosts[1:]), self._token, settings.distributed_timeout, on_lost)
        self._memory: Callable[[], dict[str, int]] | None = None

    @property
    def size(self) -> int:
        return self.spec.size

    def form(self) -> None:
        spec, settings = self.spec, self.settings
        deadline = time.monotonic() + max(10.0, FORMATION_TIMEOUTS * settings.distributed_timeout)
        leader = spec.hosts[0].address
        try:
            port = self._links.listen(leader)
        except OSError as exc:
            raise GroupFormationFailed(f"rank 0 cannot listen on {leader}, the first host's address in the "
                                       f"hostfile (it must be an address of this machine): {exc}") from None
        for host in spec.hosts[1:]:
            group_env = orjson.dumps({"leader": f"{leader}:{port}", "token": self._token, "rank": host.rank,
                                      "size": spec.size, "backend": spec.backend, "mode": spec.mode,
                                      "world": backend_env(spec)}).decode()
            argv = launch.launcher_argv(settings.distributed_launcher, host,
                                        launch.follower_command(spec, host, settings, group_env))
            log.info("starting %s", host.describe())
            try:
                self._links.links[host.rank].process = launch.start(argv)
            except OSError as exc:
                raise GroupFormationFailed(f"cannot start {host.describe()} with {argv[0]!r}: {exc}") from None
        waited = deadline - time.monotonic()
        missing = self._links.accept_all(deadline)
        if missing:
            raise GroupFormationFailed("; ".join(
                f"{link.host.describe()} " + (f"exited with code {link.exit_status()} before it joined"
                                              if link.exit_status() is not None else
                                              f"did not join within {waited:.0f} s") for link in missing))
        apply_backend_env(backend_env(spec), 0)
        done = threading.Event()
        threading.Thread(target=self._formation_watchdog, args=(done, deadline), daemon=True).start()
        self.world = init_world(spec.backend, spec.size)
        done.set()
        self._links.watch()
        log.info("group of %d formed (%s backend, %s parallel): %s", spec.size, spec.backend, spec.mode,
                 ", ".join(h.describe() for h in spec.hosts))

    def _formation_watchdog(self, done: threading.Event, deadline: float) -> None:
        """mx.distributed.init waits for every rank's connection without a timeout of its own."""
        if not done.wait(max(1.0, deadline - time.monotonic())):
            self.fail_to_form(GroupFormationFailed(
                f"the {self.spec.backend} backend did not connect the ranks in time (ports "
                f"{self.spec.port}..{self.spec.port + self.spec.size - 1} must be reachable between the hosts)"))

    def fail_to_form(self, error: BaseException) -> None:
        """Said on stderr for the client's start error, then the process ends (code 4):
        nothing in flight yet, and a wait in the backend cannot be interrupted."""
        self.close()
        self.fail_without_group(error)

    @staticmethod
    def fail_without_group(error: BaseException) -> None:
        print(f"localmlx: cannot form the group: {error}", file=sys.stderr, flush=True)
        os._exit(4)

    def wait_loaded(self) -> None:
        self._links.wait_loaded()

    def wait_for_loss(self, seconds: float) -> bool:
        return self._links.wait_for_loss(seconds)

    def send(self, op: dict[str, Any]) -> None:
        if op["op"] == "load":
            self._links.expect_silence(max(30.0, FORMATION_TIMEOUTS * self.settings.distributed_timeout))
        self._links.send(op)

    def describe(self, own_memory: dict[str, int] | None = None) -> dict[str, Any]:
        host0 = self.spec.hosts[0]
        ranks = [{"rank": 0, "host": host0.ssh, "address": host0.address, "alive": True, "lastSeenMs": 0.0,
                  "memory": own_memory}, *self._links.describe()]
        return {"size": self.spec.size, "rank": 0, "backend": self.spec.backend, "mode": self.spec.mode,
                "ranks": ranks}

    def close(self) -> None:
        self._links.close()

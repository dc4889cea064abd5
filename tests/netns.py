"""Several hosts on one Linux machine: network namespaces joined by a bridge.

``SimulatedHosts(n)`` makes hosts 0..n-1 on a private /24 (10.X.0.0/24). Host 0 is the root
namespace itself, at the bridge's address 10.X.0.1: whatever pytest or Node spawns normally
(the sidecar, rank 0) runs there. Hosts 1..n-1 are namespaces ``<prefix><i>``, each holding one
end of a veth pair (address 10.X.0.<i+1>, ``lo`` up) whose other end is a port of the bridge.
Traffic stays on links this harness makes: no route out of a namespace, nothing on eth0.

Names carry this process's pid and a per-process counter, so concurrent runs never clash; the
subnet X is picked under a machine-wide lock among those no interface holds. Everything made is
removed on exit, also after a failure: the processes still inside a namespace (SIGKILL), the
namespaces (which takes their veth ends, and so the pairs), the bridge. Leftovers of a process
that died without cleaning up (SIGKILL) are swept by the next run that finds its pid gone.

A rank inside namespace i is started with ``exec_prefix(i) + argv`` (``ip netns exec`` execs
the command in place, so the Popen's pid is the rank's pid); ``launcher()`` is the same as a
template with ``{rank}``, which is how the sidecar starts its followers. ``link_down(i)`` takes
host i's veth down: the "host loses its network" fault (no carrier: packets are dropped, so a
peer sees silence rather than a reset, as after a pulled cable).

``SimulatedHosts(n, delay_ms=d)`` adds d ms of one-way delay to every host's link (so d each
way between host 0 and host i): the link is then a pair of TAP devices whose frames
``tests/link_delay.py`` relays, since this kernel has no netem. Everything else is the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from sidecar.conversion import pid_alive
from sidecar.distributed.launch import killed_with_parent

_NAME_PREFIX = "lmh"  # every name this harness makes starts with it (links: <= 15 characters)
_NAME = re.compile(rf"^{_NAME_PREFIX}(\d+)([a-z])[nbhp]\d*$")
_LOCK_FILE = Path("/run/lock/localmlx-netns.lock")
_SUBNETS = range(100, 250)  # the X of 10.X.0.0/24
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """(True, "") when namespaces can really be made here, else (False, why not)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    probe = f"{_NAME_PREFIX}{os.getpid()}zn0"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


class SimulatedHosts:
    """``n`` hosts: the root namespace (host 0) and n-1 namespaces on one bridge."""

    def __init__(self, n: int, delay_ms: float = 0.0) -> None:
        if n < 1:
            raise ValueError("at least one host")
        self.n = n
        self.delay_ms = delay_ms
        self._relay: subprocess.Popen[str] | None = None  # the delayed links' relay, when delayed
        # A letter per instance: one process may hold several groups at once (2 and 3 hosts).
        self.tag = f"{os.getpid()}{chr(ord('a') + next(_counter) % 26)}"
        self.bridge = f"{_NAME_PREFIX}{self.tag}b"
        self.prefix = f"{_NAME_PREFIX}{self.tag}n"
        self.subnet = 0  # X, once made

    # ---- naming ---------------------------------------------------------------------------

    def namespace(self, i: int) -> str | None:
        """Host i's namespace; None for host 0 (the root namespace)."""
        self._check(i)
        return None if i == 0 else f"{self.prefix}{i}"

    def _veth(self, i: int) -> str:
        return f"{_NAME_PREFIX}{self.tag}h{i}"  # the bridge's end (veth or TAP); the namespace holds ...p{i}

    def _peer(self, i: int) -> str:
        return f"{_NAME_PREFIX}{self.tag}p{i}"

    def address(self, i: int) -> str:
        self._check(i)
        return f"10.{self.subnet}.0.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """What runs a command on host i: [] on host 0."""
        name = self.namespace(i)
        return [] if name is None else ["ip", "netns", "exec", name]

    def launcher(self) -> str:
        """Template for starting rank r's process on host r ("{rank}" is filled in)."""
        return f"ip netns exec {self.prefix}{{rank}}"

    def ring_hostfile(self, port: int) -> list[list[str]]:
        """The ring backend's host list (what ``mlx.launch`` writes to a file and names in
        MLX_HOSTFILE): one "ip:port" per rank. Only host 0 shares its port space with the
        machine: pick a port free there; the namespaces have their own."""
        return [[f"{self.address(i)}:{port}"] for i in range(self.n)]

    def write_ring_hostfile(self, path: Path | str, port: int) -> Path:
        """The file MLX_HOSTFILE names (MLX reads a path, not the JSON itself)."""
        path = Path(path)
        path.write_text(json.dumps(self.ring_hostfile(port)) + "\n", encoding="utf-8")
        return path

    def hostfile(self) -> list[dict[str, Any]]:
        """The ``mlx.launch`` hostfile: ssh name (the namespace; "localhost" for host 0), ips."""
        return [{"ssh": self.namespace(i) or "localhost", "ips": [self.address(i)]} for i in range(self.n)]

    def write_hostfile(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.hostfile(), indent=2) + "\n", encoding="utf-8")
        return path

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv on host i (the Popen's pid is the command's own: `ip netns exec` execs)."""
        return subprocess.Popen([*self.exec_prefix(i), *argv], **kwargs)

    def rank_process(self, i: int) -> int:
        """The pid of the rank on host i: the innermost Python process there (a follower runs
        as the child of its guard, see sidecar/distributed/lifeline.py)."""
        pythons = [pid for pid in self.pids(i) if b"python" in b"".join(command_line(pid)[:1])]
        parents = {_parent(pid) for pid in pythons}
        innermost = [pid for pid in pythons if pid not in parents]
        if not innermost:
            raise LookupError(f"no rank runs on host {i}")
        return innermost[-1]

    # ---- faults ---------------------------------------------------------------------------

    def link_down(self, i: int) -> None:
        """Host i loses its network: its link to the bridge goes down (no carrier)."""
        self._require_namespace(i)
        _ip("link", "set", self._veth(i), "down")

    def link_up(self, i: int) -> None:
        self._require_namespace(i)
        _ip("link", "set", self._veth(i), "up")

    def pids(self, i: int) -> list[int]:
        """Processes living in host i's namespace."""
        name = self._require_namespace(i)
        listed = _ip("netns", "pids", name, check=False)
        return [int(p) for p in listed.stdout.split()]

    # ---- making and removing ----------------------------------------------------------------

    def __enter__(self) -> SimulatedHosts:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cannot simulate hosts: {why}")
        sweep_stale()
        try:
            self._make()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._remove()

    def _make(self) -> None:
        _LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(_LOCK_FILE, "a") as lock:  # picking a subnet and claiming it is one step
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _free_subnet(os.getpid())
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.address(0)}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        if self.delay_ms > 0 and self.n > 1:
            self._start_relay()
        for i in range(1, self.n):
            name, peer = f"{self.prefix}{i}", self._peer(i)
            _ip("netns", "add", name)
            if self._relay is None:
                _ip("link", "add", self._veth(i), "type", "veth", "peer", "name", peer, "netns", name)
            else:  # the relay's TAP pair: its inner end moves into the namespace
                _ip("link", "set", peer, "netns", name)
            _ip("link", "set", self._veth(i), "master", self.bridge, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", peer)
            _ip("-n", name, "link", "set", peer, "up")

    def _start_relay(self) -> None:
        links = [f"{self._veth(i)}:{self._peer(i)}" for i in range(1, self.n)]
        self._relay = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("link_delay.py")), f"--delay-ms={self.delay_ms:g}", *links],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=killed_with_parent())  # gone with the harness, however it ends
        assert self._relay.stdout is not None
        if self._relay.stdout.readline() != "ready\n":
            raise RuntimeError("the link-delay relay did not start (see its stderr)")

    def _stop_relay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is None:
            return
        with contextlib.suppress(OSError):
            assert relay.stdin is not None
            relay.stdin.close()
        try:
            relay.wait(timeout=5)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()

    def _remove(self) -> None:
        self._stop_relay()  # its TAP devices go with it
        for i in range(1, self.n):
            _remove_namespace(f"{self.prefix}{i}")
            _ip("link", "del", self._veth(i), check=False)  # gone with its peer, unless never moved
        _ip("link", "del", self.bridge, check=False)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"host {i} of {self.n}")

    def _require_namespace(self, i: int) -> str:
        name = self.namespace(i)
        if name is None:
            raise ValueError("host 0 is the root namespace: it has no link of its own")
        return name


def command_line(pid: int) -> list[bytes]:
    """Process `pid`'s argv ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _free_subnet(pid: int) -> int:
    """An X such that no interface holds an address in 10.X.0.0/16, starting from the pid's."""
    used = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", _ip("-4", "addr").stdout)}
    start = pid % len(_SUBNETS)
    for k in range(len(_SUBNETS)):
        x = _SUBNETS[(start + k) % len(_SUBNETS)]
        if x not in used:
            return x
    raise RuntimeError("no free 10.X.0.0/24 subnet for simulated hosts")


def _remove_namespace(name: str) -> None:
    """SIGKILL whatever lives in it, wait (bounded) until it has gone, delete the namespace."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = _ip("netns", "pids", name, check=False)
        if listed.returncode != 0:
            return  # no such namespace
        pids = [int(p) for p in listed.stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.05)  # SIGKILL is asynchronous; zombies of our own children are not listed
    _ip("netns", "del", name, check=False)


def sweep_stale() -> None:
    """Remove what a run that died without cleaning up left behind (its pid is gone)."""
    names = _ip("netns", "list", check=False).stdout.split()
    links = re.findall(r"^\d+: ([^:@\s]+)", _ip("-o", "link", check=False).stdout, re.M)
    for name in names:
        match = _NAME.match(name)
        if match and not pid_alive(int(match.group(1))):
            _remove_namespace(name)
    for link in links:
        match = _NAME.match(link)
        if match and not pid_alive(int(match.group(1))):
            _ip("link", "del", link, check=False)

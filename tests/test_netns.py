"""The simulated-hosts harness itself (tests/netns.py), with real MLX across namespaces, and the
shardable copies of tests/distributed_models.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed_models import INDEX_FILE, safetensors_names, shardable_copy, sharding_modes
from tests.netns import SimulatedHosts, available

_OK, _WHY = available()
needs_namespaces = pytest.mark.skipif(not _OK, reason=f"no simulated hosts: {_WHY}")

# One rank of a ring: all_sum of (rank + 1) over the group, printed as JSON.
RING_RANK = """
import json, mlx.core as mx
group = mx.distributed.init(backend="ring", strict=True)
total = mx.distributed.all_sum(mx.array(group.rank() + 1.0), stream=mx.cpu).item()
print(json.dumps({"rank": group.rank(), "size": group.size(), "sum": total}), flush=True)
"""

# A TCP listener that says "ready" once bound, then accepts until killed.
LISTENER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    server.accept()[0].close()
"""


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def names_left(hosts: SimulatedHosts) -> list[str]:
    """Namespaces and links of this group that still exist."""
    stem = hosts.bridge[:-1]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    names += re.findall(r"^\d+: ([^:@\s]+)", links, re.M)
    return [name for name in names if name.startswith(stem)]


def run_ring(hosts: SimulatedHosts, directory: Path) -> list[dict]:
    ring = hosts.write_ring_hostfile(directory / "ring.json", free_port(hosts.address(0)))
    env = {**os.environ, "MLX_HOSTFILE": str(ring)}
    ranks = [hosts.popen(r, [sys.executable, "-c", RING_RANK], env={**env, "MLX_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(hosts.n)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, 9)
                rank.wait()
    for rank, (_out, err) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, err[-2000:]
    return [json.loads(out) for out, _ in outputs]


@needs_namespaces
@pytest.mark.parametrize("n", [2, 3])
def test_a_ring_all_sum_spans_the_hosts(n: int, tmp_path: Path) -> None:
    with SimulatedHosts(n) as hosts:
        results = run_ring(hosts, tmp_path)
    expected = n * (n + 1) / 2
    assert [r["rank"] for r in results] == list(range(n))
    assert all(r["size"] == n and r["sum"] == expected for r in results)


@needs_namespaces
def test_names_addresses_and_hostfile(tmp_path: Path) -> None:
    with SimulatedHosts(3) as hosts:
        assert hosts.exec_prefix(0) == [] and hosts.namespace(0) is None
        assert hosts.exec_prefix(2) == ["ip", "netns", "exec", hosts.namespace(2)]
        assert hosts.launcher().format(rank=1).split() == hosts.exec_prefix(1)
        written = json.loads(hosts.write_hostfile(tmp_path / "hosts.json").read_text())
        assert written == [{"ssh": "localhost", "ips": [hosts.address(0)]},
                           {"ssh": hosts.namespace(1), "ips": [hosts.address(1)]},
                           {"ssh": hosts.namespace(2), "ips": [hosts.address(2)]}]
        assert len({hosts.address(i) for i in range(3)}) == 3
        inside = subprocess.run([*hosts.exec_prefix(1), "ip", "-4", "-o", "addr"], capture_output=True,
                                text=True, check=True).stdout
        assert hosts.address(1) in inside and "127.0.0.1" in inside  # lo is up too
        with SimulatedHosts(2) as other:  # two groups at once: their own names and subnet
            assert other.bridge != hosts.bridge and other.address(0) != hosts.address(0)


@needs_namespaces
def test_link_down_cuts_a_host_off_and_link_up_restores_it() -> None:
    with SimulatedHosts(2) as hosts:
        address, port = hosts.address(1), 7000
        listener = hosts.popen(1, [sys.executable, "-c", LISTENER, address, str(port)],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
            socket.create_connection((address, port), timeout=5).close()
            hosts.link_down(1)
            with pytest.raises(OSError):  # dropped (a timeout) or unreachable, never accepted
                socket.create_connection((address, port), timeout=1).close()
            hosts.link_up(1)
            socket.create_connection((address, port), timeout=10).close()
        finally:
            listener.kill()
            listener.wait()


def sleeper(hosts: SimulatedHosts, i: int) -> subprocess.Popen[str]:
    """A process in host i's namespace, returned once it runs there."""
    process = hosts.popen(i, ["sh", "-c", "echo ready; exec sleep 600"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


@needs_namespaces
def test_teardown_leaves_no_namespace_link_or_process() -> None:
    with SimulatedHosts(3) as hosts:
        sleepers = [sleeper(hosts, i) for i in (1, 2)]
        assert all(s.pid in hosts.pids(i) for i, s in zip((1, 2), sleepers, strict=True))
        assert len(names_left(hosts)) == 1 + 2 + 2  # bridge, two namespaces, two veth ends
    assert names_left(hosts) == []
    assert [s.wait(timeout=10) for s in sleepers] == [-9, -9]


@needs_namespaces
def test_teardown_also_after_a_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), SimulatedHosts(2) as hosts:
        inside = sleeper(hosts, 1)
        raise RuntimeError("boom")
    assert names_left(hosts) == []
    assert inside.wait(timeout=10) == -9


def test_a_shardable_copy_links_the_files_and_indexes_every_tensor(demo_model_path: Path, tmp_path: Path) -> None:
    copy = shardable_copy(demo_model_path, tmp_path / "demo")
    weights = copy / "model.safetensors"
    assert weights.stat().st_ino == (demo_model_path / "model.safetensors").stat().st_ino  # linked, not copied
    index = json.loads((copy / INDEX_FILE).read_text())
    assert index["weight_map"] == {name: "model.safetensors" for name in safetensors_names(weights)}
    made = (copy / INDEX_FILE).stat().st_ino
    assert shardable_copy(demo_model_path, tmp_path / "demo") == copy
    assert (copy / INDEX_FILE).stat().st_ino == made  # already there: kept as it was
    assert sharding_modes(copy) == {"tensor"}  # a llama: no pipeline in mlx-lm 0.32


# Echoes what it reads on one connection, after saying "ready" once bound.
ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
peer = server.accept()[0]
peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := peer.recv(65536):
    peer.sendall(data)
"""


def round_trips_ms(hosts: SimulatedHosts, i: int, count: int = 20) -> list[float]:
    """Round trips of a small message from host 0 to an echo on host i."""
    address, port = hosts.address(i), 7001
    echo = hosts.popen(i, [sys.executable, "-c", ECHO, address, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
        times = []
        with socket.create_connection((address, port), timeout=10) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                started = time.perf_counter()
                connection.sendall(b"x" * 64)
                received = 0
                while received < 64:
                    received += len(connection.recv(64))
                times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        echo.kill()
        echo.wait()


@needs_namespaces
def test_a_delayed_link_adds_its_delay_each_way_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with SimulatedHosts(3, delay_ms=1.5) as hosts:
        relay = hosts._relay
        assert relay is not None and relay.poll() is None
        # The relay never forwards a frame early: every round trip pays the delay twice.
        assert min(round_trips_ms(hosts, 1)) >= 3.0
        results = run_ring(hosts, tmp_path)  # MLX's ring works across the delayed links
        assert all(r["sum"] == 6 for r in results)
        assert len(names_left(hosts)) == 1 + 2 + 2  # bridge, two namespaces, two TAP ends
    assert names_left(hosts) == []
    assert relay.wait(timeout=10) is not None

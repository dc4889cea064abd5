"""A follower's guard (sidecar/distributed/lifeline.py), with real processes: the follower is
ended when its lifeline (stdin) closes, also while stopped; the guard exits with the follower's
status; without a lifeline there is no guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from sidecar.conversion import pid_alive

# Stands in for `python -m sidecar follower`: the guard first, then say who runs, then `then`.
FOLLOWER = """
import os, signal, sys
from sidecar.distributed.lifeline import run_under_a_guard
run_under_a_guard()
print(os.getpid(), flush=True)
{then}
"""


def start(then: str, stdin: int = subprocess.PIPE) -> tuple[subprocess.Popen[str], int]:
    launched = subprocess.Popen([sys.executable, "-c", FOLLOWER.format(then=then)], stdin=stdin,
                                stdout=subprocess.PIPE, text=True)
    assert launched.stdout is not None
    return launched, int(launched.stdout.readline())


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a process's state in /proc")
def test_a_stopped_follower_is_ended_when_its_lifeline_closes() -> None:
    launched, follower = start("os.kill(os.getpid(), signal.SIGSTOP)")
    assert follower != launched.pid  # it runs under its guard, the launched process
    deadline = time.monotonic() + 10
    while not stopped(follower) and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the stop to land
    assert stopped(follower)
    assert launched.stdin is not None
    launched.stdin.close()  # rank 0 is gone
    assert launched.wait(timeout=10) == 128 + signal.SIGKILL
    assert not pid_alive(follower)


def test_the_guard_exits_with_the_follower_and_keeps_no_process() -> None:
    launched, follower = start("sys.exit(7)")
    assert launched.wait(timeout=10) == 7  # while rank 0 still holds the lifeline
    assert not pid_alive(follower)


def test_without_a_lifeline_the_follower_runs_unguarded() -> None:
    launched, follower = start("sys.exit(0)", stdin=subprocess.DEVNULL)
    assert follower == launched.pid
    assert launched.wait(timeout=10) == 0

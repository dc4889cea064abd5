"""A follower's lifeline: rank 0 holds the write end of each follower's stdin for as long as it
lives, and writes nothing. When rank 0 goes, however it goes, the follower's stdin reaches its
end, also on another host: ssh passes the end of its input on, and ssh itself goes with rank 0.

A running follower would notice rank 0's departure on its control link anyway. A stopped one
(SIGSTOP, a debugger) cannot notice anything, and sshd does not end the commands of a session
without a terminal when the session closes: it would hold its share of the model on that Mac
until someone killed it. So the follower runs as the child of a small guard, the process the
launcher started, which waits on the lifeline and on the follower at once, kills the follower
(SIGKILL reaches a stopped process) when the lifeline ends, and exits with the follower's
status when the follower ends first. The launcher's process, and so the SSH session, ends
only once the follower is gone.
"""

from __future__ import annotations

import os
import select
import signal
import stat

from .launch import killed_with_parent

LIFELINE_FD = 0


def run_under_a_guard() -> None:
    """Call first thing in a follower, while it has one thread. Returns in the follower; the
    guard never returns. Without a lifeline (stdin a terminal or /dev/null: started by hand,
    or by a launcher that does not pass stdin on) the follower runs unguarded."""
    if not _is_lifeline(LIFELINE_FD):
        return
    follower_alive, follower_end = os.pipe()  # the follower holds follower_end until it dies
    die_with_guard = killed_with_parent()
    child = os.fork()
    if child == 0:
        os.close(follower_alive)
        if die_with_guard is not None:
            die_with_guard()  # Linux: a guard killed outright takes the follower with it
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, LIFELINE_FD)  # the guard alone watches the lifeline
        os.close(devnull)
        return
    os.close(follower_end)
    os._exit(_guard(child, follower_alive))


def _is_lifeline(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _guard(follower: int, follower_alive: int) -> int:
    """Wait (no polling) until the follower ends or the lifeline does; the follower's exit code."""
    while True:
        ready, _, _ = select.select([LIFELINE_FD, follower_alive], [], [])
        if follower_alive in ready:
            break
        if not os.read(LIFELINE_FD, 512):  # rank 0 is gone
            os.kill(follower, signal.SIGKILL)
            break
    _, status = os.waitpid(follower, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code

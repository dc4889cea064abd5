"""Starting a follower on its host, as mlx.launch does: a shell command over SSH (or through
whatever LOCALMLX_DISTRIBUTED_LAUNCHER names), with the environment written into it, since
SSH passes none."""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable

from ..settings import Settings, env_from_settings
from .hostfile import GroupSpec, Host

FOLLOWER_ENV = "LOCALMLX_GROUP"
PR_SET_PDEATHSIG = 1


def follower_command(spec: GroupSpec, host: Host, settings: Settings, group_env: str) -> str:
    """The shell command that runs rank `host.rank`: the same Python, in the same directory when
    it exists there, with the sidecar's settings and the group's description."""
    env = {k: v for k, v in env_from_settings(settings).items() if v}
    env.update(item.partition("=")[::2] for item in spec.envs if "=" in item)
    env[FOLLOWER_ENV] = group_env
    env["MLX_RANK"] = str(host.rank)
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()))
    cwd = shlex.quote(os.getcwd())
    return f"cd {cwd} 2>/dev/null; exec env {assignments} {shlex.quote(sys.executable)} -m sidecar follower"


def launcher_argv(template: str, host: Host, command: str) -> list[str]:
    """The launcher, filled in for `host`, then the command: one argument for ssh (the remote
    shell reads it), through `sh -c` for anything local (ip netns exec, sudo -u, ...)."""
    prefix = shlex.split(template.format(rank=host.rank, ssh=host.ssh, ip=host.address))
    if prefix and os.path.basename(prefix[0]) == "ssh":
        return [*prefix, command]
    return [*prefix, "sh", "-c", command]


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    """Its stdout is not ours (ours is the wire); its log goes to our stderr, for the client's
    log. Its own session: a signal meant for the sidecar's group does not reach it first. Its
    stdin is the follower's lifeline (see lifeline.py): a pipe that this process holds open and
    never writes, so that the follower is ended when rank 0 goes, on any host, even stopped.
    On Linux the launcher itself is also killed when rank 0 dies."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=None,
                            start_new_session=True, preexec_fn=killed_with_parent())


def killed_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child SIGKILLed when this process dies (Linux; None
    elsewhere). prctl is looked up here: the child, forked from a threaded process, only calls it."""
    prctl = _prctl()
    if prctl is None:
        return None

    def ask_for_sigkill() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return ask_for_sigkill


@functools.cache
def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function: Callable[[int, int], int] = ctypes.CDLL(None).prctl
    return function

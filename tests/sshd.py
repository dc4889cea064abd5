"""A real OpenSSH server on a simulated host, so a group can be started the way users start it:
rank 0 runs the stock `ssh` client, and the host's `sshd` runs the follower under a shell.

``SshServers(hosts, root)`` starts `sshd` in each namespace of ``hosts`` (tests/netns.py), on
that host's address only, with its own host key, a key pair made for the test, and no other
way in; ``ssh_config`` is the client configuration that reaches host i by the name ``host<i>``.
Nothing outside ``root`` is written, nothing is installed: ``available()`` says whether this
machine has `sshd` at all (Debian: openssh-server) and the privilege-separation user it needs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.netns import SimulatedHosts, command_line

SSHD = "/usr/sbin/sshd"


def available() -> tuple[bool, str]:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return False, "no OpenSSH server and client here (Debian: apt-get install openssh-server)"
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        return False, "no `sshd` user for OpenSSH's privilege separation"
    return True, ""


class SshServers:
    def __init__(self, hosts: SimulatedHosts, root: Path) -> None:
        self.hosts = hosts
        self.root = root
        self.ssh_config = root / "ssh_config"
        self._servers: list[subprocess.Popen[bytes]] = []

    def launcher(self) -> str:
        """The sidecar's default launcher, told where this test's client configuration is."""
        return f"ssh -F {self.ssh_config} -o BatchMode=yes -o ConnectTimeout=10 {{ssh}}"

    def hostfile_names(self) -> list[dict[str, object]]:
        """The hostfile with SSH names (`host<i>`, resolved by ssh_config), not addresses."""
        entries = self.hosts.hostfile()
        return [dict(entry, ssh="localhost" if i == 0 else f"host{i}") for i, entry in enumerate(entries)]

    def __enter__(self) -> SshServers:
        key, host_key = self.root / "id_ed25519", self.root / "host_ed25519"
        for path in (key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        (self.root / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        client = ["Host *", f"  IdentityFile {key}", "  IdentitiesOnly yes", "  User root",
                  "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR"]
        for i in range(1, self.hosts.n):
            client += [f"Host host{i}", f"  HostName {self.hosts.address(i)}"]
        self.ssh_config.write_text("\n".join(client) + "\n")
        for i in range(1, self.hosts.n):
            config = self.root / f"sshd_config{i}"
            config.write_text("\n".join([
                f"ListenAddress {self.hosts.address(i)}", f"HostKey {host_key}",
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}", f"PidFile {self.root / f'sshd{i}.pid'}",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "LogLevel ERROR"]) + "\n")
            self._servers.append(self.hosts.popen(i, [SSHD, "-D", "-e", "-f", str(config)]))
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        for i in range(1, self.hosts.n):
            while True:
                probe = subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                                        "-o", "ConnectTimeout=2", f"host{i}", "true"], capture_output=True)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on host {i} does not answer: {probe.stderr.decode()[-300:]}")
                time.sleep(0.1)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for server in self._servers:
            server.kill()
            server.wait()

    def followers(self, i: int) -> list[int]:
        """The sidecar processes on host i (sshd itself and its sessions' shells aside)."""
        return [pid for pid in self.hosts.pids(i) if {b"sidecar", b"follower"} <= set(command_line(pid))]

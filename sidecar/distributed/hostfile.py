"""The group's hosts, from mlx.launch's hostfile JSON, checked before anything is started."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import Settings


class GroupConfigError(Exception):
    """A hostfile or setting that cannot make a group; the message says which and why."""


@dataclass(frozen=True)
class Host:
    rank: int
    ssh: str  # the name to reach it by over SSH
    ips: tuple[str, ...]  # where its ring connections go
    rdma: tuple[Any, ...]  # jaccl: the RDMA device towards each other rank (None for itself)

    @property
    def address(self) -> str:
        return self.ips[0] if self.ips else self.ssh

    def describe(self) -> str:
        return f"rank {self.rank} ({self.ssh}, {self.address})" if self.address != self.ssh else f"rank {self.rank} ({self.ssh})"


@dataclass(frozen=True)
class GroupSpec:
    hosts: tuple[Host, ...]
    backend: str  # "ring" or "jaccl": "any" resolved by what the hostfile gives
    mode: str  # "tensor" or "pipeline"
    port: int
    envs: tuple[str, ...]  # the hostfile's "envs": set on every rank

    @property
    def size(self) -> int:
        return len(self.hosts)

    def ring_hostfile(self) -> str:
        """MLX_HOSTFILE for the ring backend: each rank's "ip:port" (as mlx.launch writes it)."""
        return json.dumps([[f"{host.ips[0]}:{self.port + host.rank}"] for host in self.hosts])

    def rdma_devices(self) -> str:
        return json.dumps([list(host.rdma) for host in self.hosts])


def read_group(settings: Settings) -> GroupSpec | None:
    """The group LOCALMLX_HOSTFILE describes, or None (one machine)."""
    path = settings.hostfile
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise GroupConfigError(f"cannot read the hostfile {path}: {exc}") from None
    backend_wanted = settings.distributed_backend
    envs: list[str] = []
    if isinstance(data, dict):
        envs = list(data.get("envs") or [])
        backend_wanted = data.get("backend") or backend_wanted
        data = data.get("hosts")
    if not isinstance(data, list) or len(data) < 2:
        raise GroupConfigError(f"the hostfile {path} must list at least 2 hosts (mlx.launch's format: "
                               '[{"ssh": "mini.local", "ips": ["10.0.0.1"]}, ...])')
    hosts = tuple(_host(rank, entry, path) for rank, entry in enumerate(data))
    backend = _backend(backend_wanted, hosts)
    if backend == "ring":
        missing = [h.describe() for h in hosts if not h.ips]
        if missing:
            raise GroupConfigError(f"the ring backend needs an IP address for every host: none for {', '.join(missing)}")
    if not settings.distributed_allow_public:
        public = [f"{h.describe()}: {ip}" for h in hosts for ip in h.ips if _is_public(ip)]
        if public:
            raise GroupConfigError(
                "the hostfile names an address on a public network (" + "; ".join(public) + "): the ring "
                "backend has no authentication, so keep the group on a Thunderbolt bridge or a private LAN, "
                "or set LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC=true")
    return GroupSpec(hosts, backend, settings.distributed_mode, settings.distributed_port, tuple(envs))


def _host(rank: int, entry: Any, path: Path) -> Host:
    if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
        raise GroupConfigError(f"host {rank} of the hostfile {path} needs an \"ssh\" name")
    ips = entry.get("ips") or []
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise GroupConfigError(f"host {rank} of the hostfile {path}: \"ips\" must be a list of addresses")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise GroupConfigError(f"host {rank} of the hostfile {path}: {ip!r} is not an IP address") from None
    return Host(rank, entry["ssh"], tuple(ips), tuple(entry.get("rdma") or ()))


def _backend(wanted: str, hosts: tuple[Host, ...]) -> str:
    has_rdma = all(len(h.rdma) == len(hosts) for h in hosts)
    if wanted == "any":
        return "jaccl" if has_rdma else "ring"
    if wanted == "jaccl" and not has_rdma:
        raise GroupConfigError("the jaccl backend needs an \"rdma\" list (one device per rank) for every host: "
                               "write the hostfile with mlx.distributed_config --backend jaccl")
    if wanted not in ("ring", "jaccl"):
        raise GroupConfigError(f"unknown distributed backend {wanted!r} (ring, jaccl or any)")
    return wanted


def _is_public(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return not (address.is_private or address.is_loopback or address.is_link_local)

"""Rank 0 joins its group: the one place the session, the engine and the group meet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..engine import Engine, operations
from ..engine.registry import ModelOptions, Sharding
from ..hub import ModelLocation
from ..settings import Settings
from .control import RankLostInfo
from .group import Group, GroupFormationFailed
from .hostfile import GroupConfigError, read_group


def joiner(settings: Settings, on_lost: Callable[[RankLostInfo], None]) -> Callable[[Engine], Group]:
    """What the engine runs first on its thread: form the group (or end the process, saying
    why on stderr, for the client's start error), then make the engine its rank 0."""
    def join(engine: Engine) -> Group:
        try:
            spec = read_group(settings)
        except GroupConfigError as exc:
            spec = None
            Group.fail_without_group(exc)
        assert spec is not None  # LOCALMLX_HOSTFILE is set, or the engine would not join a group
        group = Group(spec, settings, on_lost)
        try:
            group.form()
        except (GroupFormationFailed, OSError, RuntimeError, ValueError) as exc:
            group.fail_to_form(exc)
        host0 = spec.hosts[0]

        def announce_load(location: ModelLocation, path: Path, options: ModelOptions) -> None:
            group.send(operations.load(location, path, options))

        def diverged(detail: str) -> None:
            # A collective fails when a peer is gone: its link says so within moments, and
            # that is the cause to report; otherwise rank 0 itself failed.
            if not group.wait_for_loss(min(2.0, settings.distributed_timeout)):
                on_lost(RankLostInfo(0, host0.ssh, "failed", detail))

        engine.registry.sharding = Sharding(group.world, spec.mode, announce_load, diverged, group.wait_loaded)
        engine.scheduler.mirror = group
        return group

    return join

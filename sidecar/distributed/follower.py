"""`python -m sidecar follower`: one rank of a group, started by rank 0 (never by hand).

It connects its control link to rank 0, joins mx.distributed, and applies rank 0's operations
one after another. It waits on the link when there is nothing to do (idle is idle), answers
heartbeats from the link's own thread, and exits when rank 0 goes or when an operation fails
here (rank 0 then sees the failure and ends the group): a rank never lives on alone.
"""

from __future__ import annotations

import logging
import os
import time

import orjson

from ..blas import use_best_blas
from ..engine.memory import memory_snapshot
from ..engine.registry import Sharding
from ..errors import brief
from ..logs import configure_logging
from ..settings import settings_from_env
from .backend_env import apply_backend_env, init_world
from .control import LeaderLink
from .launch import FOLLOWER_ENV
from .mirror import Replica

log = logging.getLogger("localmlx.follower")

CONNECT_TIMEOUT_S = 30.0


def run_follower() -> None:
    settings = settings_from_env()
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("localmlx.engine").setLevel(logging.WARNING)  # rank 0 logs each request already
    use_best_blas(settings.blas)  # before MLX is imported (init_world): its CPU kernels bind to it then
    group = orjson.loads(os.environ[FOLLOWER_ENV])
    rank = int(group["rank"])
    link = LeaderLink(group["leader"], group["token"], rank, memory_snapshot)
    link.connect(time.monotonic() + CONNECT_TIMEOUT_S)
    apply_backend_env(group["world"], rank)
    world = init_world(group["backend"], int(group["size"]))
    replica = Replica(settings.with_overrides(enable_cache=False), Sharding(world, group["mode"]),
                      loaded=lambda name: link.report({"loaded": name}))
    log.info("rank %d of %d joined (%s backend, %s parallel)", rank, world.size(), group["backend"], group["mode"])
    while True:
        op = link.next_op()
        try:
            replica.apply(op)
        except Exception as exc:
            log.exception("rank %d: %s failed", rank, op.get("op"))
            link.report_failure(f"{op.get('op')} failed on rank {rank}: {brief(exc)}")
            logging.shutdown()
            os._exit(1)

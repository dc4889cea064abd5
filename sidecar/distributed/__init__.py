"""One model over several machines, on mlx.distributed.

The sidecar that the client spawns is rank 0: the only process that speaks JSON-RPC. It starts
the other ranks itself (`launch`), over SSH as `mlx.launch` does, so that the group lives and
dies with it: a restart of the sidecar re-forms the group, and no rank outlives it, stopped
or not (`lifeline`). Each follower holds a shard of every loaded model and replays, in order,
the engine operations that rank 0 sends it over a control link (`control`), so every rank runs
the same collectives in the same order (`mirror`). The same link carries heartbeats: a rank that dies, hangs or loses its
network is noticed without waiting in a collective, and an idle group sends nothing but them.
"""

"""Every protocol/vectors transcript, replayed against a freshly spawned sidecar."""

from __future__ import annotations

import pytest

from .vectors import Replayer, load_vectors

VECTORS = load_vectors()


def test_vectors_exist() -> None:
    assert len(VECTORS) >= 10
    assert len({v["name"] for v in VECTORS}) == len(VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict, sidecars) -> None:
    client = sidecars.spawn(initialize=False, **vector.get("env", {}))
    Replayer(client).run(vector)
    client.process.stdin.close()
    assert client.process.wait(10) == 0

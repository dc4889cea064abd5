"""Shared fixtures: one demo model per test session, and real sidecar processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model

if TYPE_CHECKING:
    from sidecar.engine.registry import LoadedModel


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    build_demo_model(path / DEMO_MODEL_DIRNAME)
    return path


@pytest.fixture(scope="session")
def demo_model_path(models_dir: Path) -> Path:
    return models_dir / DEMO_MODEL_DIRNAME


@pytest.fixture(scope="module")
def demo(models_dir: Path) -> LoadedModel:
    """The demo model loaded in this process, as the engine holds it (MLX imported here)."""
    from sidecar.engine.registry import ModelOptions, ModelRegistry
    from sidecar.hub import ModelLocator
    from sidecar.settings import Settings

    settings = Settings(models_dir=models_dir, prefix_cache=False)
    location = ModelLocator(settings).resolve("demo")
    return ModelRegistry(settings).load(location, location.path, ModelOptions(), lambda *_, **__: None)


@pytest.fixture(scope="session")
def sidecar_env(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"LOCALMLX_MODELS_DIR": str(models_dir),
            "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hf-cache")),
            "HF_HUB_OFFLINE": "1", "LOCALMLX_LOG_LEVEL": "INFO"}


class Sidecars:
    """Spawns sidecars for one test and reaps every one of them afterwards."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.spawned: list[SidecarClient] = []

    def spawn(self, initialize: bool = True, args: list[str] | None = None, **env: str) -> SidecarClient:
        client = SidecarClient(args or sidecar_command(), env={**self.env, **env})
        self.spawned.append(client)
        if initialize:
            client.initialize(name="pytest")
        return client

    def reap(self) -> None:
        for client in self.spawned:
            if client.process.poll() is None:
                client.process.kill()
                client.process.wait()


@contextlib.contextmanager
def serving(env: dict[str, str]) -> Iterator[SidecarClient]:
    """One initialized sidecar for a module's tests: afterwards it must have written nothing
    but protocol and exit 0 when closed."""
    spawner = Sidecars(env)
    try:
        client = spawner.spawn()
        yield client
        assert client.junk == [], f"non-protocol bytes on stdout: {client.junk[:3]}"
        assert client.close() == 0
    finally:
        spawner.reap()


@pytest.fixture
def sidecars(sidecar_env: dict[str, str]) -> Iterator[Sidecars]:
    spawner = Sidecars(sidecar_env)
    try:
        yield spawner
    finally:
        spawner.reap()


@pytest.fixture
def sidecar(sidecars: Sidecars) -> Iterator[SidecarClient]:
    """An initialized sidecar; afterwards it must have written nothing but protocol and
    must exit 0 on shutdown + exit."""
    client = sidecars.spawn()
    yield client
    assert client.junk == [], f"non-protocol bytes on stdout: {client.junk[:3]}"
    assert client.close() == 0


def chat_params(content: str = "Tell me about the sea.", **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


os.environ.setdefault("PYTHONUNBUFFERED", "1")


# ---- reading a transcript ----------------------------------------------------------------------


def chunks_of(client: SidecarClient, id_) -> list[dict]:
    return [r.message["params"] for r in client.received
            if r.message.get("method") == "generate/chunk" and r.message["params"]["requestId"] == id_]


def arrival(client: SidecarClient, id_, first_chunk: bool = False) -> int:
    """Index in the transcript of a request's first chunk, or of its response."""
    for index, received in enumerate(list(client.received)):
        message = received.message
        if first_chunk and message.get("method") == "generate/chunk" and message["params"]["requestId"] == id_:
            return index
        if not first_chunk and message.get("id") == id_ and "method" not in message:
            return index
    raise AssertionError(f"nothing for {id_}")


def streamed_text(client: SidecarClient, id_) -> str:
    chunks = chunks_of(client, id_)
    assert [c["seq"] for c in chunks] == list(range(len(chunks))), "seq must count from 0 without gaps"
    return "".join(c["text"] for c in chunks)

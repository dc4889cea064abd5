"""The Session driven in this process, through two pipes, as the MCP SDK's in-memory session
tests drive theirs: the same code that serves a child's stdin and stdout (reader thread,
task group, in-flight requests, the engine thread with real MLX and the demo model), with no
process to spawn, so each test takes milliseconds to a second."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sidecar.jsonrpc import parse_json
from sidecar.protocol_defs import (
    BUSY,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_INITIALIZED,
    PROTOCOL_VERSION,
    REQUEST_CANCELLED,
    SERVER_CANCELLED,
)
from sidecar.session import Session
from sidecar.settings import Settings
from sidecar.transport import encode_message

from .conftest import chat_params
from .families import build_embedding_model

pytestmark = pytest.mark.anyio
LONG = chat_params("Tell me everything.", maxTokens=1900, stream=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Peer:
    """The client's ends of the two pipes, in the test's event loop."""

    def __init__(self, session: Session, to_session: int, from_session: int) -> None:
        self.session = session
        self.to_session = to_session
        self.from_session = from_session
        self.received: list[Any] = []  # every message, in the order it was written
        self.exit_code: int | None = None
        self._buffer = b""
        self._ids = 0
        self._taken: set[int] = set()  # indexes of responses returned

    def send(self, *messages: Any) -> None:
        """Lines written at once, in one write: the session reads them back to back."""
        os.write(self.to_session, b"".join(encode_message(m) for m in messages))

    def request(self, method: str, params: dict[str, Any] | None = None, id: Any = None) -> Any:
        self._ids += 1
        id = f"r{self._ids}" if id is None else id
        self.send({"jsonrpc": "2.0", "id": id, "method": method, **({"params": params} if params else {})})
        return id

    def cancel_message(self, id_: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": id_}}

    async def response(self, id_: Any) -> dict[str, Any]:
        """The next response to `id_` not returned before (a refused duplicate has one too)."""
        while True:
            for index, message in enumerate(self.received):
                if index not in self._taken and isinstance(message, dict) and "method" not in message \
                        and message.get("id") == id_:
                    self._taken.add(index)
                    return message
            await self.read()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.response(self.request(method, params))

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        response = await self.call(method, params)
        assert "result" in response, response
        return response["result"]

    async def read(self) -> None:
        """At least one more line."""
        while b"\n" not in self._buffer:
            await anyio.wait_readable(self.from_session)
            data = os.read(self.from_session, 1 << 16)
            if not data:
                raise EOFError("the session closed the wire")
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.received.extend(parse_json(line, exact_ids=False) for line in lines)

    async def chunks_arrive(self, id_: Any) -> None:
        while not self.chunks(id_):
            await self.read()

    def chunks(self, id_: Any) -> list[dict[str, Any]]:
        return [m["params"] for m in self.received
                if isinstance(m, dict) and m.get("method") == "generate/chunk" and m["params"]["requestId"] == id_]

    def index_of_response(self, id_: Any) -> int:
        return next(i for i, m in enumerate(self.received) if isinstance(m, dict) and "method" not in m
                    and m.get("id") == id_)

    def close_input(self) -> None:
        if self.to_session >= 0:
            os.close(self.to_session)
            self.to_session = -1


@contextlib.asynccontextmanager
async def in_process(settings: Settings, initialize: bool = True) -> AsyncIterator[Peer]:
    """A Session in this event loop; on the way out its input is closed and it must have exited."""
    session_in, to_session = os.pipe()
    from_session, session_out = os.pipe()
    os.set_blocking(from_session, False)
    session = Session(settings, wire_fd=session_out, read_fd=session_in, parent_pid=1, stop_signals=())
    peer = Peer(session, to_session, from_session)
    readers_before = {t for t in threading.enumerate() if t.name == "wire-reader"}

    async def serve() -> None:
        peer.exit_code = await session.run()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            if initialize:
                await peer.result("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "in-process"}})
            yield peer
            peer.close_input()  # end of input: the session exits
            with anyio.fail_after(10):
                while peer.exit_code is None:
                    await anyio.sleep(0.005)
    finally:
        peer.close_input()
        for reader in {t for t in threading.enumerate() if t.name == "wire-reader"} - readers_before:
            reader.join(5)  # it has seen the end of input: its fd may close
        for fd in (session_in, from_session, session_out):
            os.close(fd)


@pytest.fixture
def settings(models_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, temperature=0.0)


# ---- dispatch and lifecycle ------------------------------------------------------------------


async def test_lifecycle_refusals_unknown_methods_and_batches(settings: Settings) -> None:
    async with in_process(settings, initialize=False) as peer:
        with anyio.fail_after(30):
            early = await peer.call("models/list")
            assert early["error"]["code"] == NOT_INITIALIZED and early["error"]["data"] == {"method": "models/list"}
            assert await peer.result("ping") == {}  # served before initialize
            await peer.result("initialize", {"protocolVersion": PROTOCOL_VERSION})
            again = await peer.call("initialize", {"protocolVersion": PROTOCOL_VERSION})
            assert again["error"]["code"] == INVALID_REQUEST
            unknown = await peer.call("models/frobnicate")
            assert unknown["error"] == {"code": METHOD_NOT_FOUND, "message": "Method not found: models/frobnicate",
                                        "data": {"method": "models/frobnicate"}}
            peer.send([{"jsonrpc": "2.0", "id": "b1", "method": "ping"},
                       {"jsonrpc": "2.0", "method": "ping"},
                       {"jsonrpc": "2.0", "id": "b2", "method": "nope"},
                       {"jsonrpc": "2.0", "id": "b3", "method": "ping", "params": [1]}])
            while not any(isinstance(m, list) for m in peer.received):
                await peer.read()
            batch = next(m for m in peer.received if isinstance(m, list))
            assert [m["id"] for m in batch] == ["b1", "b2", "b3"]  # in order; the notification has none
            assert batch[0]["result"] == {} and batch[1]["error"]["code"] == METHOD_NOT_FOUND
            assert batch[2]["error"]["code"] == -32602
        assert list(peer.session._inflight) == []
    assert peer.exit_code == 0


async def test_a_method_that_raises_is_a_bare_internal_error_and_the_session_goes_on(settings: Settings) -> None:
    async with in_process(Settings(**{**vars(settings), "inject_faults": ("method:ping",)})) as peer:
        with anyio.fail_after(30):
            failed = await peer.call("ping")
            assert failed["error"] == {"code": INTERNAL_ERROR, "message": "Internal error", "data": {"method": "ping"}}
            assert await peer.result("ping") == {}


async def test_a_duplicate_id_and_one_request_too_many_are_refused_and_control_is_kept(settings: Settings) -> None:
    async with in_process(Settings(**{**vars(settings), "max_pending_requests": 1})) as peer:
        with anyio.fail_after(60):
            running = peer.request("chat", LONG)
            await peer.chunks_arrive(running)
            duplicate = await peer.response(peer.request("chat", LONG, id=running))
            assert duplicate["error"]["code"] == INVALID_REQUEST
            busy = await peer.call("tokenize", {"text": "x"})
            assert busy["error"]["code"] == BUSY and busy["error"]["data"]["maxPendingRequests"] == 1
            assert await peer.result("ping") == {}  # a control method is served whatever is in flight
            peer.send(peer.cancel_message(running))
            assert (await peer.response(running))["result"]["finishReason"] == "cancelled"


# ---- cancellation ---------------------------------------------------------------------------


async def test_a_generation_cancelled_before_the_engine_has_it_answers_cancelled_without_tokens(
        settings: Settings) -> None:
    async with in_process(settings) as peer:
        with anyio.fail_after(30):
            peer.send({"jsonrpc": "2.0", "id": 7, "method": "chat", "params": LONG}, peer.cancel_message(7))
            result = (await peer.response(7))["result"]
            assert result["finishReason"] == "cancelled" and result["model"] == "demo"
            assert result["usage"] == {"promptTokens": 0, "completionTokens": 0, "totalTokens": 0, "cachedTokens": 0}
            assert "text" not in result  # streamed: its text would have come in chunks
            assert await peer.result("ping") == {}
            assert peer.chunks(7) == []


async def test_a_running_generation_cancelled_answers_with_its_usage_after_every_chunk(settings: Settings) -> None:
    async with in_process(settings) as peer:
        with anyio.fail_after(60):
            running = peer.request("chat", LONG)
            await peer.chunks_arrive(running)
            peer.send(peer.cancel_message(running))
            result = (await peer.response(running))["result"]
            assert result["finishReason"] == "cancelled" and 0 < result["usage"]["completionTokens"] < 1900
            peer.send(peer.cancel_message(running))  # finished: ignored
            assert await peer.result("ping") == {}
            chunks = peer.chunks(running)
            assert [c["seq"] for c in chunks] == list(range(len(chunks)))
            last_chunk = max(i for i, m in enumerate(peer.received)
                             if isinstance(m, dict) and m.get("method") == "generate/chunk")
            assert last_chunk < peer.index_of_response(running)
            assert [m for m in peer.received if isinstance(m, dict) and m.get("id") == running
                    and "method" not in m] == [{"jsonrpc": "2.0", "id": running, "result": result}]


async def test_a_cancelled_load_answers_32800_and_the_load_goes_on(settings: Settings) -> None:
    async with in_process(settings) as peer:
        with anyio.fail_after(60):
            peer.request("models/load", {"model": "demo", "_meta": {"progressToken": "p"}}, id="load")
            while not any(isinstance(m, dict) and m.get("method") == "$/progress" for m in peer.received):
                await peer.read()  # it is loading
            peer.send(peer.cancel_message("load"))
            error = (await peer.response("load"))["error"]
            assert error == {"code": REQUEST_CANCELLED, "message": "Request cancelled", "data": {}}
            while (await peer.result("models/status", {"model": "demo"}))["state"] != "loaded":
                await anyio.sleep(0.02)


async def test_shutdown_answers_work_in_flight_server_cancelled_then_exit_is_0(settings: Settings) -> None:
    async with in_process(Settings(**{**vars(settings), "max_batch_size": 1})) as peer:
        with anyio.fail_after(60):
            running = peer.request("chat", LONG)
            await peer.chunks_arrive(running)
            queued = peer.request("generate", {"prompt": "x", "maxTokens": 5})
            assert await peer.result("shutdown") == {}
            errors = [(await peer.response(id_))["error"] for id_ in (running, queued)]
            assert all(e["code"] == SERVER_CANCELLED and e["data"]["reason"] == "shutdown" for e in errors)
            assert errors[0]["data"]["usage"]["completionTokens"] > 0
            refused = await peer.call("tokenize", {"text": "x"})
            assert refused["error"]["code"] == INVALID_REQUEST
            peer.send({"jsonrpc": "2.0", "method": "exit"})
            while peer.exit_code is None:
                await anyio.sleep(0.005)
    assert peer.exit_code == 0


async def test_end_of_input_ends_the_session_promptly_and_answers_what_is_in_flight(settings: Settings) -> None:
    async with in_process(settings) as peer:
        with anyio.fail_after(60):
            running = peer.request("chat", LONG)
            await peer.chunks_arrive(running)
            loading = peer.request("models/load", {"model": "nowhere-to-be-found-" + "x" * 8})
            peer.close_input()
            with anyio.fail_after(2):
                while peer.exit_code is None:
                    await anyio.sleep(0.005)
            error = (await peer.response(running))["error"]
            assert error["code"] == SERVER_CANCELLED and error["data"]["reason"] == "exit"
            assert error["data"]["usage"]["completionTokens"] > 0
            assert "error" in await peer.response(loading)
    assert peer.exit_code == 0 and peer.session._inflight == {}


async def test_exit_without_shutdown_is_1(settings: Settings) -> None:
    async with in_process(settings) as peer:
        peer.send({"jsonrpc": "2.0", "method": "exit"})
        with anyio.fail_after(10):
            while peer.exit_code is None:
                await anyio.sleep(0.005)
    assert peer.exit_code == 1


# ---- embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-Embedding of tests/families.py (real architecture and tokenizer, a small
    shape): fast on any BLAS."""
    cache = getattr(request.config, "cache", None)
    built = cache.mkdir("localmlx-embedding") if cache is not None else tmp_path_factory.mktemp("built")
    root = tmp_path_factory.mktemp("embedding-models")
    os.symlink(build_embedding_model(Path(built)), root / "qwen-embed")
    return root


async def test_an_embed_cancelled_stops_between_micro_batches_and_answers_32800(embedding_models: Path) -> None:
    texts = [f"sentence number {i} about the sea, the wind and the mountains " * 8 for i in range(500)]
    async with in_process(Settings(models_dir=embedding_models)) as peer:
        with anyio.fail_after(60):
            await peer.result("models/load", {"model": "qwen-embed"})
            peer.request("embed", {"model": "qwen-embed", "input": texts, "_meta": {"progressToken": "e"}}, id="embed")
            while not any(isinstance(m, dict) and (m.get("method") == "$/progress" or m.get("id") == "embed")
                          for m in peer.received):
                await peer.read()  # its first micro-batch is done
            peer.send(peer.cancel_message("embed"))
            error = (await peer.response("embed"))["error"]
            assert error == {"code": REQUEST_CANCELLED, "message": "Request cancelled", "data": {}}
            done = [m["params"]["completed"] for m in peer.received
                    if isinstance(m, dict) and m.get("method") == "$/progress" and m["params"]["phase"] == "embed"]
            assert done[-1] < len(texts)
            assert (await peer.result("server/status"))["requests"]["active"] == 0


async def test_an_embeds_keep_alive_becomes_its_models(embedding_models: Path) -> None:
    async with in_process(Settings(models_dir=embedding_models)) as peer:
        with anyio.fail_after(60):
            loaded = await peer.result("models/load", {"model": "qwen-embed"})
            assert loaded["keepAlive"] == -1
            await peer.result("embed", {"model": "qwen-embed", "input": ["waves"], "keepAlive": "1h"})
            status = await peer.result("models/status", {"model": "qwen-embed"})
            assert status["description"]["keepAlive"] == 3600

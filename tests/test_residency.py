"""Which models stay in memory: one budget, least-recently-used eviction that never touches a
model with work on it, rollback of a failed load, keep-alive, deletion, KV-cache options."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.demo_model import DEMO_MODEL_DIRNAME, DEMO_SHAPE
from sidecar.protocol_defs import FORBIDDEN, INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, OUT_OF_MEMORY

from .conftest import chat_params

DEMO_BYTES = 10_494_976  # the demo model's weights


@pytest.fixture
def models(models_dir: Path, tmp_path: Path) -> Path:
    """A models dir with the demo model and three copies of it: a, b, c."""
    root = tmp_path / "models"
    for name in (DEMO_MODEL_DIRNAME, "a", "b", "c"):
        shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, root / name)
    return root


def spawn(sidecars, models: Path, **env: str) -> SidecarClient:
    return sidecars.spawn(LOCALMLX_MODELS_DIR=str(models), LOCALMLX_MAX_LOADED_MODELS="8", **env)


def loaded(client: SidecarClient) -> list[str]:
    return sorted(m["model"] for m in client.request("server/status")["models"])


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def start_long_chat(client: SidecarClient, model: str):
    id_ = client.start_request("chat", chat_params("Tell me everything.", model=model, maxTokens=1900,
                                                   stream=True, cache=False))
    wait_until(lambda: any(r.message.get("method") == "generate/chunk" and r.message["params"]["requestId"] == id_
                           for r in list(client.received)))
    return id_


# ---- the budget ------------------------------------------------------------------------------


def test_loading_past_the_budget_unloads_the_least_recently_used_idle_model(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_MEMORY_BUDGET=str(int(2.5 * DEMO_BYTES)))
    assert client.request("models/load", {"model": "a"})
    assert client.request("models/load", {"model": "b"})
    client.request("chat", chat_params("x", model="a", maxTokens=2))  # b is now the least recently used
    assert client.request("models/load", {"model": "c"})["alreadyLoaded"] is False
    assert loaded(client) == ["a", "c"]
    status = client.request("server/status")["memory"]
    assert status["modelBytes"] == 2 * DEMO_BYTES and status["budgetBytes"] == int(2.5 * DEMO_BYTES)
    assert client.close() == 0


def test_a_model_with_work_on_it_is_never_unloaded_to_make_room(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_MEMORY_BUDGET=str(int(2.5 * DEMO_BYTES)))
    client.request("models/load", {"model": "a"})
    client.request("models/load", {"model": "b"})
    running = start_long_chat(client, "a")  # a is the least recently used, but busy
    client.request("models/load", {"model": "c"})
    assert loaded(client) == ["a", "c"]
    other = start_long_chat(client, "c")
    with pytest.raises(RpcCallError) as refused:  # both busy: nothing can go
        client.request("models/load", {"model": "b"})
    assert refused.value.code == OUT_OF_MEMORY
    assert refused.value.data == {"requiredBytes": DEMO_BYTES, "availableBytes": int(2.5 * DEMO_BYTES) - 2 * DEMO_BYTES,
                                  "budgetBytes": int(2.5 * DEMO_BYTES)}
    for id_ in (running, other):
        client.cancel(id_)
        assert client.wait_response(id_)["result"]["finishReason"] == "cancelled"
    assert client.close() == 0


def test_a_failed_load_brings_back_what_it_unloaded(sidecars, models) -> None:
    """Its weights look fine but do not fit its config: the failure comes from mlx-lm, after
    `a` was unloaded to make room, and `a` comes back."""
    config = models / "c" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), intermediate_size=640)))
    client = spawn(sidecars, models, LOCALMLX_MEMORY_BUDGET=str(int(1.5 * DEMO_BYTES)))
    client.request("models/load", {"model": "a"})
    with pytest.raises(RpcCallError) as failed:
        client.request("models/load", {"model": "c"})
    assert failed.value.code == MODEL_LOAD_FAILED
    assert loaded(client) == ["a"]
    assert client.request("chat", chat_params("x", model="a", maxTokens=2))["finishReason"] == "length"
    assert client.close() == 0


def test_a_truncated_model_is_refused_before_anything_is_unloaded(sidecars, models) -> None:
    weights = models / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    client = spawn(sidecars, models, LOCALMLX_MEMORY_BUDGET=str(int(1.5 * DEMO_BYTES)))
    client.request("models/load", {"model": "a"})
    with pytest.raises(RpcCallError) as failed:
        client.request("models/load", {"model": "c"})
    assert failed.value.code == MODEL_LOAD_FAILED and "truncated" in failed.value.message
    assert "reloaded" not in "\n".join(client.stderr_lines)  # a never left
    assert loaded(client) == ["a"]
    assert client.close() == 0


def test_unloading_gives_the_memory_back(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_PREFIX_CACHE="false")
    client.request("server/status")
    before = client.request("server/status")["memory"]["activeBytes"]
    client.request("models/load", {"model": "a"})
    client.request("chat", chat_params("The sea", model="a", maxTokens=20))
    during = client.request("server/status")["memory"]["activeBytes"]
    assert during - before >= DEMO_BYTES
    client.request("models/unload", {"model": "a"})
    after = client.request("server/status")["memory"]["activeBytes"]
    assert during - after >= 0.95 * DEMO_BYTES
    assert client.close() == 0


# ---- keep-alive ------------------------------------------------------------------------------


def test_a_model_goes_when_its_keep_alive_runs_out(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_OFFLOAD_INACTIVE="0.5s")
    short = client.request("models/load", {"model": "a"})
    assert short["keepAlive"] == 0.5 and short["expiresAt"] is not None
    forever = client.request("models/load", {"model": "b", "keepAlive": -1})
    assert forever["keepAlive"] == -1 and forever["expiresAt"] is None
    wait_until(lambda: loaded(client) == ["b"])
    assert any("keep-alive" in line for line in client.stderr_lines)
    assert client.close() == 0


def test_keep_alive_zero_unloads_after_the_reply_and_a_request_sets_it(sidecars, models) -> None:
    client = spawn(sidecars, models)
    client.request("models/load", {"model": "a"})
    assert client.request("models/status", {"model": "a"})["description"]["keepAlive"] == -1
    reply = client.request("chat", chat_params("x", model="a", maxTokens=3, keepAlive=0))
    assert reply["finishReason"] == "length"
    wait_until(lambda: loaded(client) == [])
    client.request("chat", chat_params("x", model="b", maxTokens=3, keepAlive="1h"))
    assert client.request("models/status", {"model": "b"})["description"]["keepAlive"] == 3600
    assert client.close() == 0


def test_a_model_in_use_outlives_its_keep_alive(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_OFFLOAD_INACTIVE="0")
    running = start_long_chat(client, "a")
    assert loaded(client) == ["a"]  # keep-alive 0, but a generation is running on it
    client.cancel(running)
    assert client.wait_response(running)["result"]["finishReason"] == "cancelled"
    wait_until(lambda: loaded(client) == [])
    assert client.close() == 0


# ---- on disk ---------------------------------------------------------------------------------


def test_models_list_describes_every_local_model(sidecars, models) -> None:
    client = spawn(sidecars, models)
    client.request("chat", chat_params("x", model="b", maxTokens=2))
    listed = {m["model"]: m for m in client.request("models/list")["models"]}
    assert set(listed) >= {"demo", "a", "b", "c"}
    b = listed["b"]
    assert b["type"] == "llama" and b["quantization"] is None and b["contextLength"] == DEMO_SHAPE.max_positions
    assert b["loaded"] is True and b["lastUsed"].endswith("+00:00") and b["bytes"] > DEMO_BYTES
    assert listed["a"]["loaded"] is False and listed["a"]["lastUsed"] is None
    assert client.close() == 0


def test_deleting_a_model(sidecars, models, tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(models / "a", elsewhere / "outside")
    client = spawn(sidecars, models, LOCALMLX_ALLOWED_ROOTS=str(elsewhere))
    client.request("models/load", {"model": "a"})
    with pytest.raises(RpcCallError) as refused:
        client.request("models/delete", {"model": "a"})
    assert refused.value.code == INVALID_PARAMS and refused.value.data["loaded"] is True
    deleted = client.request("models/delete", {"model": "a", "force": True})
    assert deleted["deleted"] and deleted["unloaded"] and deleted["bytesFreed"] > DEMO_BYTES
    assert not (models / "a").exists() and loaded(client) == []
    assert "a" not in {m["model"] for m in client.request("models/list")["models"]}
    with pytest.raises(RpcCallError) as gone:
        client.request("models/load", {"model": "a"})
    assert gone.value.code == MODEL_NOT_FOUND
    with pytest.raises(RpcCallError) as forbidden:  # loadable from there, never deleted there
        client.request("models/delete", {"model": str(elsewhere / "outside")})
    assert forbidden.value.code == FORBIDDEN and (elsewhere / "outside").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []  # nothing left half-deleted
    assert client.close() == 0


# ---- KV-cache options ------------------------------------------------------------------------


def test_kv_options_per_request_run_beside_the_batch(sidecars, models) -> None:
    client = spawn(sidecars, models, LOCALMLX_PREFIX_CACHE="false")
    plain = [client.request("chat", chat_params(p, model="a", maxTokens=60, cache=False))["text"]
             for p in ("one", "two")]
    apart = [client.start_request("chat", chat_params("quantized", model="a", maxTokens=200, kvBits=8, cache=False)),
             client.start_request("chat", chat_params("bounded", model="a", maxTokens=300, maxKvSize=64, cache=False))]
    batched = [client.start_request("chat", chat_params(p, model="a", maxTokens=60, cache=False)) for p in ("one", "two")]
    assert [client.wait_response(i)["result"]["text"] for i in batched] == plain
    results = [client.wait_response(i)["result"] for i in apart]
    assert [r["usage"]["completionTokens"] for r in results] == [200, 300]
    assert client.close() == 0


def test_kv_options_of_a_model(sidecars, models) -> None:
    client = spawn(sidecars, models)
    described = client.request("models/load", {"model": "a", "kvBits": 4, "maxKvSize": 1024})
    assert described["kvBits"] == 4 and described["maxKvSize"] == 1024
    assert client.request("chat", chat_params("x", model="a", maxTokens=10))["usage"]["completionTokens"] == 10
    assert client.request("models/load", {"model": "a"})["kvBits"] == 4  # a load naming none keeps them
    with pytest.raises(RpcCallError) as bad:
        client.request("models/load", {"model": "a", "kvBits": 5})
    assert bad.value.code == INVALID_PARAMS
    assert client.close() == 0

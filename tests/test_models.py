"""Where models come from: the models dir, absolute paths, the Hugging Face cache."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sidecar.client import RpcCallError
from sidecar.demo_model import DEMO_MODEL_DIRNAME
from sidecar.protocol_defs import FORBIDDEN, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, MODEL_NOT_LOADED


def copy_demo(models_dir: Path, dest: Path) -> Path:
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, dest)
    return dest


def make_hf_cache_entry(cache: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub writes: blobs, refs/main, snapshots/<rev>/ symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_models_dir_names_absolute_paths_and_the_hf_cache(sidecars, models_dir, tmp_path) -> None:
    mine = copy_demo(models_dir, tmp_path / "models" / "my-model")
    copy_demo(models_dir, tmp_path / "models" / "team" / "nested-model")
    cache = tmp_path / "hf"
    make_hf_cache_entry(cache, "someone/cached-model", models_dir / DEMO_MODEL_DIRNAME)
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"), HF_HUB_CACHE=str(cache))

    listed = {m["model"]: m for m in client.request("models/list")["models"]}
    assert listed["demo"]["source"] == "embedded"
    assert listed["my-model"]["source"] == "models-dir" and listed["my-model"]["bytes"] > 1_000_000
    assert listed["team/nested-model"]["source"] == "models-dir"
    assert listed["someone/cached-model"]["source"] == "hf-cache"

    assert client.request("models/load", {"model": "my-model"})["model"] == "my-model"
    assert client.request("models/load", {"model": str(mine)})["model"] == str(mine.resolve())
    cached = client.request("models/load", {"model": "someone/cached-model"})
    assert cached["model"] == "someone/cached-model" and cached["type"] == "llama"
    # Two models at most: the least recently used was unloaded to make room.
    loaded = [m["model"] for m in client.request("server/status")["models"]]
    assert loaded == [str(mine.resolve()), "someone/cached-model"]
    assert client.request("chat", {"model": "team/nested-model", "maxTokens": 3,
                                   "messages": [{"role": "user", "content": "hi"}]})["model"] == "team/nested-model"
    assert client.close() == 0


@pytest.mark.parametrize("ref", ["/etc", "/tmp/../etc", "~/../../etc", "./relative", "a/b/c/../../..", "demo\x00"])
def test_paths_outside_the_allowed_roots_are_forbidden(sidecar, ref) -> None:
    with pytest.raises(RpcCallError) as error:
        sidecar.request("models/load", {"model": ref})
    assert error.value.code == FORBIDDEN


def test_a_directory_that_is_not_a_model_fails_clearly(sidecars, tmp_path) -> None:
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "models" / "empty").mkdir()
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    with pytest.raises(RpcCallError) as failed:
        client.request("models/load", {"model": "broken"})
    assert failed.value.code == MODEL_LOAD_FAILED and failed.value.data["model"] == "broken"
    with pytest.raises(RpcCallError) as missing:
        client.request("models/load", {"model": "empty"})
    assert missing.value.code == MODEL_NOT_FOUND
    assert client.request("ping") == {}
    assert client.close() == 0


def test_preloaded_models_load_at_start_without_delaying_initialize(sidecars) -> None:
    client = sidecars.spawn(initialize=False, LOCALMLX_PRELOAD_MODELS="true")
    info = client.initialize()
    assert info["serverInfo"]["device"].split()[0] in ("cpu", "gpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if [m["model"] for m in client.request("server/status")["models"]] == ["demo"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the default model was not preloaded")
    assert client.close() == 0


def test_status_of_a_model_through_its_life(sidecar) -> None:
    assert sidecar.request("models/status", {"model": "demo"})["state"] == "available"
    sidecar.request("models/load", {"model": "demo"})
    status = sidecar.request("models/status", {"model": "demo"})
    assert status["state"] == "loaded" and status["source"] == "embedded"
    assert status["description"]["type"] == "llama"
    sidecar.request("models/unload", {"model": "demo"})
    assert "description" not in sidecar.request("models/status", {"model": "demo"})
    with pytest.raises(RpcCallError) as missing:
        sidecar.request("models/status", {"model": "nothing-here"})
    assert missing.value.code == MODEL_NOT_FOUND


def test_a_request_without_a_model_uses_the_most_recently_used_one(sidecars, models_dir, tmp_path) -> None:
    copy_demo(models_dir, tmp_path / "models" / "second")
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    client.request("models/load", {"model": "second"})
    client.request("models/load", {"model": "demo"})
    assert client.request("tokenize", {"text": "a"})["model"] == "demo"
    client.request("tokenize", {"model": "second", "text": "a"})
    assert client.request("tokenize", {"text": "a"})["model"] == "second"
    client.request("server/status")
    assert client.request("tokenize", {"text": "a"})["model"] == "second"
    assert client.close() == 0


def test_a_load_runs_between_the_steps_of_a_running_generation(sidecars, models_dir, tmp_path) -> None:
    """Loads are control work: served between decode steps, not after the generation ends."""
    copy_demo(models_dir, tmp_path / "models" / "second")
    client = sidecars.spawn(LOCALMLX_JIT_LOAD="false", LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    client.request("models/load", {"model": "demo"})
    running = client.start_request("chat", {"messages": [{"role": "user", "content": "go"}],
                                            "maxTokens": 1500, "temperature": 0, "stream": True})
    while not any(r.message.get("method") == "generate/chunk" for r in client.received):
        time.sleep(0.005)
    with pytest.raises(RpcCallError) as not_loaded:
        client.request("tokenize", {"model": "second", "text": "x"})
    assert not_loaded.value.code == MODEL_NOT_LOADED
    assert client.request("models/load", {"model": "second"}, timeout=30)["alreadyLoaded"] is False
    assert client.request("models/status", {"model": "second"})["state"] == "loaded"
    assert client.request("tokenize", {"model": "second", "text": "x"})["tokens"]
    assert not any(r.message.get("id") == running for r in client.received), "the chat is still running"
    client.cancel(running)
    assert client.wait_response(running)["result"]["finishReason"] == "cancelled"
    assert client.close() == 0



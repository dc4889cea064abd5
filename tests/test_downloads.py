"""models/download against a Hub on loopback (olah serving local git repositories, see
hub_server.py), with the real huggingface-hub client in a real sidecar pointed at it by
HF_ENDPOINT: progress, resume after a cancel or a kill, checksums, a full disk, the allowed
orgs, auto-download on load, and conversion to 4-bit with mlx-lm's converter."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient, sidecar_command
from sidecar.downloads import MODEL_FILE_PATTERNS
from sidecar.protocol_defs import FORBIDDEN, INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, REQUEST_CANCELLED

from .conftest import chat_params
from .hub_server import HubServer, add_repo

REPO = "mlx-community/tiny-demo"
CORRUPT_REPO = "mlx-community/tiny-demo-corrupt"
HF_REPO = "TinyOrg/tiny-demo-hf"  # full precision, outside the default allowed orgs
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def served_files(demo_model_path: Path) -> dict[str, bytes]:
    """The demo model as a Hub repo holds it, with a README mlx-lm does not need."""
    files = {p.name: p.read_bytes() for p in demo_model_path.iterdir() if p.name != "localmlx_demo.json"}
    return {**files, "README.md": b"# tiny demo\n"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, served_files: dict[str, bytes]) -> Iterator[HubServer]:
    mirrors = tmp_path_factory.mktemp("mirrors")
    add_repo(mirrors, REPO, served_files)
    add_repo(mirrors, CORRUPT_REPO, served_files, corrupt=WEIGHTS)
    add_repo(mirrors, HF_REPO, served_files)
    with HubServer(mirrors, tmp_path_factory.mktemp("olah")) as server:
        yield server


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf"


@pytest.fixture
def hub_env(hub: HubServer, hf_cache: Path) -> Iterator[dict[str, str]]:
    hub.shim.requests.clear()
    yield {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(hf_cache),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for stall in hub.shim.stalls.values():  # one a failed test left behind
        stall.release()
    hub.shim.stalls.clear()


def model_files(served: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in served.items() if name not in ("README.md",)}


def progress_of(client: SidecarClient, token: Any) -> list[dict[str, Any]]:
    return [r.message["params"] for r in list(client.received)
            if r.message.get("method") == "$/progress" and r.message["params"]["token"] == token]


def wait_for_a_partial_file(cache: Path, timeout: float = 30) -> Path:
    """The stalled file, once some of it is on disk (the server sent half of it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in partials(cache) if p.stat().st_size > 0]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "nothing of the file arrived"
        time.sleep(0.005)


def snapshot_dirs(cache: Path, repo_id: str) -> list[Path]:
    snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sorted(snapshots.iterdir()) if snapshots.is_dir() else []


def partials(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.incomplete")) if cache.is_dir() else []


def listed(client: SidecarClient) -> dict[str, dict]:
    return {m["model"]: m for m in client.request("models/list")["models"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_files_downloaded_are_those_mlx_lm_loads() -> None:
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    assert list(DEFAULT_ALLOW_PATTERNS) == MODEL_FILE_PATTERNS


def test_a_download_reports_progress_then_loads_and_chats_and_a_second_is_a_no_op(
        sidecars, hub: HubServer, hub_env, hf_cache: Path, served_files) -> None:
    client = sidecars.spawn(**hub_env)
    wanted = model_files(served_files)
    total = sum(map(len, wanted.values()))
    stall = hub.shim.stall(WEIGHTS, after=len(wanted[WEIGHTS]) // 2)
    download = client.start_request("models/download", {"model": REPO, "_meta": {"progressToken": "dl"}})
    stall.reached.wait(30)
    time.sleep(0.2)  # longer than progress is held back: the next bytes are reported, mid-file
    stall.release()
    result = client.wait_response(download)["result"]

    assert result["model"] == REPO and re.fullmatch(r"[0-9a-f]{40}", result["revision"])
    assert (result["downloadedBytes"], result["bytes"], result["files"]) == (total, total, len(wanted))
    assert result["converted"] is False and result["quantization"] is None
    snapshot = Path(result["path"])
    assert snapshot_dirs(hf_cache, REPO) == [snapshot]
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(wanted)  # no README, no .gitattributes
    assert all(sha256(snapshot / name) == hashlib.sha256(data).hexdigest() for name, data in wanted.items())

    seen = progress_of(client, "dl")
    assert {(p["phase"], p["unit"], p["total"]) for p in seen} == {("download", "bytes", total)}
    completed = [p["completed"] for p in seen]
    assert completed == sorted(completed) and completed[0] == 0 and completed[-1] == total
    assert any(p.get("file") == WEIGHTS and 0 < p["completed"] < total for p in seen)
    assert all(p["bytesPerSecond"] >= 0 for p in seen if "file" in p)
    assert any(p.get("etaSeconds", -1) >= 0 for p in seen)

    assert listed(client)[REPO]["source"] == "hf-cache"
    loaded = client.request("models/load", {"model": REPO})
    assert loaded["model"] == REPO and loaded["type"] == "llama"
    assert client.request("chat", chat_params(model=REPO, maxTokens=3))["usage"]["completionTokens"] == 3

    requests_before = len(hub.shim.requests)
    again = client.request("models/download", {"model": REPO})
    assert again["downloadedBytes"] == 0 and again["path"] == result["path"]
    assert len(hub.shim.requests) == requests_before  # no file was fetched again
    assert client.close() == 0


def test_a_model_fetched_by_hf_download_is_listed_and_loads_unless_its_weights_are_missing(
        sidecars, hub_env, hf_cache: Path) -> None:
    import os
    import subprocess
    import sys

    hf = Path(sys.executable).with_name("hf")
    subprocess.run([str(hf), "download", REPO, "--quiet"], env={**os.environ, **hub_env}, check=True,
                   stdout=subprocess.DEVNULL)
    client = sidecars.spawn(**{**hub_env, "HF_HUB_OFFLINE": "1"})
    assert listed(client)[REPO]["source"] == "hf-cache"
    assert client.request("models/load", {"model": REPO})["model"] == REPO
    assert client.close() == 0

    [snapshot] = snapshot_dirs(hf_cache, REPO)
    (snapshot / WEIGHTS).unlink()  # as an interrupted `hf download` leaves it: config.json, no weights
    client = sidecars.spawn(**{**hub_env, "HF_HUB_OFFLINE": "1"})
    assert REPO not in listed(client)
    with pytest.raises(RpcCallError) as missing:
        client.request("models/load", {"model": REPO})
    assert missing.value.code == MODEL_NOT_FOUND
    assert client.close() == 0


def test_a_cancelled_download_answers_at_once_and_resumes_where_it_stopped(
        sidecars, hub: HubServer, hub_env, hf_cache: Path, served_files) -> None:
    client = sidecars.spawn(**hub_env)
    size = len(served_files[WEIGHTS])
    stall = hub.shim.stall(WEIGHTS, after=size // 2)
    download = client.start_request("models/download", {"model": REPO})
    stall.reached.wait(30)
    wait_for_a_partial_file(hf_cache)
    # The server holds the rest of the file: generation goes on meanwhile, and a cancel is
    # answered without waiting for the transfer.
    assert client.request("chat", chat_params(maxTokens=3))["usage"]["completionTokens"] == 3
    client.cancel(download)
    assert client.wait_response(download, timeout=10)["error"]["code"] == REQUEST_CANCELLED
    assert not stall.released.is_set()
    stall.release()
    client.wait_for_log("download of mlx-community/tiny-demo cancelled")
    [partial] = partials(hf_cache)
    kept = partial.stat().st_size
    assert 0 < kept < size
    assert REPO not in listed(client) and snapshot_dirs(hf_cache, REPO) == []
    present = sum(blob.stat().st_size for blob in partial.parent.iterdir())

    resumed = client.request("models/download", {"model": REPO})
    assert resumed["downloadedBytes"] == resumed["bytes"] - present  # nothing fetched twice
    assert [r for p, r in hub.shim.requests if p.endswith(WEIGHTS)] == [None, f"bytes={kept}-"]
    assert sha256(Path(resumed["path"]) / WEIGHTS) == hashlib.sha256(served_files[WEIGHTS]).hexdigest()
    assert partials(hf_cache) == []
    assert client.close() == 0


def test_a_killed_download_leaves_no_model_and_the_next_one_resumes(
        sidecars, hub: HubServer, hub_env, hf_cache: Path, served_files) -> None:
    client = sidecars.spawn(**hub_env)
    stall = hub.shim.stall(WEIGHTS, after=len(served_files[WEIGHTS]) // 2)
    client.start_request("models/download", {"model": REPO})
    stall.reached.wait(30)
    partial = wait_for_a_partial_file(hf_cache)
    client.process.send_signal(signal.SIGKILL)
    client.process.wait()
    stall.release()

    after = sidecars.spawn(**hub_env)
    assert REPO not in listed(after)
    with pytest.raises(RpcCallError) as missing:
        after.request("models/load", {"model": REPO})
    assert missing.value.code == MODEL_NOT_FOUND
    resumed = after.request("models/download", {"model": REPO})
    assert 0 < resumed["downloadedBytes"] < len(served_files[WEIGHTS])
    assert sha256(Path(resumed["path"]) / WEIGHTS) == hashlib.sha256(served_files[WEIGHTS]).hexdigest()
    assert not partial.exists() and after.request("models/load", {"model": REPO})["model"] == REPO
    assert after.close() == 0


def test_a_file_that_does_not_match_the_hubs_checksum_is_rejected(sidecars, hub_env, hf_cache: Path) -> None:
    client = sidecars.spawn(**hub_env)
    with pytest.raises(RpcCallError) as rejected:
        client.request("models/download", {"model": CORRUPT_REPO})
    error = rejected.value
    assert error.code == MODEL_LOAD_FAILED and error.data["reason"] == "checksum-mismatch"
    assert error.data["file"] == WEIGHTS and error.data["expected"] != error.data["actual"]
    blobs = hf_cache / ("models--" + CORRUPT_REPO.replace("/", "--")) / "blobs"
    assert not (blobs / error.data["expected"]).exists() and partials(hf_cache) == []
    assert snapshot_dirs(hf_cache, CORRUPT_REPO) == [] and CORRUPT_REPO not in listed(client)
    assert client.request("ping") == {}
    assert client.close() == 0


def test_a_full_disk_while_downloading_fails_clearly_and_leaves_nothing_half_written(
        sidecars, hub_env, hf_cache: Path) -> None:
    def small_files_only() -> None:  # in the child: writes past 1 MiB fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    client = SidecarClient(sidecar_command(), env={**sidecars.env, **hub_env}, preexec_fn=small_files_only)
    sidecars.spawned.append(client)
    client.initialize(name="pytest")
    with pytest.raises(RpcCallError) as failed:
        client.request("models/download", {"model": REPO})
    assert failed.value.code == MODEL_LOAD_FAILED and failed.value.data["reason"] == "disk-full"
    assert failed.value.data["file"] == WEIGHTS and "space" in failed.value.message
    assert partials(hf_cache) == [] and snapshot_dirs(hf_cache, REPO) == []
    assert REPO not in listed(client)
    assert client.request("ping") == {}
    assert client.close() == 0


REFUSED = [
    ({"model": HF_REPO}, FORBIDDEN),  # an org outside LOCALMLX_ALLOWED_ORGS
    ({"model": "mlx-community/../../etc"}, INVALID_PARAMS),
    ({"model": "mlx-community/.."}, INVALID_PARAMS),
    ({"model": "demo"}, INVALID_PARAMS),
    ({"model": "/etc/passwd"}, INVALID_PARAMS),
    ({"model": "a/b/c"}, INVALID_PARAMS),
    ({"model": REPO, "revision": "../../../etc"}, INVALID_PARAMS),
    ({"model": REPO, "revision": "main/../.."}, INVALID_PARAMS),
]


def test_disallowed_orgs_and_bad_ids_are_refused_before_any_request(sidecars, hub: HubServer, hub_env) -> None:
    client = sidecars.spawn(**hub_env)
    for params, code in REFUSED:
        with pytest.raises(RpcCallError) as refused:
            client.request("models/download", params)
        assert refused.value.code == code, params
    assert hub.shim.requests == []
    assert client.close() == 0


def test_auto_download_lets_models_load_fetch_a_model(sidecars, hub_env, hf_cache: Path) -> None:
    without = sidecars.spawn(**hub_env)
    with pytest.raises(RpcCallError) as missing:
        without.request("models/load", {"model": REPO})
    assert missing.value.code == MODEL_NOT_FOUND and partials(hf_cache) == [] and snapshot_dirs(hf_cache, REPO) == []
    assert without.close() == 0

    client = sidecars.spawn(LOCALMLX_AUTO_DOWNLOAD="true", **hub_env)
    loaded = client.request("models/load", {"model": REPO, "_meta": {"progressToken": "load"}})
    assert loaded["model"] == REPO
    phases = [p["phase"] for p in progress_of(client, "load")]
    assert phases[0] == "download" and phases[-1] == "ready" and "weights" in phases
    assert len(snapshot_dirs(hf_cache, REPO)) == 1
    assert client.request("chat", chat_params(model=REPO, maxTokens=3))["usage"]["completionTokens"] == 3
    assert client.close() == 0


def test_a_full_precision_repo_is_converted_to_4_bit_into_the_models_dir(
        sidecars, hub_env, hf_cache: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(models), LOCALMLX_QUANTIZATION="4bit",
                            LOCALMLX_ALLOWED_ORGS="mlx-community,TinyOrg", **hub_env)
    result = client.request("models/download", {"model": HF_REPO, "_meta": {"progressToken": "q"}})
    converted = models / "TinyOrg" / "tiny-demo-hf-4bit"
    assert result["converted"] is True and result["path"] == str(converted)
    assert result["quantization"] == {"bits": 4, "groupSize": 64, "mode": "affine"}
    assert result["downloadedBytes"] > 0 and result["bytes"] < result["downloadedBytes"]
    seen = progress_of(client, "q")
    steps = [p["completed"] for p in seen if p["phase"] == "convert"]
    assert steps[0] == 0 and steps[-1] == 4 and steps == sorted(steps)
    assert snapshot_dirs(hf_cache, HF_REPO) == []  # the originals are not kept
    assert sorted(p.name for p in models.iterdir()) == [".localmlx-converting", "TinyOrg"]
    assert list((models / ".localmlx-converting").iterdir()) == []
    assert listed(client)["TinyOrg/tiny-demo-hf-4bit"]["source"] == "models-dir"

    loaded = client.request("models/load", {"model": HF_REPO})
    assert loaded["quantization"]["bits"] == 4
    assert client.request("chat", chat_params(model=HF_REPO, maxTokens=3))["usage"]["completionTokens"] == 3
    assert client.request("models/download", {"model": HF_REPO})["downloadedBytes"] == 0
    assert client.close() == 0


def test_localmlx_models_pull_downloads_then_lists_the_model(hub_env, hf_cache: Path, sidecar_env,
                                                            served_files) -> None:
    env = {**os.environ, **sidecar_env, **hub_env}

    def localmlx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sidecar", "models", *args], capture_output=True, text=True,
                              env=env, timeout=120, stdin=subprocess.DEVNULL)

    pulled = localmlx("pull", REPO, "--json")
    assert pulled.returncode == 0, pulled.stderr
    result = json.loads(pulled.stdout)
    assert result["model"] == REPO and result["files"] == len(model_files(served_files))
    assert snapshot_dirs(hf_cache, REPO) == [Path(result["path"])]
    listed = {m["model"]: m for m in json.loads(localmlx("list", "--json").stdout)["models"]}
    assert listed[REPO]["source"] == "hf-cache"
    refused = localmlx("pull", "someone-else/model")
    assert refused.returncode == 1 and str(FORBIDDEN) in refused.stderr


def test_settings_given_as_flags_reach_the_conversion_child(sidecars, hub_env, tmp_path: Path) -> None:
    """The converter runs in a child process: settings the sidecar got as flags, not in its
    environment, must reach it too (here its BLAS choice and log format)."""
    flags = ["--models-dir", str(tmp_path / "models"), "--quantization", "4bit", "--allowed-orgs", "TinyOrg",
             "--blas", "bundled", "--log-format", "json"]
    client = sidecars.spawn(args=[*sidecar_command(), *flags], **hub_env)
    assert client.request("models/download", {"model": HF_REPO})["converted"] is True
    assert client.close() == 0
    blas = [line for line in client.stderr_lines if "BLAS in use" in line]
    assert [json.loads(line)["message"] for line in blas] == ["BLAS in use: bundled"] * 2, blas  # sidecar, child

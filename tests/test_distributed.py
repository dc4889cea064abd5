"""One model over several simulated hosts: the sidecar is rank 0 in the root namespace and starts
its followers inside network namespaces (tests/netns.py) through LOCALMLX_DISTRIBUTED_LAUNCHER, as
it would over SSH. Everything is real: the ring backend over the namespaces' links, mlx-lm's
sharded load, the engine on every rank.

What is checked: greedy (and seeded) output of a sharded model is token for token the output of
the same model in one process, alone and batched, for chat, a forced tool call and a JSON-schema
answer, in tensor and pipeline mode, over 2 and 3 ranks; each rank holds a share of the weights;
cancel, unload and another load on a group; a model without the mode asked for gets a clear
error; an idle group is idle; a killed, stopped or unplugged follower is reported to every
request in flight within 10 s, no rank is left running, and a new sidecar re-forms the group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import schema
from sidecar.client import RpcCallError, SidecarClient, SidecarExited
from tests.conftest import serving
from tests.distributed_models import build_group_model, shardable_copy
from tests.families import FAMILIES_BY_NAME, build
from tests.netns import SimulatedHosts, available
from tests.sshd import SshServers
from tests.sshd import available as sshd_available

_ok, _why = available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"no simulated hosts here: {_why}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
         "required": ["ok", "level"], "additionalProperties": False}
PROMPTS = ("Tell me about the sea.", "What is a mountain?", "Write a line about rain.", "Name three colours.")
DETECTION_S = 10.0  # the bound on noticing a lost rank


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "maxTokens": 16,
            "cache": False, **extra}


REQUESTS = {
    "greedy": chat(PROMPTS[0]),
    "seeded": chat(PROMPTS[1], temperature=0.9, seed=7),
    "tool": chat("What is the weather in Paris?", tools=[WEATHER], toolChoice="required", maxTokens=40),
    "schema": chat(PROMPTS[2], responseFormat={"type": "json_schema", "schema": FLAGS}, maxTokens=40),
}


def outcome(result: dict[str, Any]) -> tuple[Any, ...]:
    calls = [{k: v for k, v in call.items() if k != "id"} for call in result.get("toolCalls") or []]  # ids are random
    return result.get("text"), calls, result["finishReason"], result["usage"]["completionTokens"]


def run_all(client: SidecarClient, model: str) -> dict[str, tuple[Any, ...]]:
    return {name: outcome(client.request("chat", dict(params, model=model))) for name, params in REQUESTS.items()}


def run_batched(client: SidecarClient, model: str) -> list[tuple[Any, ...]]:
    """Four chats sent together: the engine batches them."""
    ids = [client.start_request("chat", dict(chat(p, maxTokens=24), model=model)) for p in PROMPTS]
    responses = [client.wait_response(i) for i in ids]
    return [outcome(r["result"]) for r in responses]


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2.5 (pipelines and tensor-shards) and llama3 (tensor only) at a shape that splits over
    2 and 3 ranks, each with the weight index pipeline mode reads, in one models directory."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("localmlx-group-models")) if cache is not None else tmp_path_factory.mktemp("group")
    here = tmp_path_factory.mktemp("group-models")
    for family in ("qwen2.5", "llama3"):
        fp32 = as_float32(build_group_model(root, family), tmp_path_factory.mktemp(f"{family}-fp32"))
        shardable_copy(fp32, here / family)
    # The family's own tiny 4-bit build: a rank's slice in tensor mode is narrower than a
    # quantization group, which mlx-lm's split refuses.
    shardable_copy(build(root, FAMILIES_BY_NAME["qwen2.5"], "4bit"), here / "qwen2.5-4bit")
    return here


def as_float32(src: Path, dest: Path) -> Path:
    """The checkpoint in fp32: a split matmul sums in another order than a whole one, and in
    bf16 that rounding alone flips near-ties of random weights' logits; in fp32 it does not."""
    import shutil

    import mlx.core as mx

    for file in src.iterdir():
        if file.suffix == ".safetensors":
            weights = mx.load(str(file))
            mx.save_safetensors(str(dest / file.name), {k: v.astype(mx.float32) for k, v in weights.items()},
                                metadata={"format": "mlx"})
        elif file.is_file():
            shutil.copy2(file, dest / file.name)
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _env(base: dict[str, str], models: Path) -> dict[str, str]:
    return {**base, "LOCALMLX_MODELS_DIR": str(models), "LOCALMLX_ENABLE_CACHE": "false"}


def free_port(address: str, span: int) -> int:
    """A port free on `address` with `span - 1` more after it (rank r listens on port + r)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((address, 0))
            port = int(probe.getsockname()[1])
        if port + span < 65000:
            return port
    raise RuntimeError("no free port")


def group_env(base: dict[str, str], hosts: SimulatedHosts, path: Path, mode: str, **extra: str) -> dict[str, str]:
    return {**base, "LOCALMLX_HOSTFILE": str(hosts.write_hostfile(path)),
            "LOCALMLX_DISTRIBUTED_LAUNCHER": hosts.launcher(), "LOCALMLX_DISTRIBUTED_MODE": mode,
            "LOCALMLX_DISTRIBUTED_PORT": str(free_port(hosts.address(0), hosts.n)), **extra}


@pytest.fixture(scope="module")
def reference(group_models: Path, sidecar_env: dict[str, str]) -> dict[str, Any]:
    """What one process answers: the outputs every group must reproduce."""
    with serving(_env(sidecar_env, group_models)) as client:
        out: dict[str, Any] = {}
        for family in ("qwen2.5", "llama3"):
            loaded = client.request("models/load", {"model": family})
            out[family] = {"single": run_all(client, family), "batched": run_batched(client, family),
                           "bytes": loaded["bytes"]}
        return out


@pytest.fixture(scope="module")
def hosts3() -> Iterator[SimulatedHosts]:
    with SimulatedHosts(3) as hosts:
        yield hosts


def spawn_group(env: dict[str, str]) -> SidecarClient:
    client = SidecarClient(env=env)
    schema.check("methods", "initialize", "result", client.initialize())
    return client


def gone(find: Any, within: float = 10.0) -> bool:
    """Whether `find()` comes back empty within `within` seconds (a process ending elsewhere)."""
    deadline = time.monotonic() + within
    while find() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not find()


# ---- the same tokens as one process --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_sharded_model_answers_as_one_process_does(mode: str, group_models: Path, reference: dict[str, Any],
                                                     sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        client = spawn_group(group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", mode))
        try:
            info = client.request("server/status")["group"]
            assert (info["size"], info["mode"], info["backend"]) == (2, mode, "ring")
            assert [r["address"] for r in info["ranks"]] == [hosts.address(0), hosts.address(1)]
            loaded = client.request("models/load", {"model": "qwen2.5"})
            assert loaded["bytes"] < reference["qwen2.5"]["bytes"]  # rank 0 holds a share, not all
            assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]
            assert run_batched(client, "qwen2.5") == reference["qwen2.5"]["batched"]
            status = client.request("server/status")
            schema.check("methods", "server/status", "result", status)  # the group as the schema says
            follower = status["group"]["ranks"][1]
            assert follower["alive"] and follower["memory"]["activeBytes"] > 0
        finally:
            assert client.close() == 0
        assert hosts.pids(1) == []  # the follower went with rank 0


def test_cancel_unload_and_another_model_on_a_group(group_models: Path, reference: dict[str, Any],
                                                   sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        client = spawn_group(group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor"))
        try:
            client.request("models/load", {"model": "llama3"})
            # A long stream, cancelled after a few chunks, while a second chat runs beside it.
            long_id = client.start_request("chat", dict(chat(PROMPTS[3], maxTokens=4000), model="llama3",
                                                        stream=True))
            seen = threading.Event()
            chunks: list[Any] = []

            def count(message: dict[str, Any]) -> None:
                if message.get("params", {}).get("requestId") == long_id:
                    chunks.append(message)
                    if len(chunks) >= 4:
                        seen.set()

            client.on_notification = count
            assert seen.wait(60)
            assert outcome(client.request("chat", dict(REQUESTS["greedy"], model="llama3"))) == \
                reference["llama3"]["single"]["greedy"]
            client.cancel(long_id)
            cancelled = client.wait_response(long_id)["result"]
            assert cancelled["finishReason"] == "cancelled" and cancelled["usage"]["completionTokens"] < 4000
            # The ranks still agree: the same answers after the cancel.
            assert run_all(client, "llama3") == reference["llama3"]["single"]
            client.request("models/unload", {"model": "llama3"})
            assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]
        finally:
            assert client.close() == 0


def test_three_ranks(group_models: Path, reference: dict[str, Any], sidecar_env: dict[str, str],
                     hosts3: SimulatedHosts, tmp_path: Path) -> None:
    client = spawn_group(group_env(_env(sidecar_env, group_models), hosts3, tmp_path / "hosts.json", "tensor"))
    try:
        assert client.request("server/status")["group"]["size"] == 3
        assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]
        assert run_batched(client, "qwen2.5") == reference["qwen2.5"]["batched"]
    finally:
        assert client.close() == 0
    assert hosts3.pids(1) == [] and hosts3.pids(2) == []


def test_a_model_without_the_mode_is_refused_and_the_group_serves_on(
        group_models: Path, reference: dict[str, Any], sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "pipeline",
                        LOCALMLX_MEMORY_BUDGET=str(reference["qwen2.5"]["bytes"] * 3 // 4))
        client = spawn_group(env)
        try:
            with pytest.raises(RpcCallError) as refused:
                client.request("models/load", {"model": "llama3"})
            assert refused.value.code == -32013 and "pipeline" in refused.value.message
            assert refused.value.data["reason"] == "no pipeline mode"
            # Within one rank's budget only because it is split over two.
            assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]
        finally:
            assert client.close() == 0


def test_a_model_mlx_lm_cannot_split_is_refused_before_any_follower_loads(
        group_models: Path, reference: dict[str, Any], sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        client = spawn_group(group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor"))
        try:
            with pytest.raises(RpcCallError) as refused:
                client.request("models/load", {"model": "qwen2.5-4bit"})
            assert refused.value.code == -32013 and "cannot be split in tensor mode" in refused.value.message
            assert "quantization group" in refused.value.message
            assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]  # the group serves on
        finally:
            assert client.close() == 0


def test_a_model_too_big_for_the_group_is_refused_with_figures(
        group_models: Path, reference: dict[str, Any], sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor",
                        LOCALMLX_MEMORY_BUDGET=str(reference["qwen2.5"]["bytes"] // 4))
        client = spawn_group(env)
        try:
            with pytest.raises(RpcCallError) as refused:
                client.request("models/load", {"model": "qwen2.5"})
            assert refused.value.code == -32014
            assert refused.value.data["ranks"] == 2 and refused.value.data["perRankBytes"] > refused.value.data["budgetBytes"]
        finally:
            assert client.close() == 0


# ---- idle is idle --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_group_uses_no_cpu(group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    window = 3.0 if os.environ.get("CI") else 10.0
    with SimulatedHosts(2) as hosts:
        client = spawn_group(group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor"))
        try:
            client.request("chat", dict(REQUESTS["greedy"], model="qwen2.5"))
            time.sleep(1.0)  # the tail of that request (the follower's last turn, logs) is not idle time
            pids = {"rank 0": client.process.pid, "rank 1": hosts.rank_process(1)}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(window)  # measuring idleness: nothing to wait for but time
            used = {name: (cpu_seconds(pid) - before[name]) / window for name, pid in pids.items()}
            print(f"idle CPU over {window:.0f} s: " + ", ".join(f"{n} {u:.2%}" for n, u in used.items()))
            assert all(share < 0.02 for share in used.values()), used
        finally:
            assert client.close() == 0


# ---- a rank lost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "stop", "link-down"])
def test_a_lost_follower_fails_every_request_and_the_group_re_forms(
        fault: str, group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor",
                        LOCALMLX_DISTRIBUTED_TIMEOUT="3")
        client = spawn_group(env)
        try:
            client.request("models/load", {"model": "qwen2.5"})
            stream_id = client.start_request("chat", dict(chat(PROMPTS[0], maxTokens=100000), model="qwen2.5",
                                                          stream=True))
            waiting_id = client.start_request("chat", dict(chat(PROMPTS[1], maxTokens=100000), model="qwen2.5"))
            follower = hosts.rank_process(1)
            time.sleep(0.5)  # both running
            started = time.monotonic()
            if fault == "kill":
                os.kill(follower, signal.SIGKILL)
            elif fault == "stop":
                os.kill(follower, signal.SIGSTOP)
            else:
                hosts.link_down(1)
            errors = [client.wait_response(i, timeout=30)["error"] for i in (stream_id, waiting_id)]
            noticed = time.monotonic() - started
            assert noticed < DETECTION_S, noticed
            for error in errors:
                assert error["code"] == -32019 and error["data"]["rank"] == 1, error
            expected = {"kill": {"exited", "disconnected"}, "stop": {"unresponsive"},
                        "link-down": {"unresponsive", "disconnected"}}[fault]
            assert errors[0]["data"]["reason"] in expected
            assert client.process.wait(timeout=15) == 3  # rank 0 exits for its client to restart it
            assert gone(lambda: hosts.pids(1))  # the kill of a stopped follower lands
        finally:
            client.wait_or_kill(5)
        if fault == "link-down":
            hosts.link_up(1)
        again = spawn_group(env)  # a restart re-forms the group
        try:
            assert again.request("chat", dict(REQUESTS["greedy"], model="qwen2.5"))["finishReason"]
        finally:
            assert again.close() == 0


def test_a_follower_stopped_at_the_first_token_cannot_freeze_rank_0(
        group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    """Stopped right at a stream's first token, the follower leaves rank 0's next collective
    waiting while mlx-lm's decode loop calls mx.clear_cache. That call waits holding the GIL,
    which froze every thread of rank 0 (the exit by the C-level backstop, not an answer, in
    about half the runs); rank 0 now waits for the streams with the GIL released first
    (sidecar.engine.gil_waits), so its monitor runs and the request is answered -32019 within
    10 s, rank 0 exits 3, no rank is left, and a restart re-forms the group."""
    with SimulatedHosts(2) as hosts:
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor",
                        LOCALMLX_DISTRIBUTED_TIMEOUT="3")
        client = spawn_group(env)
        try:
            client.request("models/load", {"model": "qwen2.5"})
            follower = hosts.rank_process(1)
            first_text = threading.Event()

            def stop_at_first_text(message: dict[str, Any]) -> None:
                if message.get("params", {}).get("text") and not first_text.is_set():
                    os.kill(follower, signal.SIGSTOP)
                    first_text.set()

            client.on_notification = stop_at_first_text
            stream_id = client.start_request("chat", dict(chat(PROMPTS[0], maxTokens=100000), model="qwen2.5",
                                                          stream=True))
            assert first_text.wait(60)
            started = time.monotonic()
            error = client.wait_response(stream_id, timeout=30).get("error")
            assert time.monotonic() - started < DETECTION_S
            assert error is not None and error["code"] == -32019 and error["data"]["rank"] == 1, error
            assert client.process.wait(timeout=15) == 3
            assert gone(lambda: hosts.pids(1))  # the kill of a stopped follower lands
        finally:
            client.wait_or_kill(5)
        again = spawn_group(env)
        try:
            assert again.request("chat", dict(REQUESTS["greedy"], model="qwen2.5"))["finishReason"]
        finally:
            assert again.close() == 0


def test_a_frozen_rank_0_exits_by_its_backstop_and_leaves_no_rank(
        group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    """The frozen case made certain: a generation waits in C holding the GIL (as mx.clear_cache
    does on a stuck collective). The monitor cannot run; its C-level backstop exits rank 0 within
    the timeout and two heartbeats, and the follower goes with it (its guard ends it when the
    lifeline closes)."""
    with SimulatedHosts(2) as hosts:
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor",
                        LOCALMLX_DISTRIBUTED_TIMEOUT="3", LOCALMLX_INJECT_FAULTS="freeze")
        client = spawn_group(env)
        try:
            client.request("models/load", {"model": "qwen2.5"})
            request_id = client.start_request("chat", dict(REQUESTS["greedy"], model="qwen2.5"))
            started = time.monotonic()
            with pytest.raises(SidecarExited):
                client.wait_response(request_id, timeout=30)
            assert time.monotonic() - started < DETECTION_S
            assert client.process.wait(timeout=5) == 1
            assert any("Timeout" in line for line in client.stderr_lines), client.stderr_lines[-5:]
            assert gone(lambda: hosts.pids(1))  # its guard ends the follower when rank 0's lifeline closes
        finally:
            client.wait_or_kill(5)


def test_an_unreachable_host_is_named_when_the_group_cannot_form(
        group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    with SimulatedHosts(2) as hosts:
        hosts.link_down(1)
        env = group_env(_env(sidecar_env, group_models), hosts, tmp_path / "hosts.json", "tensor",
                        LOCALMLX_DISTRIBUTED_TIMEOUT="1")
        client = SidecarClient(env=env)
        try:
            with pytest.raises((SidecarExited, RpcCallError, OSError, TimeoutError)):
                client.initialize()
            assert client.process.wait(timeout=60) == 4
            said = [line for line in client.stderr_lines if line.startswith("localmlx: cannot form the group")]
            assert said and hosts.address(1) in said[0], client.stderr_lines[-5:]
        finally:
            client.wait_or_kill(5)
        assert hosts.pids(1) == []


def test_a_public_address_is_refused(group_models: Path, sidecar_env: dict[str, str], tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "far", "ips": ["8.8.8.8"]}]))
    client = SidecarClient(env={**_env(sidecar_env, group_models), "LOCALMLX_HOSTFILE": str(hostfile)})
    try:
        with pytest.raises((SidecarExited, RpcCallError, OSError, TimeoutError)):
            client.initialize()
        assert client.process.wait(timeout=30) == 4
        said = [line for line in client.stderr_lines if line.startswith("localmlx: cannot form the group")]
        assert said and "8.8.8.8" in said[0] and "LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC" in said[0]
    finally:
        client.wait_or_kill(5)


# ---- over real SSH -------------------------------------------------------------------------------

_ssh_ok, _ssh_why = sshd_available()


@pytest.mark.skipif(not _ssh_ok, reason=_ssh_why)
@pytest.mark.parametrize("fault", [None, "stop"])
def test_a_group_started_over_ssh_serves_and_leaves_no_rank(
        fault: str | None, group_models: Path, reference: dict[str, Any], sidecar_env: dict[str, str],
        tmp_path: Path) -> None:
    """The stock ssh client and a host's sshd, with the default launcher: the follower runs under
    a login shell on the other host, its log comes back through ssh, and it goes when rank 0
    goes, also when it was stopped (then nothing on that host can notice the link close)."""
    with SimulatedHosts(2) as hosts, SshServers(hosts, tmp_path) as ssh:
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps(ssh.hostfile_names()))
        env = {**_env(sidecar_env, group_models), "LOCALMLX_HOSTFILE": str(hostfile),
               "LOCALMLX_DISTRIBUTED_LAUNCHER": ssh.launcher(), "LOCALMLX_DISTRIBUTED_MODE": "tensor",
               "LOCALMLX_DISTRIBUTED_PORT": str(free_port(hosts.address(0), 2)),
               "LOCALMLX_DISTRIBUTED_TIMEOUT": "3"}
        client = spawn_group(env)
        try:
            ranks = client.request("server/status")["group"]["ranks"]
            assert [(r["host"], r["address"]) for r in ranks] == [("localhost", hosts.address(0)),
                                                                  ("host1", hosts.address(1))]
            assert run_all(client, "qwen2.5") == reference["qwen2.5"]["single"]
            assert any("rank 1" in line for line in client.stderr_lines), client.stderr_lines[-5:]
            if fault == "stop":
                os.kill(hosts.rank_process(1), signal.SIGSTOP)
                request_id = client.start_request("chat", dict(REQUESTS["greedy"], model="qwen2.5"))
                error = client.wait_response(request_id, timeout=DETECTION_S)["error"]
                assert error["code"] == -32019 and error["data"]["reason"] == "unresponsive", error
                assert client.process.wait(timeout=15) == 3
            else:
                assert client.close() == 0
            assert gone(lambda: ssh.followers(1)), "a follower was left running on host 1"
        finally:
            client.wait_or_kill(5)

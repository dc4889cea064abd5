"""Faults and hostile input, each against the real sidecar: what happens is what
RELIABILITY.md says happens."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sidecar.client import RpcCallError, SidecarClient, sidecar_command
from sidecar.protocol_defs import (
    BUSY,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    SERVER_CANCELLED,
)

from .conftest import chat_params
from .test_models import copy_demo


def raw_line(client: SidecarClient, needle: bytes, response: bool = True) -> bytes:
    """The first line read that contains `needle` (a response, or a notification)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for received in list(client.received):
            if needle in received.line and (b'"method"' not in received.line) == response:
                return received.line
        time.sleep(0.005)
    raise AssertionError(f"no line with {needle!r}")


def raw_response(client: SidecarClient, id_text: str) -> bytes:
    """The response line whose id is written exactly `id_text`."""
    return raw_line(client, b'"id":' + id_text.encode() + b",")


# ---- input --------------------------------------------------------------------------------


@pytest.mark.parametrize("id_text", ["123456789012345678901234567890", "-9223372036854775809", "1e400",
                                     "1.50", "2.5", "18446744073709551615", "-0"])
def test_numeric_ids_are_echoed_as_the_same_text(sidecar, id_text) -> None:
    sidecar.send_raw(b'{"jsonrpc":"2.0","id":' + id_text.encode() + b',"method":"ping"}\n')
    assert raw_response(sidecar, id_text).startswith(b'{"jsonrpc":"2.0","id":' + id_text.encode() + b',')


def test_a_cancel_names_an_exact_numeric_id(sidecar) -> None:
    params = json.dumps(chat_params("Tell me everything.", maxTokens=1900, stream=True)).encode()
    sidecar.send_raw(b'{"jsonrpc":"2.0","id":1e400,"method":"chat","params":' + params + b"}\n")
    raw_line(sidecar, b'"requestId":1e400', response=False)  # streaming
    sidecar.send_raw(b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1e400}}\n')
    line = raw_response(sidecar, "1e400")
    assert b'"finishReason":"cancelled"' in line


@pytest.mark.parametrize("extra", [{"seed": 0.0}, {"seed": 5.0}, {"seed": 1e19}, {"topK": 2.0},
                                   {"maxTokens": 3.0, "seed": 7}, {"repetitionContextSize": 8.0,
                                                                    "presencePenalty": 0.5}])
def test_integral_floats_are_integers(sidecar, extra) -> None:
    result = sidecar.request("chat", chat_params("The sea", temperature=0.8, **{"maxTokens": 3, "seed": 1, **extra}))
    assert result["usage"]["completionTokens"] == 3


def test_values_mlx_cannot_take_are_invalid_params(sidecar) -> None:
    for extra in ({"seed": 2**64}, {"seed": 1e20}, {"topK": 2.5}, {"seed": -1}):
        with pytest.raises(RpcCallError) as refused:
            sidecar.request("chat", chat_params("x", **extra))
        assert refused.value.code == INVALID_PARAMS, extra


def test_deeply_nested_params_are_invalid_params_not_a_crash(sidecar) -> None:
    for depth in (950, 995, 1000):
        nested = b"[" * depth + b'"x"' + b"]" * depth
        for method, name in (("chat", b"messages"), ("tokenize", b"text")):
            sidecar.send_raw(b'{"jsonrpc":"2.0","id":"%s-%d","method":"%s","params":{"%s":%s}}\n'
                             % (method.encode(), depth, method.encode(), name, nested))
            line = raw_response(sidecar, f'"{method}-{depth}"')
            assert f'"code":{INVALID_PARAMS}'.encode() in line, line[:300]
    assert sidecar.request("ping") == {}


def test_a_model_name_with_a_lone_surrogate_is_forbidden(sidecar) -> None:
    sidecar.send_raw(b'{"jsonrpc":"2.0","id":"s","method":"models/load","params":{"model":"\\ud800/x"}}\n')
    assert f'"code":{FORBIDDEN}'.encode() in raw_response(sidecar, '"s"')


def test_errors_never_echo_a_large_bad_value(sidecar) -> None:
    huge = "m" * (8 << 20)
    response = sidecar.call("chat", {"messages": huge})
    assert response["error"]["code"] == INVALID_PARAMS
    assert len(json.dumps(response)) < 2048


def test_an_exception_inside_mlx_lm_is_an_internal_error_without_details(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_INJECT_FAULTS="generation")
    failed = client.call("chat", chat_params("The sea", maxTokens=20, cache=False))
    assert failed["error"]["code"] == INTERNAL_ERROR and failed["error"]["data"] == {"method": "chat"}
    assert "injected" not in json.dumps(failed)  # the exception's text stays in the log
    assert client.request("chat", chat_params("The sea", maxTokens=20, cache=False))["finishReason"] == "length"
    assert client.request("server/status")["models"][0]["model"] == "demo"
    client.wait_for_log("injected fault")
    assert client.close() == 0


def test_an_exception_inside_a_method_is_a_bare_internal_error_and_the_traceback_goes_to_stderr(sidecars) -> None:
    """jsonrpcserver's own catch-all would answer with the exception's text: the method's
    exception reaches the session instead, which answers -32603 with a generic message and
    data {method}, logs the traceback, and goes on serving."""
    client = sidecars.spawn(LOCALMLX_INJECT_FAULTS="method:tokenize")
    failed = client.call("tokenize", {"text": "waves"})
    assert failed["error"] == {"code": INTERNAL_ERROR, "message": "Internal error", "data": {"method": "tokenize"}}
    client.wait_for_log("internal error in tokenize")
    client.wait_for_log("Traceback (most recent call last)")
    client.wait_for_log("RuntimeError: injected fault (LOCALMLX_INJECT_FAULTS=method:tokenize)")
    assert client.request("tokenize", {"text": "waves"})["tokens"]  # once only; the session goes on
    assert client.close() == 0


def test_rss_bytes_is_the_current_resident_set_size(sidecar) -> None:
    """server/status's rssBytes is what the OS reports for the process now (psutil, from
    outside), not its peak."""
    import psutil

    sidecar.request("tokenize", {"text": "warm"})  # MLX imported: the memory counters are live
    process = psutil.Process(sidecar.process.pid)
    for _ in range(3):
        before = process.memory_info().rss
        reported = sidecar.request("server/status")["memory"]["rssBytes"]
        after = process.memory_info().rss
        assert min(before, after) - (4 << 20) <= reported <= max(before, after) + (4 << 20)


def test_a_flood_of_requests_is_read_with_bounded_memory(sidecars) -> None:
    """Lines are read only as fast as they are dispatched, and answers only as fast as the
    client reads them: memory stays flat however fast the client writes."""
    client = sidecars.spawn(LOCALMLX_MAX_PENDING_REQUESTS="256")
    client.request("tokenize", {"text": "warm"})
    before = rss_bytes(client.process.pid)
    lines = b"".join(b'{"jsonrpc":"2.0","id":%d,"method":"tokenize","params":{"text":"waves %d"}}\n'
                     % (i, i) for i in range(100, 30100))
    client.send_raw(lines)
    last = client.start_request("ping")
    client.wait_response(last, timeout=120)
    deadline = time.monotonic() + 120
    while len(answers := [r.message for r in list(client.received)
                          if isinstance(r.message.get("id"), int) and r.message["id"] >= 100]) < 30000:
        assert time.monotonic() < deadline, f"{len(answers)} of 30000 answered"
        time.sleep(0.05)
    assert sorted(a["id"] for a in answers) == list(range(100, 30100))
    assert all("result" in a or a["error"]["code"] == BUSY for a in answers)
    assert sum("result" in a for a in answers) > 256
    assert rss_bytes(client.process.pid) - before < 96 << 20
    assert client.close() == 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# ---- models on disk -----------------------------------------------------------------------


def test_a_model_folder_deleted_while_loaded(sidecars, models_dir: Path, tmp_path: Path) -> None:
    copy_demo(models_dir, tmp_path / "models" / "doomed")
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    client.request("models/load", {"model": "doomed"})
    shutil.rmtree(tmp_path / "models" / "doomed")
    # Its weights are in memory: it goes on answering until unloaded.
    assert client.request("chat", chat_params("The sea", model="doomed", maxTokens=5))["finishReason"] == "length"
    assert client.request("models/unload", {"model": "doomed"})["unloaded"] is True
    with pytest.raises(RpcCallError) as gone:
        client.request("models/load", {"model": "doomed"})
    assert gone.value.code == MODEL_NOT_FOUND
    assert client.close() == 0


def test_a_truncated_safetensors_file_fails_its_load_and_nothing_else(sidecars, models_dir: Path,
                                                                     tmp_path: Path) -> None:
    copy_demo(models_dir, tmp_path / "models" / "torn")
    weights = tmp_path / "models" / "torn" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    client.request("models/load", {"model": "demo"})
    with pytest.raises(RpcCallError) as failed:
        client.request("models/load", {"model": "torn"})
    assert failed.value.code == MODEL_LOAD_FAILED and failed.value.data["model"] == "torn"
    assert len(failed.value.message) < 400
    assert client.request("chat", chat_params("The sea", maxTokens=3))["model"] == "demo"
    assert client.request("models/status", {"model": "torn"})["state"] == "available"
    assert client.close() == 0


def test_a_full_disk_while_building_leaves_nothing_half_written(sidecars, tmp_path: Path) -> None:
    """The demo model is built on first use; with no room to write it, the load fails
    cleanly, no partial model is left behind, and the sidecar keeps serving."""
    models = tmp_path / "empty-models"
    models.mkdir()

    def small_files_only() -> None:  # in the child: writes past 1 MiB fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    client = SidecarClient(sidecar_command(), env={**sidecars.env, "LOCALMLX_MODELS_DIR": str(models)},
                           preexec_fn=small_files_only)
    sidecars.spawned.append(client)
    client.initialize(name="pytest")
    with pytest.raises(RpcCallError) as failed:
        client.request("models/load", {"model": "demo"})
    assert failed.value.code == MODEL_LOAD_FAILED
    assert list(models.iterdir()) == []  # no half-written model, no temporary directory
    assert client.request("models/status", {"model": "demo"})["state"] == "available"
    assert client.request("ping") == {}
    assert client.close() == 0


# ---- the process ----------------------------------------------------------------------------


def test_sigterm_mid_generation_answers_and_exits_0_within_2_s(sidecars) -> None:
    client = sidecars.spawn()
    running = client.start_request("chat", chat_params("Tell me everything.", maxTokens=1900, stream=True))
    while not any(r.message.get("method") == "generate/chunk" for r in list(client.received)):
        time.sleep(0.005)
    started = time.monotonic()
    client.process.send_signal(signal.SIGTERM)
    assert client.process.wait(5) == 0
    assert time.monotonic() - started < 2.0
    error = client.wait_response(running, timeout=1)["error"]
    assert error["code"] == SERVER_CANCELLED and error["data"]["reason"] == "shutdown"
    assert error["data"]["usage"]["completionTokens"] > 0


def test_the_sidecar_goes_when_its_parent_dies_even_with_stdin_open(sidecar_env, tmp_path: Path) -> None:
    """The parent is killed, but a sibling keeps the write end of the sidecar's stdin open,
    so no end-of-file ever comes: the parent watchdog ends the sidecar."""
    pid_file = tmp_path / "sidecar.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        read, write = os.pipe()
        child = subprocess.Popen({sidecar_command()!r}, stdin=read, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[write],
                                  start_new_session=True)
        open({str(pid_file)!r} + ".holder", "w").write(str(holder.pid))
        os.write(write, b'{{"jsonrpc":"2.0","id":1,"method":"ping"}}\\n')
        child.stdout.readline()  # answered: it is serving
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)], env={**os.environ, **sidecar_env})
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the sidecar did not start"
            time.sleep(0.01)
        sidecar_pid = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        killed_at = time.monotonic()
        while process_alive(sidecar_pid):
            assert time.monotonic() - killed_at < 2.0, "the sidecar outlived its parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        holder = Path(str(pid_file) + ".holder")
        if holder.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(holder.read_text()), signal.SIGKILL)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_ctrl_c_at_a_terminal_stops_the_sidecar_without_a_traceback(sidecar_env) -> None:
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "sidecar", "serve"], env={**os.environ, **sidecar_env},
                          timeout=30)
    try:
        child.expect("serving")
        child.sendintr()
        child.expect(pexpect.EOF)
        output = child.before.decode("utf-8", "replace")
    finally:
        child.close()
    assert child.exitstatus == 0, output
    assert "Traceback" not in output

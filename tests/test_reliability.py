"""The sidecar under pressure: cancellation, queue limits, a vanishing client, stray output."""

from __future__ import annotations

import os
import random
import sys
import textwrap
import time

import pytest

from sidecar.client import RpcCallError
from sidecar.protocol_defs import BUSY, INVALID_REQUEST, SERVER_CANCELLED

from .conftest import chat_params

LONG = chat_params("Tell me everything.", maxTokens=1900)


def wait_for_chunks(client, id_, n: int = 2, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for r in client.received if r.message.get("method") == "generate/chunk"
               and r.message["params"]["requestId"] == id_) >= n:
            return
        time.sleep(0.005)
    raise AssertionError("generation did not start")


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_cancel_stops_a_running_generation_within_a_step(sidecar) -> None:
    id_ = sidecar.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(sidecar, id_)
    sidecar.cancel(id_)
    result = sidecar.wait_response(id_, timeout=10)["result"]
    assert result["finishReason"] == "cancelled"
    assert 0 < result["usage"]["completionTokens"] < 1900
    seqs = [r.message["params"]["seq"] for r in sidecar.received if r.message.get("method") == "generate/chunk"]
    assert seqs == list(range(len(seqs)))
    responses = [r for r in sidecar.received if r.message.get("id") == id_]
    assert len(responses) == 1


def test_queued_requests_are_answered_at_once_when_cancelled(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_MAX_BATCH_SIZE="1")  # one generation at a time: the next one waits
    running = client.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(client, running)
    queued_chat = client.start_request("chat", chat_params(maxTokens=5))
    wait_until(lambda: client.request("server/status")["requests"]["queued"] == 1)
    client.cancel(queued_chat)
    chat = client.wait_response(queued_chat, timeout=5)
    assert chat["result"]["finishReason"] == "cancelled" and chat["result"]["text"] == ""
    assert chat["result"]["usage"]["completionTokens"] == 0
    assert not any(r.message.get("id") == running for r in client.received), "still running"
    client.cancel(running)
    assert client.wait_response(running)["result"]["finishReason"] == "cancelled"
    assert client.close() == 0


def test_full_queue_answers_busy_and_keeps_serving(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_MAX_QUEUE="1", LOCALMLX_MAX_BATCH_SIZE="1")
    running = client.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(client, running)
    queued = client.start_request("chat", chat_params(maxTokens=3))
    with pytest.raises(RpcCallError) as busy:
        client.request("chat", chat_params(maxTokens=3, cache=False))
    assert busy.value.code == BUSY and busy.value.data["maxQueue"] == 1
    client.cancel(running)
    assert client.wait_response(queued)["result"]["finishReason"] == "length"
    assert client.close() == 0


def test_unload_cancels_work_on_that_model_with_server_cancelled(sidecar) -> None:
    running = sidecar.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(sidecar, running)
    assert sidecar.request("models/unload", {"model": "demo"}) == {"model": "demo", "unloaded": True}
    error = sidecar.wait_response(running)["error"]
    assert error["code"] == SERVER_CANCELLED and error["data"]["reason"] == "unload"


def test_stdin_eof_mid_generation_ends_the_process_promptly(sidecars) -> None:
    client = sidecars.spawn()
    id_ = client.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(client, id_)
    started = time.monotonic()
    client.process.stdin.close()
    assert client.process.wait(10) == 0
    assert time.monotonic() - started < 5


def test_client_that_stops_reading_and_vanishes_does_not_wedge(sidecars) -> None:
    client = sidecars.spawn()
    client.start_request("chat", dict(LONG, stream=True))
    time.sleep(0.3)
    client.process.stdout.close()  # EPIPE on the next write
    client.process.stdin.close()
    assert client.process.wait(10) == 0


def test_shutdown_then_exit_is_code_0_and_exit_alone_is_code_1(sidecars) -> None:
    graceful = sidecars.spawn()
    graceful.request("chat", chat_params(maxTokens=2))
    assert graceful.close() == 0
    abrupt = sidecars.spawn()
    abrupt.send({"jsonrpc": "2.0", "method": "exit"})
    assert abrupt.process.wait(10) == 1


def test_stdout_carries_only_protocol_even_when_everything_else_prints(sidecars, tmp_path) -> None:
    """Python prints, raw writes to fd 1 and child processes all land on stderr."""
    noisy = tmp_path / "noisy_sidecar.py"
    noisy.write_text(textwrap.dedent("""
        import os, subprocess, sys, threading
        def shout():
            print("print-to-stdout")
            sys.stdout.flush()
            os.write(1, b"raw-fd1-write\\n")
            subprocess.run([sys.executable, "-c", "print('child-process-output')"])
            threading.Timer(0.05, shout).start()
        threading.Timer(0.2, shout).start()
        from sidecar.cli import main
        main(["serve"])
    """))
    client = sidecars.spawn(args=[sys.executable, str(noisy)])
    for _ in range(3):
        client.request("chat", chat_params(maxTokens=20))
        time.sleep(0.2)
    assert client.close() == 0
    assert client.junk == []
    stderr = "\n".join(client.stderr_lines)
    for marker in ("print-to-stdout", "raw-fd1-write", "child-process-output"):
        assert marker in stderr


def test_large_request_is_accepted_below_the_limit(sidecar) -> None:
    text = "wave " * 200_000  # ~1 MB line
    tokens = sidecar.request("tokenize", {"text": text})["tokens"]
    assert len(tokens) > 100_000


def test_no_thread_or_process_leaks_after_close(sidecars) -> None:
    client = sidecars.spawn()
    pid = client.process.pid
    assert client.close() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_shutdown_cancels_running_and_queued_work_with_server_cancelled(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_MAX_BATCH_SIZE="1")
    running = client.start_request("chat", dict(LONG, stream=True))
    wait_for_chunks(client, running)
    queued = client.start_request("generate", {"prompt": "x", "maxTokens": 5})
    assert client.request("shutdown", timeout=10) == {}
    errors = [client.wait_response(id_, timeout=5)["error"] for id_ in (running, queued)]
    assert all(e["code"] == SERVER_CANCELLED and e["data"]["reason"] == "shutdown" for e in errors)
    assert errors[0]["data"]["usage"]["completionTokens"] > 0
    with pytest.raises(RpcCallError) as refused:
        client.request("chat", chat_params(maxTokens=2))
    assert refused.value.code == INVALID_REQUEST
    assert client.close() == 0


def test_a_storm_of_hostile_lines_never_stops_the_service(sidecar) -> None:
    """Garbage of every kind interleaved with real requests: every request is answered,
    every garbage line gets at most its one error, and the process keeps serving."""
    rng = random.Random(7)
    garbage = [b"{", b"\xff\xfe\x00", b"[]", b"[1,2]", b'{"jsonrpc":"2.0"}', b"null", b'"x"',
               b'{"jsonrpc":"2.0","method":"chat","params":{"messages":"no"}}',
               b'{"jsonrpc":"2.0","id":[],"method":"ping"}', b"\r", b" " * 100,
               b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":{"deep":[1]}}}',
               b'{"jsonrpc":"2.0","id":"g","method":"models/load","params":{"model":"../../../etc"}}']
    ids = []
    for i in range(200):
        sidecar.send_raw(rng.choice(garbage) + b"\n")
        if i % 5 == 0:
            ids.append(sidecar.start_request("tokenize", {"text": f"request {i}"}))
    answers = [sidecar.wait_response(id_, timeout=30) for id_ in ids]
    # Real requests either succeed or, while 40 pile up behind the first load, are refused as busy.
    assert all("result" in a or a["error"]["code"] == BUSY for a in answers)
    assert sum("result" in a for a in answers) >= 10
    assert sidecar.request("ping") == {}
    errors = [r.message for r in sidecar.received if isinstance(r.message, dict) and "error" in r.message]
    assert len(errors) <= 200 + len(ids)

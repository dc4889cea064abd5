"""The engine under load, driven through the real sidecar: concurrent generations batch and
say what they say alone, control calls never wait for a generation, a slow reader stalls
nothing, and the caches belong to their model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sidecar.client import SidecarClient

from .conftest import arrival, chat_params, chunks_of, streamed_text

# Distinct prompts of mixed lengths (the batch pads them differently).
PROMPTS = ["Hi", "Tell me about the sea and the mountains, and the old friends they were.",
           "Why?", "Once upon a time, in a land of tides and storms and moons, there lived a keeper who"]


def fresh(content: str, **extra: object) -> dict:
    """A greedy chat the exact response cache never answers."""
    return chat_params(content, cache=False, **extra)


def alone(client: SidecarClient, prompts: list[str], **extra: object) -> list[str]:
    return [client.request("chat", fresh(p, **extra))["text"] for p in prompts]


def sidecar_rss_bytes(client: SidecarClient) -> int:
    with open(f"/proc/{client.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def plain(sidecars) -> SidecarClient:
    """No prefix cache: every request computes its whole prompt, alone or batched."""
    client = sidecars.spawn(LOCALMLX_PREFIX_CACHE="false")
    yield client
    assert client.junk == []
    assert client.close() == 0


# ---- continuous batching --------------------------------------------------------------------


def test_concurrent_generations_share_a_batch_and_say_what_they_say_alone(plain) -> None:
    expected = alone(plain, PROMPTS, maxTokens=120)
    ids = [plain.start_request("chat", fresh(p, maxTokens=120, stream=True)) for p in PROMPTS]
    results = [plain.wait_response(id_)["result"] for id_ in ids]
    assert [streamed_text(plain, id_) for id_ in ids] == expected
    assert all(r["usage"]["completionTokens"] == 120 for r in results)
    # They ran together: every one started before any finished.
    assert max(arrival(plain, id_, first_chunk=True) for id_ in ids) < min(arrival(plain, id_) for id_ in ids)


def test_seeded_sampling_is_the_same_batched_or_alone(plain) -> None:
    sampled = {"temperature": 0.9, "topP": 0.95, "seed": 1234, "maxTokens": 60}
    expected = alone(plain, PROMPTS[:2], **sampled)
    assert expected != alone(plain, PROMPTS[:2], **dict(sampled, seed=99)), "the seed must matter"
    noise = [plain.start_request("chat", fresh(p, temperature=1.0, maxTokens=80)) for p in PROMPTS[2:]]
    ids = [plain.start_request("chat", fresh(p, **sampled)) for p in PROMPTS[:2]]
    assert [plain.wait_response(id_)["result"]["text"] for id_ in ids] == expected
    for id_ in noise:
        plain.wait_response(id_)


def test_a_request_joins_a_running_batch_without_disturbing_it(plain) -> None:
    [long_alone] = alone(plain, PROMPTS[:1], maxTokens=400)
    [short_alone] = alone(plain, PROMPTS[1:2], maxTokens=100)
    long_id = plain.start_request("chat", fresh(PROMPTS[0], maxTokens=400, stream=True))
    wait_for_chunks(plain, long_id, 20)
    short = plain.request("chat", fresh(PROMPTS[1], maxTokens=100))
    assert not any(r.message.get("id") == long_id for r in plain.received), "joined while the other ran"
    plain.wait_response(long_id)
    assert streamed_text(plain, long_id) == long_alone and short["text"] == short_alone


def test_a_sampled_generation_moves_into_the_batch_without_changing_a_token(sidecars) -> None:
    """Alone, a generation runs on mlx-lm's single-stream path; when another arrives it moves
    into the batch with its KV cache, its sampler's draws and its penalties' context."""
    client = sidecars.spawn()  # prefix cache on: the mover's cache must come along intact
    params = {"temperature": 0.8, "seed": 21, "presencePenalty": 0.5, "repetitionContextSize": 64,
              "maxTokens": 300}
    [expected] = alone(client, PROMPTS[:1], **params)
    moving = client.start_request("chat", fresh(PROMPTS[0], stream=True, **params))
    wait_for_chunks(client, moving, 30)
    client.request("chat", fresh(PROMPTS[1], maxTokens=60))
    assert not any(r.message.get("id") == moving for r in client.received), "joined while it ran"
    client.wait_response(moving)
    assert streamed_text(client, moving) == expected
    assert client.close() == 0


def test_cancelling_one_generation_leaves_the_others_untouched(plain) -> None:
    expected = alone(plain, PROMPTS[:3], maxTokens=200)
    ids = [plain.start_request("chat", fresh(p, maxTokens=200, stream=True)) for p in PROMPTS[:3]]
    wait_for_chunks(plain, ids[1], 5)
    plain.cancel(ids[1])
    results = [plain.wait_response(id_)["result"] for id_ in ids]
    assert results[1]["finishReason"] == "cancelled" and results[1]["usage"]["completionTokens"] < 200
    assert [streamed_text(plain, ids[0]), streamed_text(plain, ids[2])] == [expected[0], expected[2]]
    assert expected[1].startswith(streamed_text(plain, ids[1]))


def test_batching_off_runs_generations_one_at_a_time_in_order(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_BATCHING="false", LOCALMLX_PREFIX_CACHE="false")
    assert client.request("models/load", {"model": "demo"})
    ids = [client.start_request("chat", fresh(p, maxTokens=40, stream=True)) for p in PROMPTS]
    [client.wait_response(id_) for id_ in ids]
    order = [arrival(client, id_) for id_ in ids]
    assert order == sorted(order)
    assert arrival(client, ids[1], first_chunk=True) > arrival(client, ids[0])  # one after another
    assert [streamed_text(client, id_) for id_ in ids] == alone(client, PROMPTS, maxTokens=40)
    assert client.close() == 0


# ---- control work between steps -----------------------------------------------------------


def wait_for_chunks(client: SidecarClient, id_, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(chunks_of(client, id_)) < n:
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.005)


def test_control_calls_are_answered_while_a_generation_runs(sidecar) -> None:
    running = sidecar.start_request("chat", fresh("Tell me everything.", maxTokens=1900, stream=True))
    wait_for_chunks(sidecar, running, 5)
    assert sidecar.request("tokenize", {"text": "hello sea"})["tokens"]
    status = sidecar.request("server/status")
    assert status["requests"]["active"] == 1 and status["requests"]["queued"] == 0
    assert sidecar.request("models/status", {"model": "demo"})["state"] == "loaded"
    assert sidecar.request("ping") == {}
    assert not any(r.message.get("id") == running for r in sidecar.received), "answered before it ended"
    sidecar.cancel(running)
    assert sidecar.wait_response(running)["result"]["finishReason"] == "cancelled"


def test_two_models_are_served_fairly(sidecars, models_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "models" / "second"
    shutil.copytree(models_dir / "localmlx-demo", second)
    shutil.copytree(models_dir / "localmlx-demo", tmp_path / "models" / "localmlx-demo")
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    for model in ("demo", "second"):
        client.request("models/load", {"model": model})
    ids = [client.start_request("chat", fresh("Go on.", model=model, maxTokens=400, stream=True))
           for model in ("demo", "second")]
    [client.wait_response(id_) for id_ in ids]
    # Neither waited for the other: each started streaming before the other ended.
    assert arrival(client, ids[1], first_chunk=True) < arrival(client, ids[0])
    assert arrival(client, ids[0], first_chunk=True) < arrival(client, ids[1])
    assert client.close() == 0


# ---- back-pressure ------------------------------------------------------------------------


def fill_the_pipe(client: SidecarClient) -> list:
    """Requests whose answers (> 64 KiB) fill the pipe of a client that is not reading."""
    return [client.start_request("ping") for _ in range(2500)]


def test_a_client_that_stops_reading_does_not_stall_the_engine(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_PREFIX_CACHE="false")
    expected = alone(client, PROMPTS, maxTokens=300)
    before = sidecar_rss_bytes(client)
    client.pause_reading()
    pings = fill_the_pipe(client)
    ids = [client.start_request("chat", fresh(p, maxTokens=300, stream=True)) for p in PROMPTS]
    # With nobody reading, every generation still runs to its end.
    client.wait_for_log("length after", count=len(PROMPTS) * 2)
    assert sidecar_rss_bytes(client) - before < 64 << 20
    client.resume_reading()
    [client.wait_response(id_) for id_ in pings + ids]
    assert [streamed_text(client, id_) for id_ in ids] == expected
    assert any(len(chunks_of(client, id_)) < 300 for id_ in ids), "waiting text is joined into fewer chunks"
    assert client.close() == 0


def test_a_load_reporting_progress_goes_on_while_the_client_is_not_reading(sidecars, models_dir: Path,
                                                                          tmp_path: Path) -> None:
    """Progress lines queue like everything else: neither the engine thread nor the event
    loop ever waits on a full pipe."""
    shutil.copytree(models_dir / "localmlx-demo", tmp_path / "models" / "localmlx-demo")
    shutil.copytree(models_dir / "localmlx-demo", tmp_path / "models" / "second")
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(tmp_path / "models"))
    client.pause_reading()
    pings = fill_the_pipe(client)
    load = client.start_request("models/load", {"model": "second", "_meta": {"progressToken": "p"}})
    client.wait_for_log("loaded second")
    tokenize = client.start_request("tokenize", {"model": "second", "text": "the sea"})
    client.resume_reading()
    [client.wait_response(id_) for id_ in pings]
    assert client.wait_response(load)["result"]["alreadyLoaded"] is False
    assert client.wait_response(tokenize)["result"]["tokens"]
    progress = [r.message["params"] for r in client.received if r.message.get("method") == "$/progress"]
    assert [p["phase"] for p in progress][-1] == "ready"
    assert client.close() == 0


def test_a_stream_over_its_buffer_pauses_alone_and_resumes_where_it_stopped(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_PREFIX_CACHE="false", LOCALMLX_STREAM_BUFFER_BYTES="64")
    sampled = {"temperature": 0.8, "seed": 5, "maxTokens": 200}
    expected = alone(client, PROMPTS[:2], **sampled)
    client.pause_reading()
    pings = fill_the_pipe(client)
    ids = [client.start_request("chat", fresh(p, stream=True, **sampled)) for p in PROMPTS[:2]]
    client.wait_for_log("paused: its client has not read", count=2)
    unstreamed = client.start_request("chat", fresh(PROMPTS[2], maxTokens=50))
    client.wait_for_log(f"request {unstreamed!r} on demo: length")  # the others go on
    client.resume_reading()
    [client.wait_response(id_) for id_ in pings]
    results = [client.wait_response(id_)["result"] for id_ in ids]
    assert all(r["usage"]["completionTokens"] == 200 for r in results)
    assert [streamed_text(client, id_) for id_ in ids] == expected  # the same draws, paused or not
    assert client.wait_response(unstreamed)["result"]["usage"]["completionTokens"] == 50
    client.wait_for_log("resumed", count=2)
    assert client.request("server/status")["requests"]["paused"] == 0
    assert client.close() == 0


# ---- caches ---------------------------------------------------------------------------------


def test_the_prefix_cache_goes_with_its_model(sidecar) -> None:
    messages = [{"role": "user", "content": "Tell me about waves and the moon."}]
    first = sidecar.request("chat", {"messages": messages, "maxTokens": 30, "temperature": 0})
    assert first["usage"]["cachedTokens"] == 0
    follow_up = [*messages, {"role": "assistant", "content": first["text"]},
                 {"role": "user", "content": "And tides?"}]
    second = sidecar.request("chat", {"messages": follow_up, "maxTokens": 30, "temperature": 0})
    assert second["usage"]["cachedTokens"] > first["usage"]["promptTokens"] // 2
    status = sidecar.request("server/status")
    assert status["memory"]["promptCacheBytes"] > 0 and status["caches"]["demo"]["prefixBytes"] > 0
    sidecar.request("models/unload", {"model": "demo"})
    status = sidecar.request("server/status")
    assert status["memory"]["promptCacheBytes"] == 0 and status["caches"] == {}


def test_identical_deterministic_requests_are_answered_from_the_response_cache(sidecar) -> None:
    params = chat_params("Tell me about the sea.", maxTokens=40, stream=True)
    first_id = sidecar.start_request("chat", params)
    first = sidecar.wait_response(first_id)["result"]
    hit_id = sidecar.start_request("chat", params)
    hit = sidecar.wait_response(hit_id)["result"]
    assert "cached" not in first and hit["cached"] is True
    assert streamed_text(sidecar, hit_id) == streamed_text(sidecar, first_id)
    assert hit["usage"]["completionTokens"] == first["usage"]["completionTokens"]
    assert hit["timings"]["ttftMs"] < first["timings"]["ttftMs"]
    unstreamed = sidecar.request("chat", dict(params, stream=False))
    assert unstreamed["cached"] is True and unstreamed["text"] == streamed_text(sidecar, first_id)
    assert "cached" not in sidecar.request("chat", dict(params, cache=False))

    seeded = chat_params("A seeded tale.", temperature=0.9, seed=3, maxTokens=20)
    assert "cached" not in sidecar.request("chat", seeded) and sidecar.request("chat", seeded)["cached"]
    unseeded = chat_params("An unseeded tale.", temperature=0.9, maxTokens=20)
    sidecar.request("chat", unseeded)
    assert "cached" not in sidecar.request("chat", unseeded)

    sidecar.request("models/unload", {"model": "demo"})  # a reloaded model starts afresh
    assert "cached" not in sidecar.request("chat", dict(params, stream=False))


def test_the_response_cache_can_be_turned_off(sidecars) -> None:
    client = sidecars.spawn(LOCALMLX_ENABLE_CACHE="false")
    params = chat_params("Tell me about the sea.", maxTokens=10)
    client.request("chat", params)
    assert "cached" not in client.request("chat", params)
    assert client.request("server/status")["caches"]["demo"]["responses"] is None
    assert client.close() == 0

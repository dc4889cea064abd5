"""Lanes. Which lane a model gets, decided from the caches its architecture makes (real mlx-lm
model classes at a tiny size, random weights: no files needed); and a `BatchLane` stepped by
hand on this thread, as the scheduler steps it on the engine's, with the demo model: a
generation moving from running alone into the batch, leaving it when cancelled, and parked
while its client does not read its stream, each generating exactly what it would alone."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import pytest
from mlx_lm.models import llama, llama4

from sidecar.engine.generation import Generation, GenerationRequest, prepare
from sidecar.engine.jobs import CancelReason, Job
from sidecar.engine.lanes import BatchLane, SoloLane
from sidecar.engine.registry import LoadedModel, _caches_can_merge
from sidecar.engine.sampling import SamplingParams
from sidecar.jsonrpc import parse_json
from sidecar.outbox import ChunkStream, Outbox


def tiny_llama() -> llama.Model:
    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=2))


def tiny_llama4() -> llama4.Model:
    """Chunked attention: its caches cannot be merged into a batch."""
    return llama4.Model(llama4.ModelArgs(model_type="llama4", text_config={
        "attention_bias": False, "attention_chunk_size": 16, "head_dim": 8, "hidden_size": 32,
        "interleave_moe_layer_step": 1, "intermediate_size": 32, "intermediate_size_mlp": 64,
        "max_position_embeddings": 64, "model_type": "llama4_text", "num_attention_heads": 4,
        "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2,
        "num_local_experts": 2, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0,
        "use_qk_norm": False, "vocab_size": 64}))


def test_plain_attention_models_batch() -> None:
    assert _caches_can_merge(tiny_llama())


def test_chunked_attention_models_run_one_at_a_time() -> None:
    assert not _caches_can_merge(tiny_llama4())


# ---- a BatchLane, stepped by hand ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Jobs need a loop for their futures; nothing here awaits them."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


PROMPTS = ["The sea and the mountains", "Tell me about the wind", "A story of the old harbour"]


def generation(demo: LoadedModel, loop: asyncio.AbstractEventLoop, prompt: str, max_tokens: int = 40,
               stream: ChunkStream | None = None) -> Generation:
    request = GenerationRequest(prompt, time.perf_counter(), None, prompt, max_tokens,
                                SamplingParams(temperature=0.0), [], stream=stream is not None)
    return Generation(Job("generate", loop, model=demo.name), demo, prepare(demo, request), stream)


def run(lane: BatchLane | SoloLane, generations: list[Generation], steps: int = 2000) -> None:
    """Turns of the scheduler's loop, for this lane alone, until `generations` are done."""
    for _ in range(steps):
        for finished in lane.take_cancelled():
            assert finished.done
        lane.resume_drained()
        if lane.has_work:
            lane.step()
        if all(g.done for g in generations):
            return
    raise AssertionError("the lane did not finish its generations")


def text(generation: Generation) -> str:
    return generation.result().text or ""


@pytest.fixture(scope="module")
def alone(demo: LoadedModel, loop: asyncio.AbstractEventLoop) -> dict[str, str]:
    """What each prompt generates alone, in a lane of its own."""
    texts = {}
    for prompt in PROMPTS:
        lane = BatchLane(demo, 4, 512)
        only = generation(demo, loop, prompt)
        lane.admit(only)
        run(lane, [only])
        lane.close()
        assert only.finish_reason == "length" and only.completion_tokens == 40
        texts[prompt] = text(only)
    return texts


def test_a_generation_moves_from_running_alone_into_the_batch_and_generates_what_it_would_alone(
        demo: LoadedModel, loop: asyncio.AbstractEventLoop, alone: dict[str, str]) -> None:
    lane = BatchLane(demo, 4, 512)
    first = generation(demo, loop, PROMPTS[0])
    lane.admit(first)
    for _ in range(10):
        lane.step()
    assert 0 < first.completion_tokens < 40 and lane.active == 1
    others = [generation(demo, loop, prompt) for prompt in PROMPTS[1:]]
    for other in others:
        lane.admit(other)  # the first moves into the batch, its KV cache with it
    run(lane, [first, *others])
    lane.close()
    assert [text(g) for g in [first, *others]] == [alone[p] for p in PROMPTS]


def test_a_cancelled_generation_leaves_the_batch_at_the_next_step_and_the_others_go_on(
        demo: LoadedModel, loop: asyncio.AbstractEventLoop, alone: dict[str, str]) -> None:
    lane = BatchLane(demo, 4, 512)
    batch = [generation(demo, loop, prompt) for prompt in PROMPTS]
    for member in batch:
        lane.admit(member)
    for _ in range(8):
        lane.step()
    batch[1].job.cancel_reason = CancelReason.CLIENT  # as Scheduler.cancel marks running work
    assert lane.step() == [batch[1]]
    assert batch[1].finish_reason == "cancelled" and 0 < batch[1].completion_tokens < 40
    assert batch[1].result().cancel_reason is CancelReason.CLIENT
    run(lane, [batch[0], batch[2]])
    lane.close()
    assert [text(batch[0]), text(batch[2])] == [alone[PROMPTS[0]], alone[PROMPTS[2]]]


def test_waiting_generations_of_a_solo_lane_are_finished_when_cancelled(
        demo: LoadedModel, loop: asyncio.AbstractEventLoop) -> None:
    lane = SoloLane(demo, 4, 512)
    running, waiting = generation(demo, loop, PROMPTS[0]), generation(demo, loop, PROMPTS[1])
    lane.admit(running)
    lane.admit(waiting)
    lane.step()
    waiting.job.cancel_reason = CancelReason.UNLOAD
    assert lane.take_cancelled() == [waiting] and waiting.finish_reason == "cancelled"
    assert lane.stop_all() == [running] and running.finish_reason == "cancelled"
    lane.close()


class UnreadPipe:
    """An Outbox writing into a pipe that is full and not read until `read_all` starts
    reading it: what a client that has stopped reading its stdout looks like."""

    def __init__(self, limit_bytes: int) -> None:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            while True:
                os.write(write, b"\n" * 65536)  # blank lines: the reader skips them
        except BlockingIOError:
            pass
        os.set_blocking(write, True)
        self._write = write
        self.outbox = Outbox(write, stream_limit_bytes=limit_bytes)
        self.lines: list[bytes] = []
        self._reader: threading.Thread | None = None

    def read_all(self) -> None:
        def drain() -> None:
            data = b""
            while chunk := os.read(self._read, 1 << 16):
                data += chunk
            self.lines = [line for line in data.split(b"\n") if line.strip()]

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def close(self) -> list[bytes]:
        self.outbox.close()
        os.close(self._write)
        assert self._reader is not None
        self._reader.join(10)
        os.close(self._read)
        return self.lines


def test_a_stream_its_client_does_not_read_is_parked_and_resumes_where_it_stopped(
        demo: LoadedModel, loop: asyncio.AbstractEventLoop, alone: dict[str, str]) -> None:
    pipe = UnreadPipe(limit_bytes=8)
    lane = BatchLane(demo, 4, 512)
    streamed = generation(demo, loop, PROMPTS[0], stream=pipe.outbox.open_stream("streamed"))
    other = generation(demo, loop, PROMPTS[1])
    lane.admit(streamed)
    lane.admit(other)
    for _ in range(200):
        lane.step()
        if lane.paused:
            break
    assert lane.paused == 1 and not streamed.done
    paused_at = streamed.completion_tokens
    for _ in range(5):
        lane.step()
    assert streamed.completion_tokens == paused_at and other.completion_tokens > paused_at  # the other goes on
    pipe.read_all()
    run(lane, [streamed, other])
    lane.close()
    chunks = [parse_json(line)["params"] for line in pipe.close()]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == alone[PROMPTS[0]] and text(other) == alone[PROMPTS[1]]

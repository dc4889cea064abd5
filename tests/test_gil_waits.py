"""`mx.clear_cache` with work queued on mlx-lm's generation stream: after `gil_waits.install`,
the other threads of the process keep running while it waits (real MLX work, measured by a
thread that counts its turns). The end-to-end case, a follower stopped while rank 0 waits in
it, is tests/test_distributed.py's test_a_follower_stopped_at_the_first_token..."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest
from mlx_lm.generate import generation_stream

from sidecar.engine import gil_waits


def turns_of_another_thread_during(call) -> tuple[int, float]:
    """How often a thread that sleeps 1 ms at a time ran while `call` ran, and how long it took."""
    turns, running, stop = [0], threading.Event(), threading.Event()

    def count() -> None:
        running.set()
        while not stop.is_set():
            turns[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    running.wait()
    with mx.stream(generation_stream):
        x = mx.random.normal((1 << 20,), key=mx.random.key(0))
        for _ in range(400):  # elementwise, so no BLAS decides how long it takes
            x = mx.sin(x) * 1.5
    mx.async_eval(x)
    before, started = turns[0], time.perf_counter()
    call()
    took = time.perf_counter() - started
    during = turns[0] - before
    stop.set()
    thread.join()
    mx.eval(x)
    return during, took


def test_clear_cache_lets_other_threads_run_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mx, "clear_cache", mx.clear_cache)  # put back after the test
    gil_waits.install()
    installed = mx.clear_cache
    gil_waits.install()  # twice is once: not a wrapper around the wrapper
    assert mx.clear_cache is installed
    during, took = turns_of_another_thread_during(mx.clear_cache)
    assert took > 0.05, f"the queued work took only {took * 1000:.0f} ms: too little to tell"
    # A thread that sleeps 1 ms a turn gets hundreds of turns in that time; with the GIL held
    # for the whole wait it gets at most one.
    assert during >= 10, f"{during} turns in {took * 1000:.0f} ms"

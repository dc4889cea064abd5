#!/usr/bin/env python3
"""Sidecar vs in-process mlx_lm.stream_generate, side by side in one run, on the demo model.

Both sides are timed on what a user sees: the first and last pieces of visible text. At
temperature 0 both produce the same tokens, so visible text starts and ends at the same
token indexes k0 and k1 on both sides; decode tokens/s is (k1 - k0) / (t1 - t0), where the
sidecar's clock is a client reading chunk lines off its stdout. TTFT runs from the call
(or writing the request line) to the first visible text. Prints medians and ratios.

The in-process reference runs twice: in this benchmark's own process, and in a plain
worker process (stream_generate on its main thread, no sidecar code) that lives under the
same conditions as the sidecar: a child that sleeps on a pipe between runs. On a small,
busy machine those two differ by a few percent on their own, so both ratios are shown.

    .venv/bin/python scripts/bench.py [--runs 7] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model
from sidecar.transport import encode_message

PROMPT = "The sea and the mountains were old friends, and every morning they"


def in_process(model, tokenizer, max_tokens: int) -> tuple[float, float, int]:
    """Returns (ttft ms, decode tokens/s, tokens between first and last visible text)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    events = [(time.perf_counter(), bool(r.text)) for r in stream_generate(
        model, tokenizer, PROMPT, max_tokens=max_tokens, sampler=make_sampler(0.0))]
    visible = [i for i, (_, has_text) in enumerate(events) if has_text]
    span = visible[-1] - visible[0]
    t0, t1 = events[visible[0]][0], events[visible[-1]][0]
    return (t0 - start) * 1000, span / (t1 - t0), span


class InProcessWorker:
    """`in_process` in a child process, one run per line written to it."""

    def __init__(self, model_path: Path) -> None:
        code = ("import json, sys\n"
                "sys.path.insert(0, %r)\n"
                "from bench import in_process\n"
                "from mlx_lm import load\n"
                "model, tokenizer = load(%r)\n"
                "for line in sys.stdin:\n"
                "    print(json.dumps(in_process(model, tokenizer, int(line))), flush=True)\n"
                ) % (str(Path(__file__).resolve().parent), str(model_path))
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        self.process.stdin.write(f"{max_tokens}\n")
        self.process.stdin.flush()
        return tuple(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(10)


def through_sidecar(client: SidecarClient, max_tokens: int, span: int) -> tuple[float, float, float]:
    before = len(client.received)
    start = time.perf_counter()
    id_ = client.start_request("generate", {"prompt": PROMPT, "maxTokens": max_tokens,
                                            "temperature": 0, "stream": True})
    result = client.wait_response(id_)["result"]
    chunks = [r.at for r in client.received[before:] if r.message.get("method") == "generate/chunk"]
    return ((chunks[0] - start) * 1000, span / (chunks[-1] - chunks[0]),
            result["timings"]["tokensPerSecond"])


def sidecar_writing_to_a_file(models_dir: str, runs: int, max_tokens: int) -> float:
    """Streamed generations with stdout going to a file: no reading client competes with MLX
    for the CPU. Returns the median of the sidecar's own decode tokens/s."""
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(
            sidecar_command(), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL,
            env={**os.environ, "LOCALMLX_MODELS_DIR": models_dir, "LOCALMLX_ENABLE_CACHE": "false"})
        requests = [{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": 1}},
                    {"jsonrpc": "2.0", "id": 1, "method": "models/load", "params": {"model": "demo"}}]
        requests += [{"jsonrpc": "2.0", "id": 2 + i, "method": "generate",
                      "params": {"prompt": PROMPT, "maxTokens": max_tokens, "temperature": 0, "stream": True}}
                     for i in range(runs + 1)]
        process.stdin.write(b"".join(encode_message(r) for r in requests))
        process.stdin.flush()
        last_id = b'"id":%d,' % requests[-1]["id"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # EOF would cancel the queued work: wait for it first
            out.seek(0)
            if last_id in out.read():
                break
            time.sleep(0.2)
        process.stdin.close()
        process.wait(30)
        out.seek(0)
        rates = [m["result"]["timings"]["tokensPerSecond"] for m in map(json.loads, out)
                 if isinstance(m.get("id"), int) and m["id"] > 2 and "result" in m]
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    from mlx_lm import load

    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_model(Path(tmp) / DEMO_MODEL_DIRNAME)
        model, tokenizer = load(str(path))
        client = SidecarClient(sidecar_command(), env={"LOCALMLX_MODELS_DIR": tmp,
                                                       "LOCALMLX_ENABLE_CACHE": "false",
                                                       "LOCALMLX_LOG_LEVEL": "WARNING"})
        worker = InProcessWorker(path)
        try:
            client.initialize(name="bench")
            client.request("models/load", {"model": "demo"})
            span = in_process(model, tokenizer, args.max_tokens)[2]  # also warms every side
            worker.run(args.max_tokens)
            through_sidecar(client, args.max_tokens, span)
            local, child, remote = [], [], []
            sides = [lambda: local.append(in_process(model, tokenizer, args.max_tokens)),
                     lambda: child.append(worker.run(args.max_tokens)),
                     lambda: remote.append(through_sidecar(client, args.max_tokens, span))]
            order = random.Random(0)
            for _ in range(args.runs):  # interleaved, in a shuffled order: drift hits all alike
                for side in order.sample(sides, len(sides)):
                    side()
        finally:
            client.close()
            worker.close()
        unobserved = sidecar_writing_to_a_file(tmp, args.runs, args.max_tokens)

    med = lambda xs: statistics.median(xs)
    ttft_local, tps_local = med([r[0] for r in local]), med([r[1] for r in local])
    ttft_remote, tps_remote = med([r[0] for r in remote]), med([r[1] for r in remote])
    ttft_child, tps_child = med([r[0] for r in child]), med([r[1] for r in child])
    tps_reported = med([r[2] for r in remote])
    paired = med([r[1] / l[1] for r, l in zip(remote, local)])
    paired_child = med([r[1] / c[1] for r, c in zip(remote, child)])
    print(f"demo model, {args.max_tokens} tokens, {args.runs} interleaved runs, medians")
    print(f"{'':28}{'reference':>12}{'sidecar':>12}{'sidecar / reference':>22}")
    for label, ttft, tps in (("in this process", ttft_local, tps_local),
                             ("in a worker process", ttft_child, tps_child)):
        print(f"decode tokens/s, {label:<20}{tps:>8.1f}{tps_remote:12.1f}{tps_remote / tps:21.3f}x")
        print(f"TTFT ms, {label:<28}{ttft:>8.2f}{ttft_remote:12.2f}{ttft_remote - ttft:+20.2f}ms")
    print(f"decode ratio, median of paired runs: {paired:.3f}x vs this process, "
          f"{paired_child:.3f}x vs the worker process")
    print(f"sidecar streaming into a file (no client on the CPU), its own report: {unobserved:.1f} tokens/s "
          f"= {unobserved / tps_local:.3f}x this process's reference")
    print(f"sidecar's own tokens/s report: {tps_reported:.1f} (client-side / reported = "
          f"{tps_remote / tps_reported:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
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
            span = in_process(model, tokenizer, 16)[2]  # warm every side equally
            worker.run(16)
            through_sidecar(client, 16, span)
            local, child, remote = [], [], []
            for _ in range(args.runs):  # interleaved, so drift hits all alike
                local.append(in_process(model, tokenizer, args.max_tokens))
                child.append(worker.run(args.max_tokens))
                remote.append(through_sidecar(client, args.max_tokens, local[-1][2]))
        finally:
            client.close()
            worker.close()

    med = lambda xs: statistics.median(xs)
    ttft_local, tps_local = med([r[0] for r in local]), med([r[1] for r in local])
    ttft_remote, tps_remote = med([r[0] for r in remote]), med([r[1] for r in remote])
    ttft_child, tps_child = med([r[0] for r in child]), med([r[1] for r in child])
    tps_reported = med([r[2] for r in remote])
    print(f"demo model, {args.max_tokens} tokens, {args.runs} interleaved runs, medians")
    print(f"{'':28}{'reference':>12}{'sidecar':>12}{'sidecar / reference':>22}")
    for label, ttft, tps in (("in this process", ttft_local, tps_local),
                             ("in a worker process", ttft_child, tps_child)):
        print(f"decode tokens/s, {label:<20}{tps:>8.1f}{tps_remote:12.1f}{tps_remote / tps:21.3f}x")
        print(f"TTFT ms, {label:<28}{ttft:>8.2f}{ttft_remote:12.2f}{ttft_remote - ttft:+20.2f}ms")
    print(f"sidecar's own tokens/s report: {tps_reported:.1f} (client-side / reported = "
          f"{tps_remote / tps_reported:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

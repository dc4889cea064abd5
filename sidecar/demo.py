"""`localmlx demo`: the main job end to end, as a user sees it.

Spawns the sidecar, initializes, loads the model (with progress), streams a chat reply to
the terminal token by token, then prints usage and speed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .client import RpcCallError, SidecarClient, sidecar_command
from .repl.formatting import DEMO_NOTE
from .settings import env_from_args


def _progress(message: dict[str, Any]) -> None:
    if message.get("method") == "$/progress":
        p = message["params"]
        sys.stderr.write(f"\r  loading: {p['phase']:<10} {p['completed']}/{p['total']} {p['unit']}   ")
        sys.stderr.flush()


def run_demo(args: argparse.Namespace) -> int:
    model = args.model or "demo"
    with SidecarClient(sidecar_command(), env=env_from_args(args), on_notification=_progress) as client:
        info = client.initialize(name="localmlx-demo", version="0.1.0")["serverInfo"]
        print(f"localmlx {info['version']} · mlx {info['mlx']} · mlx-lm {info['mlxLm']} · {info['device']}",
              file=sys.stderr)
        try:
            loaded = client.request("models/load", {"model": model, "_meta": {"progressToken": "load"}})
        except RpcCallError as error:
            print(f"\ncannot load {model}: {error.message}", file=sys.stderr)
            return 1
        print(f"\rloaded {loaded['model']}: {loaded['type']}, {loaded['parameters']:,} parameters, "
              f"{loaded['bytes'] / 2**20:.1f} MiB, context {loaded['contextLength']}", file=sys.stderr)
        if loaded["model"] == "demo":
            print(DEMO_NOTE.replace("(or /pull and /load here)", "(or bash scripts/demo.sh --model …)"),
                  file=sys.stderr)
        print(f"\n> {args.prompt}\n")
        params = {"model": model, "messages": [{"role": "user", "content": args.prompt}],
                  "maxTokens": args.max_new_tokens, "temperature": args.temp}
        final = None
        for item in client.stream("chat", params):
            if "seq" in item:
                sys.stdout.write(item.get("text", ""))  # the answer (reasoning and calls are apart)
                sys.stdout.flush()
            else:
                final = item
        print()
        if final is None or "error" in final:
            print(f"chat failed: {final and final['error']['message']}", file=sys.stderr)
            return 1
        result = final["result"]
        usage, timings = result["usage"], result["timings"]
        print(f"\n[{result['finishReason']}] prompt {usage['promptTokens']} tokens · "
              f"generated {usage['completionTokens']} tokens · TTFT {timings['ttftMs']:.1f} ms · "
              f"{timings['tokensPerSecond']:.1f} tokens/s · peak memory "
              f"{timings['peakMemoryBytes'] / 2**20:.1f} MiB")
    return 0

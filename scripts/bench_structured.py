#!/usr/bin/env python3
"""What a token mask costs: the same requests constrained (responseFormat json_schema) and
free, side by side in one sidecar, on the demo model (and, with --family, a tiny model with
the real 152k Qwen vocabulary, where the mask is widest).

Each round sends a constrained request, then a free one asked for exactly as many tokens as
the constrained one produced (same prompt, same seed), alternating so drift hits both. Decode
tokens/s is the sidecar's own `timings.tokensPerSecond`; median over the rounds. Then the same
at 4 concurrent streams (a batch). Usage: .venv/bin/python scripts/bench_structured.py
[--rounds 8] [--family qwen2.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.client import SidecarClient, sidecar_command
from sidecar.demo_model import DEMO_MODEL_DIRNAME, build_demo_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "items"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 6},
                         "items": {"type": "array", "minItems": 8, "maxItems": 8, "items": {
                             "type": "object", "required": ["id", "ok"], "additionalProperties": False,
                             "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                            "ok": {"type": "boolean"}}}}}}


def request(model: str, seed: int, constrained: bool, max_tokens: int) -> dict:
    params = {"model": model, "messages": [{"role": "user", "content": f"Record number {seed}, please."}],
              "temperature": 0.7, "seed": seed, "maxTokens": max_tokens, "cache": False}
    if constrained:
        params["responseFormat"] = {"type": "json_schema", "schema": SCHEMA}
    return params


def pair(client: SidecarClient, model: str, seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Constrained requests (concurrently), then free ones of the same lengths (concurrently)."""
    ids = [client.start_request("chat", request(model, s, True, 600)) for s in seeds]
    constrained = [client.wait_response(i)["result"] for i in ids]
    ids = [client.start_request("chat", request(model, s, False, r["usage"]["completionTokens"]))
           for s, r in zip(seeds, constrained, strict=True)]
    free = [client.wait_response(i)["result"] for i in ids]
    return constrained, free


def bench(client: SidecarClient, model: str, rounds: int, streams: int) -> None:
    client.request("chat", request(model, 0, True, 600))  # load, compile, warm up
    rates: dict[str, list[float]] = {"constrained": [], "free": []}
    masks: list[float] = []
    for r in range(rounds):
        constrained, free = pair(client, model, [1000 * r + s for s in range(streams)])
        rates["constrained"].append(sum(c["timings"]["tokensPerSecond"] for c in constrained))
        rates["free"].append(sum(f["timings"]["tokensPerSecond"] for f in free))
        masks.extend(c["timings"]["maskMsPerToken"] for c in constrained)
        assert all(c["finishReason"] == "stop" for c in constrained), [c["finishReason"] for c in constrained]
    c, f = statistics.median(rates["constrained"]), statistics.median(rates["free"])
    print(f"{model:24} {streams:>7} {f:>12.1f} {c:>14.1f} {c / f:>7.2f} {statistics.median(masks):>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--family", help="also a tests/families.py model, e.g. qwen2.5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_demo_model(root / DEMO_MODEL_DIRNAME)
        models = [DEMO_MODEL_DIRNAME]
        if args.family:
            from tests.families import FAMILIES_BY_NAME, build

            models.append(build(root, FAMILIES_BY_NAME[args.family], "bf16").name)
        env = {"LOCALMLX_MODELS_DIR": str(root), "HF_HUB_OFFLINE": "1", "LOCALMLX_ENABLE_CACHE": "false",
               "LOCALMLX_PREFIX_CACHE": "false", "LOCALMLX_LOG_LEVEL": "WARNING"}
        with SidecarClient(sidecar_command(), env=env) as client:
            client.initialize(name="bench_structured")
            print(f"{'model':24} {'streams':>7} {'free tok/s':>12} {'masked tok/s':>14} {'ratio':>7} {'mask ms/tok':>10}")
            for model in models:
                for streams in (1, 4):
                    bench(client, model, args.rounds, streams)
            client.close()


if __name__ == "__main__":
    main()

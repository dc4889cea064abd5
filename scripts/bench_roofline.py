"""Where a batched step's time goes on this machine: the benchmark model against its roofline.

Measured in this process with the BLAS the sidecar itself picks (`LOCALMLX_BLAS=auto`), on
bench.py's model (built there if missing), best of several repeats each:
- matmul rate: fp32 `mx.matmul` over all of the model's weight shapes at once (so they stream
  from memory as the model's do; bench_speculative's `matmul_rates`), at 1, 4, 8 and 16 rows
  and at a prompt's length;
- decode: one step of the model at 1, 4, 8 and 16 rows over a 300-token KV cache, as ms and
  tokens/s, and as a share of the matmul roofline at that row count (FLOPs per token:
  bench_speculative's `flops_per_token`, attention included);
- prefill: one 210-token prompt (a closed loop's 30-word chat prompt), tokens/s and share of
  the roofline at its length; and the time the prefill spends in `exp`: softmax over every
  layer's attention scores and SiLU over every layer's MLP, each timed on arrays of those
  shapes, as a share of the prefill;
- elementwise: ns per element of MLX's `exp` and `multiply` on the MLP activation, beside
  numpy's `exp` on the same array.

    .venv/bin/python scripts/bench_roofline.py [--models-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench import Children, Logs, Report, describe_model, load_average, prepare_model, progress, run_and_report
from bench_speculative import flops_per_token, matmul_rates

from sidecar.blas import use_best_blas

DECODE_ROWS = (1, 4, 8, 16)
CONTEXT = 300  # tokens in the KV cache while decoding (a 210-token prompt and its answer)
PROMPT_TOKENS = 210
REPEATS = 10


def plural(rows: int) -> str:
    return f"{rows} row{'s' if rows > 1 else ''}"


def best_seconds(run: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Best wall time of `run` (which evaluates what it computes) over `repeats`, after a warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def decode_step_seconds(model: Any, rows: int) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.random.randint(0, 1000, (rows, CONTEXT)), cache=cache), [c.state for c in cache])
    token = mx.zeros((rows, 1), dtype=mx.int32)

    def step() -> None:
        for c in cache:
            c.offset = CONTEXT  # every step writes the same slot: the context stays the same
        mx.eval(model(token, cache=cache))

    return best_seconds(step)


def prefill_seconds(model: Any) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.random.randint(0, 1000, (1, PROMPT_TOKENS))

    def prefill() -> None:
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        mx.eval([c.state for c in cache])  # as mlx-lm's prefill: the caches, not the logits

    return best_seconds(prefill)


def exp_seconds_in_prefill(config: dict[str, Any]) -> float:
    """Softmax over one layer's causal scores plus SiLU over its MLP, times the layers."""
    import mlx.core as mx
    import mlx.nn as nn

    heads, inter = int(config["num_attention_heads"]), int(config["intermediate_size"])
    scores = mx.random.normal((1, heads, PROMPT_TOKENS, PROMPT_TOKENS))
    gate = mx.random.normal((1, PROMPT_TOKENS, inter))
    mx.eval(scores, gate)
    softmax = best_seconds(lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)))
    silu = best_seconds(lambda: mx.eval(nn.silu(gate)))
    return (softmax + silu) * int(config["num_hidden_layers"])


def elementwise_ns(config: dict[str, Any]) -> dict[str, float]:
    import mlx.core as mx
    import numpy as np

    x = mx.random.normal((PROMPT_TOKENS, int(config["intermediate_size"])))
    mx.eval(x)
    as_numpy = np.array(x)
    return {"mlx exp": best_seconds(lambda: mx.eval(mx.exp(x))) / x.size * 1e9,
            "mlx multiply": best_seconds(lambda: mx.eval(x * x)) / x.size * 1e9,
            "numpy exp": best_seconds(lambda: np.exp(as_numpy)) / x.size * 1e9}


def run(args: argparse.Namespace, report: Report, children: Children, logs: Logs) -> None:
    blas = use_best_blas("auto")  # before MLX is imported, as the sidecar does
    model_dir = prepare_model(args.models_dir.expanduser(), None, children, logs)
    from mlx_lm import load

    report.context.update({"model": describe_model(model_dir), "blas": blas.library or blas.name,
                           "load average": f"{load_average()} (at start)"})
    config = json.loads((model_dir / "config.json").read_text())
    model, _ = load(str(model_dir))
    progress("matmul rates")
    rates = matmul_rates(model_dir, (*DECODE_ROWS, PROMPT_TOKENS))
    section = "matmul (fp32, the model's weight shapes)"
    for rows, rate in rates.items():
        report.add(section, f"{plural(rows)} at a time", rate / 1e9, "GFLOP/s")

    decode_flops = flops_per_token(model_dir, CONTEXT)
    section = f"decode step, {CONTEXT}-token context ({decode_flops / 1e6:.0f} MFLOP per token)"
    progress("decode steps")
    for rows in DECODE_ROWS:
        seconds = decode_step_seconds(model, rows)
        report.add(section, f"{plural(rows)}: step", seconds * 1e3, "ms")
        report.add(section, f"{plural(rows)}: tokens/s (share of the roofline at {rows})", rows / seconds,
                   f"tok/s ({100 * rows * decode_flops / seconds / rates[rows]:.0f} %)")

    progress("prefill")
    prompt_flops = flops_per_token(model_dir, PROMPT_TOKENS // 2)  # the mean context over the prompt
    section = f"prefill, one {PROMPT_TOKENS}-token prompt"
    seconds = prefill_seconds(model)
    report.add(section, "tokens/s (share of the roofline at its length)", PROMPT_TOKENS / seconds,
               f"tok/s ({100 * PROMPT_TOKENS * prompt_flops / seconds / rates[PROMPT_TOKENS]:.0f} %)")
    report.add(section, "time in exp: softmax and SiLU, every layer", 100 * exp_seconds_in_prefill(config) / seconds,
               "% of the prefill")

    section = f"elementwise, {PROMPT_TOKENS} x intermediate fp32"
    for name, ns in elementwise_ns(config).items():
        report.add(section, name, ns, "ns per element")
    report.context["load average"] += f", {load_average()} (at end)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("~/.cache/localmlx/bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log-dir", type=Path)
    return run_and_report(parser.parse_args(), run, "bench-roofline")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One stream at a time, speculating: the sidecar with a draft model and with prompt lookup, beside
`mlx_lm.server --draft-model` on the same pair, and how close each gets to the machine's roofline.

Models (`tests/speculative_models.py`, built offline, cached in `--models-dir`): the `bench` pair,
an fp32 llama draft (hidden 768, 1 layer, ~7.9M parameters) and a target that is the draft plus
7 layers whose output projections are zero (~57M): the same logits, so every draft is accepted
and the speed-up is the most this pair allows; and the copying model, the target with attention
silenced too, whose greedy output soon repeats a cycle of tokens forever. Every request is
greedy and streamed, alone on its server. OpenBLAS (where installed) is preloaded into
mlx_lm.server and the roofline worker; the sidecar picks it itself (`LOCALMLX_BLAS=auto`).

Sides, each run once per round (the order rotated by one every round, so drift hits all alike;
every side runs once first, unmeasured, which also loads the draft model):
- `sidecar`, `sidecar + draft`: `chat` on the target, without and with `draftModel` (the draft's
  name), a new prompt each round. `numDraftTokens` only with `--num-draft-tokens`.
- `mlx_lm.server`, `mlx_lm.server + draft`: two servers on loopback, the second started with
  `--draft-model` (and `--num-draft-tokens` when given; its own default is 3); the same prompts.
- `sidecar[ + lookup], <prompt>`: `generate` without and with `promptLookup: true` on the same
  prompt, for each of `--lookup`: `copying` (the copying model, on a corpus passage followed by
  its own continuation, which holds the cycle that the output then repeats: a prompt the output
  copies), `primed` (the same on the target: the random target loops in short bursts, so some
  of its continuation is already in the prompt), `repeated` (the target on the passage, 3 times).

Figures: decode tokens/s per side = (completion tokens - 1) / (last byte - first text), client-side,
median over rounds (so that a prompt's prefill, cached or not, stays out of it; the end-to-end
rate, from the request, is in the JSON); each ratio is the median over rounds of that round's ratio (draft / no draft,
lookup / no lookup on the same prompt, sidecar + draft / mlx_lm.server + draft); the sidecar's
`timings.draftedTokens` / `acceptedTokens`, summed; whether speculation changed the text (it
must not: greedy). Roofline: FLOPs per token of each model (2 x parameters, the tied head counted
once, plus attention's 4 x layers x q width x context) against fp32 matmul rates measured with
`mx.matmul` on the target's own weight shapes, 1 row at a time (decode) and several (a verify
pass reads the weights once for all its tokens, so speculation can pass the 1-row roofline);
each tokens/s as a share of the 1-row roofline.

    .venv/bin/python scripts/bench.py --speculative [--quick] [--rounds 5] [--max-tokens 192]
        [--num-draft-tokens K] [--lookup copying,primed,repeated]
        [--only draft,lookup,mlx_lm.server,roofline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench import (
    REQUEST_TIMEOUT_S,
    Children,
    Completion,
    Logs,
    MlxLmServer,
    Report,
    SidecarUnderTest,
    corpus_words,
    load_average,
    median_or_none,
    optimized_blas_library,
    progress,
    run_and_report,
    with_preloaded,
)

from tests.distributed_models import parameter_count
from tests.speculative_models import build_copying_model, build_speculative_pair

DEFAULT_MODELS_DIR = Path("~/.cache/localmlx/bench").expanduser()
SECTIONS = ("draft", "lookup", "mlx_lm.server", "roofline")
CHAT_PROMPT = "The sea and the mountains were old friends, and every morning they"
ROOFLINE_ROWS = (1, 4, 8, 32)


@dataclass(frozen=True)
class Scale:
    rounds: int = 5
    max_tokens: int = 192
    passage_words: int = 40  # the copying prompt's passage ...
    passage_repeats: int = 3  # ... this many times
    prime_tokens: int = 192  # the target's own continuation appended to it


FULL = Scale()
QUICK = Scale(rounds=2, max_tokens=64, prime_tokens=96)


# ---- prompts -----------------------------------------------------------------------------------


def copying_prompt(words: list[str], length: int, repeats: int = 3) -> str:
    """A corpus passage of `length` words, `repeats` times (blank lines between): text that a
    continuation can copy n-grams from."""
    start = random.Random(f"copy/{length}").randrange(len(words) - length)
    return "\n\n".join([" ".join(words[start:start + length])] * repeats) + "\n\n"


# ---- sides -------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    run: Callable[[int], Completion]  # given the round (-1: warm-up)
    completions: list[Completion] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rates(self) -> list[float | None]:
        return [decode_rate(c) for c in self.completions]


def decode_rate(completion: Completion) -> float | None:
    """(Completion tokens - 1) / (last byte - first text), client-side. Meaningful while text
    streams as it is decoded: on a model too fast for the reader (the tiny pair), the sidecar's
    outbox sends what piled up in one line, and the first text arrives near the end."""
    start = completion.first_text_at
    if start is None or completion.completion_tokens < 2 or completion.done_at <= start:
        return None
    return (completion.completion_tokens - 1) / (completion.done_at - start)


def end_to_end_rate(completion: Completion) -> float | None:
    """Completion tokens / (last byte - request sent): the prompt's prefill included."""
    if completion.completion_tokens == 0 or completion.done_at <= completion.sent_at:
        return None
    return completion.completion_tokens / (completion.done_at - completion.sent_at)


def run_rounds(sides: list[Side], rounds: int) -> None:
    """Every side once per round; round r starts at side r (mod n)."""
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            try:
                completion = side.run(r)
            except Exception as exc:  # shown in the table; the other sides go on
                side.errors.append(f"{type(exc).__name__}: {exc}")
                side.completions.append(Completion(0.0, None, 0.0, 0))
                progress(f"round {r}: {side.name}: {side.errors[-1][:200]}")
                continue
            side.completions.append(completion)
            rate = decode_rate(completion)
            progress(f"round {r}: {side.name}: {completion.completion_tokens} tokens, "
                     f"{'n/a' if rate is None else f'{rate:.1f}'} tok/s"
                     + (f", {describe_acceptance([completion])}" if completion.timings else ""))


def paired_ratio(numerator: Side, denominator: Side) -> float | None:
    """Median over rounds of numerator / denominator in the same round."""
    ratios = [a / b for a, b in zip(numerator.rates(), denominator.rates(), strict=True) if a and b]
    return median_or_none(ratios)


def acceptance(completions: list[Completion]) -> tuple[int, int] | None:
    """(accepted, drafted) summed over the runs that report them; None if none does."""
    reported = [c.timings for c in completions if c.timings and "draftedTokens" in c.timings]
    if not reported:
        return None
    return (sum(t.get("acceptedTokens", 0) for t in reported), sum(t["draftedTokens"] for t in reported))


def describe_acceptance(completions: list[Completion]) -> str:
    counts = acceptance(completions)
    if counts is None:
        return "not reported (no speculative step)"
    accepted, drafted = counts
    share = f" ({100 * accepted / drafted:.0f} %)" if drafted else ""
    return f"{accepted} of {drafted} drafted{share}"


def same_text(a: Side, b: Side) -> tuple[int, int]:
    pairs = [(x.text, y.text) for x, y in zip(a.completions, b.completions, strict=True)
             if x.completion_tokens and y.completion_tokens]
    return sum(x == y for x, y in pairs), len(pairs)


# ---- the roofline ------------------------------------------------------------------------------


def weight_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(out, in) of every matmul a llama-style decoder runs per token, the tied head included."""
    hidden, inter, heads = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    return layer * int(config["num_hidden_layers"]) + [(int(config["vocab_size"]), hidden)]


def flops_per_token(model_dir: Path, context: int) -> float:
    """2 x parameters (the embedding is a lookup; tied, it is the head's matmul, counted once)
    plus attention: scores and weighted values, 2 x 2 x q width x context per layer."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    q_width = heads * int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2.0 * parameter_count(model_dir) + 4.0 * int(config["num_hidden_layers"]) * q_width * context


def matmul_rates(model_dir: Path, rows: tuple[int, ...], repeats: int = 5) -> dict[int, float]:
    """FLOP/s of `mx.matmul` over the model's weight shapes (one fresh fp32 matrix each, as
    many as the model has, so they stream from memory as the model's do), `rows` tokens at a
    time; best of `repeats`. Runs in the process that asks (give it the BLAS to measure)."""
    import mlx.core as mx

    shapes = weight_shapes(json.loads((model_dir / "config.json").read_text()))
    weights = [mx.random.normal((out, inp)) for out, inp in shapes]
    mx.eval(weights)
    rates = {}
    for m in rows:
        inputs = [mx.random.normal((m, inp)) for _, inp in shapes]
        mx.eval(inputs)
        flops = 2.0 * m * sum(out * inp for out, inp in shapes)
        best = float("inf")
        for _ in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            mx.eval([mx.matmul(x, w.T) for x, w in zip(inputs, weights, strict=True)])
            best = min(best, time.perf_counter() - start)
        rates[m] = flops / best
    return rates


def measure_roofline(model_dir: Path, blas_library: str | None, children: Children, log: Any) -> dict[int, float]:
    """`matmul_rates` in a child process with the benchmark's BLAS preloaded."""
    process = children.spawn([sys.executable, str(Path(__file__).resolve()), "--roofline-worker", str(model_dir)],
                             stdout=subprocess.PIPE, stderr=log, text=True,
                             env=with_preloaded(blas_library, dict(os.environ)))
    out, _ = process.communicate(timeout=600)
    children.stop(process)
    if process.returncode != 0:
        raise RuntimeError("the roofline worker failed; see its log")
    return {int(k): v for k, v in json.loads(out).items()}


def add_roofline(report: Report, sides: dict[str, Side], target: Path, draft: Path, rates: dict[int, float],
                 context: int) -> None:
    section = f"roofline (fp32 mx.matmul on the target's weight shapes, context ~{context})"
    target_flops, draft_flops = flops_per_token(target, context), flops_per_token(draft, context)
    report.add(section, "target FLOPs per token", target_flops / 1e6, "MFLOP")
    report.add(section, "draft FLOPs per token", draft_flops / 1e6, "MFLOP")
    for rows, rate in sorted(rates.items()):
        report.add(section, f"matmul rate, {rows} row{'s' if rows > 1 else ''} at a time", rate / 1e9, "GFLOP/s")
    roofline = rates[1] / target_flops
    report.add(section, "target roofline at 1 row (decode)", roofline, "tok/s")
    report.add(section, "target roofline at the best rate (all tokens verified at once)",
               max(rates.values()) / target_flops, "tok/s")
    for name, side in sides.items():
        measured = median_or_none(r for r in side.rates() if r)
        if measured is not None:
            report.add(section, f"{name}: share of the 1-row roofline", 100 * measured / roofline, "%")
    report.raw["roofline"] = {"matmulFlopsPerSecond": rates, "targetFlopsPerToken": target_flops,
                              "draftFlopsPerToken": draft_flops, "context": context}


# ---- the run -----------------------------------------------------------------------------------


LOOKUP_PROMPTS = ("copying", "primed", "repeated")


@dataclass(frozen=True)
class LookupCase:
    """Prompt lookup measured on `model` with `prompt` (`kind`: one of LOOKUP_PROMPTS)."""

    kind: str
    model: str
    prompt: str

    @property
    def label(self) -> str:
        return {"copying": "copying model", "primed": "primed prompt", "repeated": "repeated passage"}[self.kind]


def lookup_cases(kinds: list[str], scale: Scale, sidecar: SidecarUnderTest, target: str,
                 copying: str | None) -> list[LookupCase]:
    """The prompts prompt lookup is measured on. `repeated`: a corpus passage repeated, on the
    target. `primed`: that passage followed by the target's own greedy continuation of it (the
    random target loops in short bursts, so part of what follows is already there). `copying`:
    the same on the copying model, whose continuation repeats a cycle that its prompt holds."""
    passage = copying_prompt(corpus_words(), scale.passage_words, scale.passage_repeats)
    cases = []
    for kind in kinds:
        model = copying if kind == "copying" else target
        assert model is not None
        prompt = passage
        if kind in ("primed", "copying"):
            progress(f"lookup prompt '{kind}': {model}'s own {scale.prime_tokens}-token continuation of the passage")
            prompt += sidecar.stream("generate", {"model": model, "prompt": passage}, scale.prime_tokens, False).text
        cases.append(LookupCase(kind, model, prompt))
    return cases


def build_sides(args: argparse.Namespace, scale: Scale, sidecar: SidecarUnderTest, draft_name: str,
                cases: list[LookupCase], servers: dict[str, MlxLmServer]) -> list[Side]:
    sections = set(args.only.split(","))

    def messages(round_: int) -> list[dict[str, str]]:  # a new prompt each round: no cache hit across rounds
        return [{"role": "user", "content": f"Round {round_}. {CHAT_PROMPT}"}]

    draft_params: dict[str, Any] = {"draftModel": draft_name}
    lookup_params: dict[str, Any] = {"promptLookup": True}
    if args.num_draft_tokens:
        draft_params["numDraftTokens"] = lookup_params["numDraftTokens"] = args.num_draft_tokens
    n = scale.max_tokens
    sides = [Side("sidecar", lambda r: sidecar.stream("chat", {"messages": messages(r)}, n, False))]
    if "draft" in sections:
        sides.append(Side("sidecar + draft",
                          lambda r: sidecar.stream("chat", {"messages": messages(r), **draft_params}, n, False)))
    for case in cases:
        plain = {"model": case.model, "prompt": case.prompt}
        sides.append(Side(f"sidecar, {case.label}",
                          lambda r, plain=plain: sidecar.stream("generate", plain, n, False)))  # type: ignore[misc]
        sides.append(Side(f"sidecar + lookup, {case.label}",
                          lambda r, plain=plain: sidecar.stream("generate", {**plain, **lookup_params}, n, False)))  # type: ignore[misc]
    for name, server in servers.items():
        sides.append(Side(name, lambda r, server=server: server.chat(messages(r), n)))  # type: ignore[misc]
    return sides


def warm_up(sides: list[Side]) -> None:
    """Each side once, not measured: loads the draft model, compiles, fills MLX's caches."""
    for side in sides:
        progress(f"warm-up: {side.name}")
        try:
            side.run(-1)
        except Exception as exc:  # the measured rounds record it
            progress(f"warm-up: {side.name}: {type(exc).__name__}: {exc}")


def add_figures(report: Report, by_name: dict[str, Side], scale: Scale, cases: list[LookupCase]) -> None:
    section = f"one stream, greedy, {scale.max_tokens} tokens, {scale.rounds} rounds (decode tokens/s, median)"
    for name, side in by_name.items():
        report.add(section, name, median_or_none(r for r in side.rates() if r), "tok/s")
        if side.errors:
            report.add(section, f"{name}: failed requests", len(side.errors), target="0", passed=False)

    def ratio(label: str, a: str, b: str, bound: float) -> None:
        if a in by_name and b in by_name:
            report.add_at_least(section, label, paired_ratio(by_name[a], by_name[b]), bound, "x")

    ratio("sidecar + draft / sidecar", "sidecar + draft", "sidecar", 1.6)
    for case in cases:  # the target holds for a prompt the output copies; the others are shown
        on, off = f"sidecar + lookup, {case.label}", f"sidecar, {case.label}"
        label = f"lookup / no lookup, {case.label}"
        if case.kind == "copying":
            ratio(label, on, off, 1.3)
        else:
            report.add(section, label, paired_ratio(by_name[on], by_name[off]), "x")
    ratio("sidecar + draft / mlx_lm.server + draft", "sidecar + draft", "mlx_lm.server + draft", 1.1)
    if "mlx_lm.server + draft" in by_name and "mlx_lm.server" in by_name:
        report.add(section, "mlx_lm.server + draft / mlx_lm.server",
                   paired_ratio(by_name["mlx_lm.server + draft"], by_name["mlx_lm.server"]), "x")
    if "sidecar" in by_name and "mlx_lm.server" in by_name:
        report.add(section, "sidecar / mlx_lm.server (no draft)",
                   paired_ratio(by_name["sidecar"], by_name["mlx_lm.server"]), "x")
    lookups = [(f"sidecar + lookup, {c.label}", f"sidecar, {c.label}") for c in cases]
    for name in ("sidecar + draft", *(on for on, _ in lookups)):
        if name in by_name:
            report.add(section, f"{name}: accepted tokens", describe_acceptance(by_name[name].completions))
    for a, b in (("sidecar + draft", "sidecar"), *lookups):
        if a in by_name and b in by_name:
            same, total = same_text(by_name[a], by_name[b])
            report.add(section, f"{a}: same text as without", f"{same} of {total}", target="all",
                       passed=same == total if total else None)
    if "mlx_lm.server + draft" in by_name and "mlx_lm.server" in by_name:
        # Shown, not judged: mlx_lm.server 0.32.2 with a draft model answered differently from
        # itself without one on every request after its first (a prompt-cache hit), here.
        same, total = same_text(by_name["mlx_lm.server + draft"], by_name["mlx_lm.server"])
        report.add(section, "mlx_lm.server + draft: same text as without", f"{same} of {total}")


def run(args: argparse.Namespace, report: Report, children: Children, logs: Logs) -> None:
    scale = scale_from(args)
    sections = set(args.only.split(","))
    models_dir = args.models_dir.expanduser()
    progress(f"building (or reusing) the {args.size} pair in {models_dir}")
    draft, target = build_speculative_pair(models_dir, size=args.size)
    kinds = [k for k in args.lookup.split(",") if k] if "lookup" in sections else []
    copying = build_copying_model(models_dir, size=args.size) if "copying" in kinds else None
    blas_library = optimized_blas_library()
    report.context.update({
        "target": f"{target.name}: {parameter_count(target) / 1e6:.1f}M fp32",
        "draft": f"{draft.name}: {parameter_count(draft) / 1e6:.1f}M fp32 (same logits as the target)",
        "copying model": "none" if copying is None else f"{copying.name}: the target, attention silenced",
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load average": f"{load_average()} (at start)",
        "mlx_lm side": f"BLAS {blas_library or 'as installed (none to preload)'}",
        "scale": "quick" if args.quick else "full"})
    report.raw["scale"] = asdict(scale)
    base_env = {"LOCALMLX_MODELS_DIR": str(models_dir), "LOCALMLX_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
                **dict(kv.split("=", 1) for kv in args.sidecar_env)}

    progress("starting the sidecar")
    sidecar = SidecarUnderTest(base_env, children, logs.open("sidecar"))
    report.context["sidecar"] = f"BLAS {sidecar.blas}"
    servers: dict[str, MlxLmServer] = {}
    try:
        sidecar.load(target.name)
        if "mlx_lm.server" in sections:
            progress("starting mlx_lm.server, without and with the draft model")
            k = ("--num-draft-tokens", str(args.num_draft_tokens)) if args.num_draft_tokens else ()
            servers["mlx_lm.server"] = MlxLmServer(target, blas_library, children, logs.open("mlx_lm-server"))
            servers["mlx_lm.server + draft"] = MlxLmServer(target, blas_library, children,
                                                           logs.open("mlx_lm-server-draft"),
                                                           ("--draft-model", str(draft), *k))
        if copying is not None:
            sidecar.client.request("models/load", {"model": copying.name}, timeout=REQUEST_TIMEOUT_S)
        cases = lookup_cases(kinds, scale, sidecar, target.name, None if copying is None else copying.name)
        sides = build_sides(args, scale, sidecar, draft.name, cases, servers)
        warm_up(sides)
        run_rounds(sides, scale.rounds)
    finally:
        sidecar.close()
        for server in servers.values():
            children.stop(server.process)
    by_name = {side.name: side for side in sides}
    add_figures(report, by_name, scale, cases)
    report.raw["sides"] = {side.name: {"decodeTokensPerSecond": side.rates(),
                                       "endToEndTokensPerSecond": [end_to_end_rate(c) for c in side.completions],
                                       "ttftMs": [c.ttft_ms for c in side.completions],
                                       "texts": [c.text for c in side.completions], "errors": side.errors[:5],
                                       "timings": [c.timings for c in side.completions]}
                           for side in sides}
    if "roofline" in sections:
        progress("roofline: timing fp32 matmuls of the target's shapes")
        rates = measure_roofline(target, blas_library, children, logs.open("roofline-worker"))
        add_roofline(report, by_name, target, draft, rates, context=32 + scale.max_tokens // 2)
    report.context["load average"] += f", {load_average()} (at end)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter generations")
    parser.add_argument("--rounds", type=int, help="rounds of every side [5; quick: 2]")
    parser.add_argument("--max-tokens", type=int, help="tokens per generation [192; quick: 64]")
    parser.add_argument("--prime-tokens", type=int,
                        help="length of a lookup prompt's primed part (the model's own continuation) [192; quick: 96]")
    parser.add_argument("--num-draft-tokens", type=int, metavar="K",
                        help="tokens drafted per step, on every side [each server's default]")
    parser.add_argument("--lookup", default="copying,primed",
                        help=f"comma-separated prompts to measure prompt lookup on, of: {', '.join(LOOKUP_PROMPTS)} "
                             "[copying,primed]")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated parts to run, of: {', '.join(SECTIONS)}")
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench", help="the model pair [bench]")
    parser.add_argument("--json", type=Path, help="write every figure and the raw numbers here")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"where the pair is built and kept [{DEFAULT_MODELS_DIR}]")
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the sidecar (repeatable)")
    parser.add_argument("--log-dir", type=Path, help="where server logs go [a new temp dir]")
    parser.add_argument("--roofline-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    unknown = set(args.lookup.split(",")) - set(LOOKUP_PROMPTS) - {""}
    if unknown:
        parser.error(f"unknown lookup prompts: {', '.join(sorted(unknown))}")
    return args


def scale_from(args: argparse.Namespace) -> Scale:
    scale = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("rounds", args.rounds), ("max_tokens", args.max_tokens),
                                 ("prime_tokens", args.prime_tokens)) if v}
    return Scale(**{**asdict(scale), **changes})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.roofline_worker:
        print(json.dumps(matmul_rates(Path(args.roofline_worker), ROOFLINE_ROWS)), flush=True)
        return 0
    return run_and_report(args, run, "bench-spec")


if __name__ == "__main__":
    sys.exit(main())

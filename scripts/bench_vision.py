#!/usr/bin/env python3
"""Images through the sidecar, side by side with mlx-vlm's own `stream_generate` in-process, in
one run, on the same model, image and prompt; and the text-only path's cold start with mlx-vlm
installed.

Models (`scripts/vision_bench_model.py`, built offline, cached in `--models-dir`): `tiny`, the
tests' Qwen2-VL (two layers of width 64, bf16, a 224x224 image = 64 image tokens), where the
per-token cost of everything around the model shows most; `bench`, the same recipe at the text
benchmark's decoder shape (width 512, 8 layers) with a 4-layer ViT of width 256, fp32, a
448x448 image = 256 image tokens. The image is a seeded noise PNG in the models dir (an allowed
root: the sidecar reads it by path, as mlx-vlm does; `--data-url` sends it inline instead).
The prompt is one user turn, the image then "Describe the picture in detail.", rendered by
`mlx_vlm.prompt_utils.apply_chat_template` for the reference and by the sidecar from the same
content parts; both must come to the same prompt tokens. Greedy, `--max-tokens` (128), streamed.

- **sidecar**: `chat` with the image part, `stream: true`, `cache: false`, over stdio.
  Image-to-first-token = request written -> first `generate/chunk` read, client-side.
- **in-process**: `mlx_vlm.stream_generate(model, processor, prompt, image=[path])` in a plain
  worker process, timed from the call to the first visible text, the text being what mlx-lm's
  streaming detokenizer (the sidecar's) makes of the tokens: mlx-vlm's own shows a run of
  tokens without a space only at the next space, which would move the first visible token.
- Decode tokens/s on both sides over the same token span (greedy: the same tokens): from the
  token that first shows text to the last that does, (k1 - k0) / (t1 - t0); the sidecar's
  times are when this client read the chunks. Ratios are medians over rounds of each round's
  sidecar / in-process; TTFT overhead = median of each round's sidecar - in-process, in ms.
  The first round of each size warms both up and is not counted; then the two sides take
  turns going first.
- Both sides get the same BLAS: the worker is started with OpenBLAS preloaded (`LD_PRELOAD`,
  Linux, when installed), the sidecar picks it itself (`LOCALMLX_BLAS=auto`); the table names
  both.
- **cold start**: spawn -> `initialize` answered, median of several spawns, the vision models
  in the models dir, mlx-vlm installed; then one sidecar run with `PYTHONPROFILEIMPORTTIME=1`
  through `initialize` and `models/list` (which detects the vision models): mlx_vlm must not
  be among the modules it imported.

Figures from a busy machine are noisy: compare the ratios, measured side by side, not the
absolute numbers across runs.

    .venv/bin/python scripts/bench.py --vision [--quick] [--size tiny,bench] [--rounds 6]
        [--max-tokens 128] [--data-url] [--only decode,cold-start] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench import (
    DEFAULT_MODELS_DIR,
    REQUEST_TIMEOUT_S,
    Children,
    Logs,
    Report,
    SidecarUnderTest,
    load_average,
    median_or_none,
    optimized_blas_library,
    progress,
    run_and_report,
    with_preloaded,
)
from vision_bench_model import SIZES, build

from sidecar.client import SidecarClient, sidecar_command
from tests.vision_models import image

SECTIONS = ("decode", "cold-start")
PROMPT = "Describe the picture in detail."
IMAGE_SIDES = {"tiny": 224, "bench": 448}  # each model's whole image budget: 64 and 256 tokens


# ---- the in-process side -----------------------------------------------------------------------


def reference_prompt(model: Any, processor: Any) -> str:
    """The template with the image placeholder first, as the sidecar renders the same parts."""
    from mlx_vlm.prompt_utils import apply_chat_template

    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
    return str(apply_chat_template(processor, model.config, message, num_images=1))


def reference_run(model: Any, processor: Any, detokenizer: Any, prompt: str, image_path: str,
                  max_tokens: int) -> dict[str, Any]:
    """stream_generate, timed on visible text: TTFT ms, decode tokens/s, token span, text.

    Text is what mlx-lm's streaming detokenizer (the sidecar's) makes of each token: mlx-vlm's
    own holds text back differently (a run of tokens without a space shows nothing until the
    next space), which would move the first visible token and so every figure."""
    from mlx_vlm.generate.dispatch import stream_generate

    start = time.perf_counter()
    events: list[tuple[float, str]] = []
    tokens = 0
    prompt_tokens = 0
    detokenizer.reset()
    for result in stream_generate(model, processor, prompt, image=[image_path], max_tokens=max_tokens,
                                  temperature=0.0):
        now = time.perf_counter()
        prompt_tokens = result.prompt_tokens
        if result.generation_tokens == tokens or result.token is None:  # mlx-vlm's last flush: no new token
            continue
        tokens = result.generation_tokens
        detokenizer.add_token(int(result.token))
        events.append((now, detokenizer.last_segment))
    detokenizer.finalize()
    if events:
        events[-1] = (events[-1][0], events[-1][1] + detokenizer.last_segment)
    visible = [i for i, (_, text) in enumerate(events) if text]
    span = visible[-1] - visible[0]
    t0, t1 = events[visible[0]][0], events[visible[-1]][0]
    return {"ttftMs": (t0 - start) * 1000, "firstTokenMs": (events[0][0] - start) * 1000,
            "tokensPerSecond": span / (t1 - t0) if span else None, "span": span,
            "text": "".join(text for _, text in events), "promptTokens": prompt_tokens, "tokens": tokens}


def serve_reference(model_dir: str) -> int:
    """The worker: loads the model, then one JSON line in ({image, maxTokens}), one out."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import load

    model, processor = load(model_dir)
    detokenizer = load_tokenizer(Path(model_dir)).detokenizer
    prompt = reference_prompt(model, processor)
    for line in sys.stdin:
        request = json.loads(line)
        result = reference_run(model, processor, detokenizer, prompt, request["image"], request["maxTokens"])
        print(json.dumps(result), flush=True)
    return 0


class ReferenceWorker:
    """mlx-vlm in a plain child process (its main thread, no sidecar code), OpenBLAS preloaded."""

    def __init__(self, model_dir: Path, blas_library: str | None, children: Children, log: Any) -> None:
        self.process = children.spawn(
            [sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(model_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=with_preloaded(blas_library, dict(os.environ)))
        self.children = children

    def run(self, image_path: Path, max_tokens: int) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"image": str(image_path), "maxTokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the reference worker exited; see its log")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        self.children.stop(self.process)


# ---- the sidecar side --------------------------------------------------------------------------


def image_ref(path: Path, as_data_url: bool) -> str:
    if not as_data_url:
        return str(path)
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def sidecar_run(sidecar: SidecarUnderTest, ref: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat with the image: when its first and last text were read, and more."""
    params: dict[str, Any] = {
        "model": sidecar.model, "maxTokens": max_tokens, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": PROMPT}]}]}
    if sidecar.sends_cache_flag:
        params["cache"] = False  # the same request every round: never answered from the cache
    sent_at = time.perf_counter()
    request_id = sidecar.client.start_request("chat", params)
    response = sidecar.client.wait_response(request_id, REQUEST_TIMEOUT_S)
    chunks = sidecar.chunks.take(request_id)
    if "error" in response:
        raise RuntimeError(f"the sidecar refused the chat: {response['error']}")
    result = response["result"]
    times = [at for at, text in chunks if text]
    usage = result.get("usage") or {}
    return {"ttftMs": (times[0] - sent_at) * 1000 if times else None,
            "decodeSeconds": times[-1] - times[0] if len(times) > 1 else None,
            "text": "".join(text for _, text in chunks), "promptTokens": usage.get("promptTokens"),
            "imageTokens": usage.get("imageTokens"), "tokens": usage.get("completionTokens"),
            "serverTtftMs": (result.get("timings") or {}).get("ttftMs"), "timings": result.get("timings")}


def over_span(run: dict[str, Any], span: int) -> dict[str, Any]:
    """The sidecar's decode rate over the reference's token span (the same tokens: greedy)."""
    seconds = run["decodeSeconds"]
    return {**run, "tokensPerSecond": span / seconds if seconds else None}


# ---- a size: rounds side by side -----------------------------------------------------------------


def bench_image(models_dir: Path, size: str) -> Path:
    side = IMAGE_SIDES[size]
    path = models_dir / "bench-images" / f"noise-{side}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image(22, side, side))
    return path


def measure_size(report: Report, size: str, model_dir: Path, picture: Path, args: argparse.Namespace,
                 sidecar: SidecarUnderTest, blas_library: str | None, children: Children, logs: Logs) -> None:
    section = f"{size}: {model_dir.name}, image to first token and decode, sidecar vs in-process mlx-vlm"
    progress(f"{size}: loading {model_dir.name} in the sidecar and in the reference worker")
    sidecar.load(model_dir.name)
    worker = ReferenceWorker(model_dir, blas_library, children, logs.open(f"reference-{size}"))
    ref = image_ref(picture, args.data_url)
    pairs = []
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms both up
            reference_first = round_ % 2 == 1
            if reference_first:
                reference = worker.run(picture, args.max_tokens)
                mine = sidecar_run(sidecar, ref, args.max_tokens)
            else:
                mine = sidecar_run(sidecar, ref, args.max_tokens)
                reference = worker.run(picture, args.max_tokens)
            mine = over_span(mine, int(reference["span"]))
            progress(f"{size} round {round_}{' (warm-up)' if round_ == 0 else ''}: "
                     f"TTFT in-process {reference['ttftMs']:.1f} ms, sidecar {mine['ttftMs']:.1f} ms; decode "
                     f"{reference['tokensPerSecond'] or 0:.1f} vs {mine['tokensPerSecond'] or 0:.1f} tok/s")
            if round_ > 0:
                pairs.append({"reference": reference, "sidecar": mine, "referenceFirst": reference_first})
    finally:
        worker.close()
        sidecar.client.request("models/unload", {"model": model_dir.name}, timeout=REQUEST_TIMEOUT_S)
    report.raw[f"vision-{size}"] = pairs
    add_size_figures(report, section, pairs)


def add_size_figures(report: Report, section: str, pairs: list[dict[str, Any]]) -> None:
    def median_of(side: str, key: str) -> float | None:
        return median_or_none(p[side][key] for p in pairs if p[side][key] is not None)

    report.add(section, "in-process image to first token (median)", median_of("reference", "ttftMs"), "ms")
    report.add(section, "in-process image to first token, visible or not (median)",
               median_of("reference", "firstTokenMs"), "ms")
    report.add(section, "sidecar image to first token, client-side (median)", median_of("sidecar", "ttftMs"), "ms")
    report.add(section, "sidecar's own ttftMs, server-side (median)", median_of("sidecar", "serverTtftMs"), "ms")
    report.add(section, "  of which queueMs (median)", median_or_none(
        p["sidecar"]["timings"].get("queueMs") for p in pairs if p["sidecar"]["timings"].get("queueMs") is not None), "ms")
    overhead = median_or_none(p["sidecar"]["ttftMs"] - p["reference"]["ttftMs"] for p in pairs)
    report.add_below(section, "TTFT overhead, sidecar - in-process (median of pairs)", overhead, 5.0, "ms")
    report.add(section, "TTFT sidecar / in-process (median of pairs)",
               median_or_none(p["sidecar"]["ttftMs"] / p["reference"]["ttftMs"] for p in pairs), "x")
    report.add(section, "in-process decode (median)", median_of("reference", "tokensPerSecond"), "tok/s")
    report.add(section, "sidecar decode, client-side (median)", median_of("sidecar", "tokensPerSecond"), "tok/s")
    rated = [p for p in pairs if p["sidecar"]["tokensPerSecond"] and p["reference"]["tokensPerSecond"]]
    report.add_at_least(section, "decode sidecar / in-process (median of pairs)", median_or_none(
        p["sidecar"]["tokensPerSecond"] / p["reference"]["tokensPerSecond"] for p in rated), 0.97, "x")
    first = pairs[0] if pairs else {"sidecar": {}, "reference": {}}
    prompt = (f"{first['sidecar'].get('promptTokens')} ({first['sidecar'].get('imageTokens')} image) vs "
              f"{first['reference'].get('promptTokens')}")
    same_prompt = all(p["sidecar"]["promptTokens"] == p["reference"]["promptTokens"] for p in pairs)
    report.add(section, "prompt tokens, sidecar vs in-process", prompt, target="equal", passed=same_prompt)
    same = sum(p["sidecar"]["text"] == p["reference"]["text"] for p in pairs)
    report.add(section, "rounds with the same text on both sides", f"{same} of {len(pairs)}", target="all",
               passed=same == len(pairs))


# ---- cold start --------------------------------------------------------------------------------


def measure_cold_start(report: Report, env: dict[str, str], spawns: int, children: Children, logs: Logs) -> None:
    section = "cold start, text-only path, mlx-vlm installed (spawn -> initialize answered)"
    log = logs.open("sidecar-cold-start")
    times, bare = [], []
    for run in range(spawns):  # each beside a bare interpreter's start, the order alternating
        for side in ("sidecar", "bare") if run % 2 == 0 else ("bare", "sidecar"):
            started = time.perf_counter()
            if side == "bare":
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                bare.append((time.perf_counter() - started) * 1000)
                continue
            sidecar = SidecarUnderTest(env, children, log)
            times.append((time.perf_counter() - started) * 1000)
            sidecar.close()
        progress(f"cold start {run}: {times[-1]:.0f} ms (a bare interpreter: {bare[-1]:.0f} ms)")
    report.raw["coldStartMs"] = {"sidecar": times, "bareInterpreter": bare}
    report.add_below(section, f"spawn -> initialize, median of {spawns}", median_or_none(times), 300, "ms")
    report.add(section, "a bare interpreter's start (python -c pass), median", median_or_none(bare), "ms")
    report.add(section, "sidecar / bare interpreter (median of pairs)",
               median_or_none(s / b for s, b in zip(times, bare, strict=True)), "x")
    imported = modules_imported_serving(env, logs.directory / "sidecar-importtime.log", children)
    vision = sorted(m for m in imported if m.split(".")[0] == "mlx_vlm")
    report.raw["importedAtStart"] = sorted(imported)
    report.add(section, "mlx_vlm imported by initialize + models/list", ", ".join(vision[:3]) or "no",
               target="no", passed=not vision and bool(imported))


def modules_imported_serving(env: dict[str, str], log_path: Path, children: Children) -> set[str]:
    """Every module a sidecar imports through initialize and models/list (which looks at the
    vision models), from Python's own import log (children included)."""
    with log_path.open("wb") as log:
        client = SidecarClient(sidecar_command(), env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, stderr=log.fileno())
        children.track(client.process)
        try:
            client.initialize(name="localmlx-bench-vision")
            listed = client.request("models/list", {})
            assert any("vision" in (m.get("capabilities") or ()) for m in listed["models"]), "no vision model listed"
        finally:
            client.close()
            children.stop(client.process)
    return imported_modules(log_path.read_text(encoding="utf-8", errors="replace"))


def imported_modules(log: str) -> set[str]:
    """`import time: self | cumulative | name` lines: the names (indentation shows nesting)."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2 and "imported package" not in line}


# ---- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and spawns, shorter generations")
    parser.add_argument("--size", default=",".join(SIZES), help=f"comma-separated models, of: {', '.join(SIZES)} "
                                                                f"[{','.join(SIZES)}]")
    parser.add_argument("--rounds", type=int, help="measured rounds per size, the sides alternating [6; quick: 2]")
    parser.add_argument("--max-tokens", type=int, help="tokens per generation [128; quick: 48]")
    parser.add_argument("--spawns", type=int, help="cold starts [7; quick: 3]")
    parser.add_argument("--data-url", action="store_true", help="send the image inline (a data: URL), not by path")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated parts, of: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="write every figure and the raw numbers here")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"where the models are built and kept [{DEFAULT_MODELS_DIR}]")
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every sidecar (repeatable)")
    parser.add_argument("--log-dir", type=Path, help="where logs go [a new temp dir]")
    parser.add_argument("--reference-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, known in (("--size", args.size, SIZES), ("--only", args.only, SECTIONS)):
        unknown = set(value.split(",")) - set(known)
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}")
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.max_tokens = args.max_tokens or (48 if args.quick else 128)
    args.spawns = args.spawns or (3 if args.quick else 7)
    return args


def run(args: argparse.Namespace, report: Report, children: Children, logs: Logs) -> None:
    models_dir = args.models_dir.expanduser()
    sizes = args.size.split(",")
    progress(f"building (or reusing) {', '.join(sizes)} in {models_dir}")
    model_dirs = {size: build(models_dir, size) for size in sizes}
    env = {"LOCALMLX_MODELS_DIR": str(models_dir), "LOCALMLX_LOG_LEVEL": "INFO",
           **dict(kv.split("=", 1) for kv in args.sidecar_env)}
    blas_library = optimized_blas_library()
    report.context.update({
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load average": f"{load_average()} (at start)",
        "in-process side": f"mlx-vlm {importlib.metadata.version('mlx-vlm')} stream_generate, BLAS "
                           f"{blas_library or 'as installed (none to preload)'}",
        "image": "data: URL" if args.data_url else "a file path under the models dir",
        "generation": f"greedy, {args.max_tokens} tokens, {args.rounds} rounds + 1 warm-up per size"})
    if "decode" in args.only.split(","):
        sidecar = SidecarUnderTest(env, children, logs.open("sidecar"))
        report.context["sidecar"] = f"BLAS {sidecar.blas}"
        try:
            for size in sizes:
                measure_size(report, size, model_dirs[size], bench_image(models_dir, size), args, sidecar,
                             blas_library, children, logs)
        finally:
            sidecar.close()
    if "cold-start" in args.only.split(","):
        measure_cold_start(report, env, args.spawns, children, logs)
    report.context["load average"] += f", {load_average()} (at end)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_worker:
        return serve_reference(args.reference_worker)
    return run_and_report(args, run, "bench-vision")


if __name__ == "__main__":
    sys.exit(main())

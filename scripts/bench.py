#!/usr/bin/env python3
"""The sidecar under load, side by side with `mlx_lm.server`, in one run, on one model.

The model is an unquantized ~24M-parameter llama built locally and deterministically (the
demo model's recipe at a larger shape, so that compute dominates and batching shows on a
CPU); `--quantize 4` benches a 4-bit conversion of it instead (the case that matters on
Metal). Both servers get the best BLAS the machine has: `mlx_lm.server` is started on
loopback with OpenBLAS preloaded (`LD_PRELOAD`, Linux, when installed); the sidecar runs with
its default `LOCALMLX_BLAS=auto`. Every request is greedy (temperature 0) and streamed.

What is measured, and how:

- **throughput** (sidecar, `mlx_lm.server`, and with `--vllm-mlx` also `vllm-mlx serve
  --continuous-batching`, installed on first use into its own environment under the models
  directory, preloaded with the same BLAS as `mlx_lm.server`): a closed loop at 1, 4, 8 and 16 concurrent
  streams. Each stream sends a request, reads its stream to the end, and sends the next at
  once, until the section's duration has passed (requests already sent run to completion).
  Prompts are distinct (nothing a cache holds can help), `maxTokens` cycles through a
  deterministic mix, shifted per stream so the streams fall out of step; both servers get
  the same sequence of requests (the faster one gets further along it), each after a short
  unmeasured warm-up loop at the same concurrency. Aggregate tokens/s = completion tokens
  of all requests / (last response - first request). TTFT = client-side, request written
  to first visible text read; p50 and p95 over all requests. Ratio = sidecar / each other
  server's aggregate at the same concurrency, and / the best of them when there are two.
  CPU per token = the server process's CPU time (all its threads, from /proc; Linux only)
  over the loop / its completion tokens, with the cores it kept busy: where every core is
  busy, the servers' aggregate ratio is the inverse of this ratio, so it tells a server that
  does less work per token from one that only schedules the same work better.
  Several rounds (3; `--rounds`), each with its own prompts; the servers take turns, the order
  rotated by one at each level and round, so drift in the machine's load hits all; a level's
  figures sum its rounds.
- **mixed prompts**: the same loop at 8 streams, but streams 0 and 4 send 400-word prompts
  (~500 tokens) and the others 30 words, as when an agent with a long context and quick
  router calls share a model; aggregate tokens/s and TTFT p50 per server, ratios sidecar /
  each. (A server that prefills waiting prompts together pads each to the longest.)
- **single stream vs in-process**: the same prompts through the sidecar and through
  `mlx_lm.stream_generate` in a plain worker process (same BLAS), interleaved in a shuffled
  order. At temperature 0 both produce the same tokens, so visible text starts and ends at
  the same token indexes k0 and k1; decode tokens/s = (k1 - k0) / (t1 - t0), the sidecar's
  clock being this client reading chunk lines. Ratio = median over the runs of each run's
  sidecar / reference.
- **transport**: what lies between a client and the engine's own clock: client-seen TTFT
  (request line written to first chunk read) minus the `timings.ttftMs` the sidecar reports
  (its line read to its first text emitted), so the reader, the outbox and the pipe each
  way. Short greedy generations after 0, 50, 300 and 1000 ms of idle (a machine's cores
  wake slowly after idle), median per idle time, once on the wire itself (a sidecar on a raw
  pipe that the measuring thread writes and reads) and once through the project's Python
  client (its reader thread in between); the two take turns. (`npm run bench` in
  node-client gives the TypeScript client's figure.)
- **prefix cache**: turn 1 is a ~1500-token system text and a question; turn 2 appends the
  reply and a new question. Ratio = median turn-2 TTFT / median turn-1 TTFT, once on the
  sidecar as configured and once on a sidecar with `LOCALMLX_PREFIX_CACHE=false` (plus
  `LOCALMLX_ENABLE_CACHE=false`, which turned the prompt cache off before the split).
- **response cache**: one deterministic request sent twice; the second must come back
  `cached: true`; its TTFT and total time are shown next to the first's.
- **cold start**: spawn -> `initialize` answered, median of several spawns, with
  `LOCALMLX_BLAS=auto` and with `bundled`, interleaved.
- **stalled reader**: a sidecar on a raw pipe (prefix cache off: the KV it keeps for later
  requests is bounded by its own setting and is not what a stalled reader costs) runs several
  long streams, read normally (so that it holds the memory this workload needs: KV caches,
  MLX's buffer cache); then the
  same streams again, and 1.5 s in the client stops reading stdout for 10 s. RSS growth =
  the highest RSS sampled during the stall - the RSS when the stall began (sampled every
  100 ms from /proc, or `ps` on macOS). Afterwards every stream must be complete: seq
  contiguous from 0, a result, full length, no chunk after its response.

`cache: false` (the response cache off per request) is sent only when `initialize` lists
`capabilities.responseCache`, so that older sidecars, which reject unknown params, work.
Figures missing from an older sidecar are shown as such. The table goes to stdout, the
servers' logs to files (their directory is named on stderr), progress to stderr. Numbers
from a busy machine are noisy: take final figures on a quiet one.

    .venv/bin/python scripts/bench.py [--quick] [--only throughput,cold-start] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.client import RpcCallError, SidecarClient, sidecar_command
from sidecar.demo_model import CORPUS_PATH, ModelShape, build_demo_model
from sidecar.jsonrpc import id_key
from sidecar.transport import LineFramer, OversizedLine, encode_message

BENCH_SHAPE = ModelShape(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                         intermediate_size=1408)
BENCH_MODEL_DIRNAME = "localmlx-bench-24m"
DEFAULT_MODELS_DIR = Path("~/.cache/localmlx/bench").expanduser()
SECTIONS = ("single-stream", "transport", "throughput", "mixed-prompts", "prefix-cache", "response-cache",
            "cold-start", "stalled-reader")
SINGLE_STREAM_PROMPT = "The sea and the mountains were old friends, and every morning they"
REQUEST_TIMEOUT_S = 900.0
PROMPT_WORDS = 30  # a closed loop's prompts, unless told otherwise


@dataclass(frozen=True)
class Scale:
    concurrencies: tuple[int, ...] = (1, 4, 8, 16)
    loop_seconds: float = 20.0  # per concurrency level, server and round
    throughput_rounds: int = 3  # every level on every server, the order rotated each round
    token_mix: tuple[int, ...] = (64, 96, 128, 160, 192)
    single_runs: int = 7
    single_max_tokens: int = 256
    transport_rounds: int = 12
    system_tokens: int = 1500
    prefix_repeats: int = 2
    cold_starts: int = 5
    mixed_streams: int = 8
    long_prompt_words: int = 400  # every 4th stream's prompts, in mixed-prompts (~500 tokens)
    stall_seconds: float = 10.0
    stall_streams: int = 4
    stall_max_tokens: int = 768


FULL = Scale()
QUICK = Scale(loop_seconds=5.0, throughput_rounds=1, token_mix=(32, 48, 64, 80, 96), single_runs=3,
              single_max_tokens=128, transport_rounds=4, system_tokens=600, prefix_repeats=1, cold_starts=3,
              long_prompt_words=200, stall_streams=2, stall_max_tokens=512)


# ---- figures and the table -----------------------------------------------------------------


@dataclass
class Figure:
    section: str
    label: str
    value: Any  # a number, a short text, or None when it could not be measured
    unit: str = ""
    target: str = ""
    passed: bool | None = None  # None: no target, or nothing to judge


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, label: str, value: Any, unit: str = "", target: str = "",
            passed: bool | None = None) -> None:
        self.figures.append(Figure(section, label, value, unit, target, passed))

    def add_at_least(self, section: str, label: str, value: float | None, bound: float,
                     unit: str) -> None:
        passed = None if value is None else value >= bound
        self.add(section, label, value, unit, f">= {format_value(bound, unit)}", passed)

    def add_at_most(self, section: str, label: str, value: float | None, bound: float,
                    unit: str) -> None:
        passed = None if value is None else value <= bound
        self.add(section, label, value, unit, f"<= {format_value(bound, unit)}", passed)

    def add_below(self, section: str, label: str, value: float | None, bound: float,
                  unit: str) -> None:
        passed = None if value is None else value < bound
        self.add(section, label, value, unit, f"< {format_value(bound, unit)}", passed)


def format_value(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "%":
        return f"{value:.1f} %"
    if unit in ("", "count"):
        return f"{value:g}"
    return f"{value:.1f} {unit}"


def print_table(report: Report, out=sys.stdout) -> None:
    for key, value in report.context.items():
        print(f"{key + ':':<18}{value}", file=out)
    width = max([len(f.label) for f in report.figures] + [40])
    section = None
    for figure in report.figures:
        if figure.section != section:
            section = figure.section
            print(f"\n{section}", file=out)
            print(f"  {'figure':<{width}}  {'value':>14}  {'target':>12}  result", file=out)
        verdict = {True: "PASS", False: "FAIL", None: ""}[figure.passed]
        if figure.target and figure.passed is None:
            verdict = "n/a"
        print(f"  {figure.label:<{width}}  {format_value(figure.value, figure.unit):>14}  "
              f"{figure.target:>12}  {verdict}", file=out)
    judged = [f for f in report.figures if f.passed is not None]
    print(f"\n{sum(f.passed for f in judged)} of {len(judged)} targets met", file=out)


def write_json(report: Report, path: Path) -> None:
    document = {"context": report.context, "figures": [asdict(f) for f in report.figures],
                "raw": report.raw}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def ratio_or_none(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ---- processes: everything started is stopped ----------------------------------------------


class Children:
    """Every process the benchmark starts, each in its own process group (so a Ctrl-C aimed
    at the benchmark reaches it alone), stopped with its whole group on the way out."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []

    def track(self, process: subprocess.Popen) -> subprocess.Popen:
        self._processes.append(process)
        return process

    def spawn(self, args: list[str], **popen: Any) -> subprocess.Popen:
        return self.track(subprocess.Popen(args, start_new_session=True, **popen))

    def stop(self, process: subprocess.Popen, grace: float = 5.0) -> None:
        stop_process_group(process, grace)
        if process in self._processes:
            self._processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(self._processes):
            stop_process_group(process, 2.0)
        self._processes.clear()


def stop_process_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace` seconds; always reaps it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers the leader left in its group
        os.killpg(process.pid, signal.SIGKILL)


def interrupt_on_sigint_and_sigterm() -> None:
    """Both end the run through KeyboardInterrupt, so every `finally` runs (SIGINT too when
    the shell that started us ignored it, as non-interactive shells do for `&` jobs)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Logs:
    """One file per process started, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files: list[Any] = []

    def open(self, name: str):
        file = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (a child's log: closed by close())
        self._files.append(file)
        return file

    def close(self) -> None:
        for file in self._files:
            file.close()


# ---- the machine and its BLAS --------------------------------------------------------------


def optimized_blas_library() -> str | None:
    """An OpenBLAS to preload on Linux (pthread builds first), None elsewhere or when absent."""
    if not sys.platform.startswith("linux"):
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    candidates = [f"/usr/lib/{multiarch}/openblas-pthread/libopenblas.so.0",
                  f"/usr/lib/{multiarch}/libopenblas.so.0",
                  "/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0",
                  "/usr/lib/libopenblas.so.0", "/usr/local/lib/libopenblas.so.0"]
    return next((path for path in candidates if os.path.exists(path)), None)


def with_preloaded(library: str | None, env: dict[str, str]) -> dict[str, str]:
    if library is None:
        return env
    return {**env, "LD_PRELOAD": library}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---- the model -----------------------------------------------------------------------------


def prepare_model(models_dir: Path, quantize: int | None, children: Children, logs: Logs) -> Path:
    progress(f"building (or reusing) the benchmark model in {models_dir}")
    fp32 = build_demo_model(models_dir / BENCH_MODEL_DIRNAME, BENCH_SHAPE)
    if quantize is None:
        return fp32
    return quantized_copy(fp32, quantize, children, logs)


def quantized_copy(source: Path, bits: int, children: Children, logs: Logs) -> Path:
    """`mlx_lm convert -q` into a temporary sibling renamed into place: never half-written."""
    dest = source.parent / f"{source.name}-{bits}bit"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    progress(f"quantizing to {bits} bits into {dest}")
    tmp = source.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    log = logs.open("mlx_lm-convert")
    try:
        process = children.spawn([sys.executable, "-m", "mlx_lm", "convert", "--hf-path",
                                  str(source), "--mlx-path", str(tmp), "-q", "--q-bits",
                                  str(bits)], stdout=log, stderr=log)
        if process.wait() != 0:
            raise RuntimeError(f"mlx_lm convert failed; see {log.name}")
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def describe_model(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    quantization = config.get("quantization")
    precision = f"{quantization['bits']}-bit" if quantization else config.get("torch_dtype", "?")
    size = "" if quantization else f"{parameter_count(model_dir / 'model.safetensors') / 1e6:.1f}M, "
    return (f"{model_dir.name}: llama, {size}hidden {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, {precision}")


def parameter_count(safetensors: Path) -> int:
    with open(safetensors, "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def corpus_words() -> list[str]:
    return CORPUS_PATH.read_text(encoding="utf-8").split()


def distinct_prompt(words: list[str], *key: Any, length: int = PROMPT_WORDS) -> str:
    """A question no other request asks (its words depend on the key), same length for all."""
    chooser = random.Random("/".join(map(str, key)))
    start = chooser.randrange(len(words) - length)
    return f"Question {'-'.join(map(str, key))}: " + " ".join(words[start:start + length])


def long_system_text(words: list[str], tokenizer_path: Path, tag: str, tokens: int) -> str:
    """Corpus text of about `tokens` tokens, opening with `tag` so no two share a prefix."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    start = random.Random(tag).randrange(len(words) // 2)
    count = tokens // 2
    while True:
        text = f"Session {tag}. " + " ".join(words[start:start + count])
        if len(tokenizer.encode(text).ids) >= tokens or start + count >= len(words):
            return text
        count += 50


# ---- one streamed request, on either server ------------------------------------------------


@dataclass
class Completion:
    sent_at: float
    first_text_at: float | None
    done_at: float
    completion_tokens: int
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    cached_tokens: int | None = None
    from_response_cache: bool | None = None
    finish_reason: str | None = None
    timings: dict[str, Any] | None = None  # the sidecar's result.timings (not on mlx_lm.server)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_text_at is None else (self.first_text_at - self.sent_at) * 1000

    @property
    def total_ms(self) -> float:
        return (self.done_at - self.sent_at) * 1000


class ChunkLog:
    """Arrival time and text of every `generate/chunk`, by request id (the client's reader
    thread calls `record`, so the time is when the line was read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[Any, list[tuple[float, str]]] = {}

    def record(self, message: dict[str, Any]) -> None:
        if message.get("method") != "generate/chunk":
            return
        now = time.perf_counter()
        params = message.get("params") or {}
        with self._lock:
            self._chunks.setdefault(id_key(params.get("requestId")), []).append(
                (now, params.get("text", "")))

    def take(self, request_id: Any) -> list[tuple[float, str]]:
        with self._lock:
            return self._chunks.pop(id_key(request_id), [])


class SidecarUnderTest:
    """A sidecar spawned over stdio, as Wooster spawns it."""

    def __init__(self, env: dict[str, str], children: Children, log) -> None:
        self.chunks = ChunkLog()
        self.client = SidecarClient(sidecar_command(), env=sidecar_env(env),
                                    on_notification=self.chunks.record, stderr=log.fileno())
        children.track(self.client.process)
        self.children = children
        self.info = self.client.initialize(name="localmlx-bench")
        capabilities = self.info.get("capabilities") or {}
        self.sends_cache_flag = capabilities.get("responseCache") is True
        self.model: str | None = None

    @property
    def blas(self) -> str:
        blas = (self.info.get("serverInfo") or {}).get("blas")
        return blas.get("name", "?") if isinstance(blas, dict) else "not reported"

    def load(self, model: str) -> dict[str, Any]:
        self.model = model
        return self.client.request("models/load", {"model": model}, timeout=REQUEST_TIMEOUT_S)

    def chat(self, messages: list[dict[str, str]], max_tokens: int,
             response_cache: bool = False) -> Completion:
        return self.stream("chat", {"messages": messages}, max_tokens, response_cache)

    def generate(self, prompt: str, max_tokens: int) -> Completion:
        return self.stream("generate", {"prompt": prompt}, max_tokens, False)

    def stream(self, method: str, params: dict[str, Any], max_tokens: int,
               response_cache: bool) -> Completion:
        params = {"model": self.model, **params, "maxTokens": max_tokens, "temperature": 0,
                  "stream": True}  # params may name another loaded model
        if self.sends_cache_flag and not response_cache:
            params["cache"] = False
        sent_at = time.perf_counter()
        request_id = self.client.start_request(method, params)
        response = self.client.wait_response(request_id, REQUEST_TIMEOUT_S)
        done_at = time.perf_counter()
        chunks = self.chunks.take(request_id)
        if "error" in response:
            if self.refused_the_cache_flag(response["error"], params):
                return self.stream(method, params, max_tokens, response_cache)
            raise RpcCallError(response["error"])
        result = response["result"]
        usage = result.get("usage") or {}
        return Completion(sent_at, chunks[0][0] if chunks else None, done_at,
                          usage.get("completionTokens", 0), [t for t, _ in chunks],
                          "".join(text for _, text in chunks), usage.get("cachedTokens"),
                          result.get("cached"), result.get("finishReason"), result.get("timings"))

    def refused_the_cache_flag(self, error: dict[str, Any], params: dict[str, Any]) -> bool:
        """A sidecar that does not know `cache` rejects it (-32602): stop sending it."""
        if error.get("code") != -32602 or "cache" not in params:
            return False
        self.sends_cache_flag = False
        params.pop("cache")
        return True

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.children.stop(self.client.process)


def sidecar_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(extra)
    if os.environ.get("LD_PRELOAD"):
        env.setdefault("LD_PRELOAD", "")  # the sidecar picks its BLAS itself
    return env


class MlxLmServer:
    """`python -m mlx_lm server` on loopback, driven over HTTP with streaming."""

    name = "mlx_lm.server"

    def __init__(self, model_dir: Path, blas_library: str | None, children: Children,
                 log, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_loopback_port()
        self.model_dir = model_dir
        self.children = children
        self.connection_retries = 0
        self._lock = threading.Lock()
        self.process = children.spawn(
            [*self.command(model_dir), "--host", "127.0.0.1", "--port", str(self.port), *extra_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=with_preloaded(blas_library, {**os.environ, **(env or {})}))
        self.wait_until_healthy()

    def command(self, model_dir: Path) -> list[str]:
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--log-level", "WARNING"]

    def request_fields(self) -> dict[str, Any]:
        """What every request body carries besides the messages and sampling."""
        return {}

    def wait_until_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not become healthy")

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        """One streamed chat completion. Its accept backlog is 5 (socketserver's default):
        with many clients connecting at once, a connection can be reset before the server
        reads it. Like the OpenAI SDKs, retry those; the time lost stays in the TTFT."""
        body = json.dumps({**self.request_fields(), "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
        sent_at = time.perf_counter()
        for attempt in range(4):
            connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                    timeout=REQUEST_TIMEOUT_S)
            try:
                connection.request("POST", "/v1/chat/completions", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
            except (ConnectionResetError, ConnectionRefusedError,
                    http.client.RemoteDisconnected):
                connection.close()
                if attempt == 3:
                    raise
                with self._lock:
                    self.connection_retries += 1
                time.sleep(0.05)
                continue
            try:
                if response.status != 200:
                    raise RuntimeError(f"{self.name}: HTTP {response.status}: "
                                       f"{response.read()[:500]!r}")
                return read_event_stream(response, sent_at)
            finally:
                connection.close()
        raise AssertionError("unreachable")


class VllmMlxServer(MlxLmServer):
    """`vllm-mlx serve` (continuous batching) from its own environment, on loopback. Its home
    is a fresh directory: it keeps its prefix cache under ~/.cache/vllm-mlx across runs, and
    the benchmark's prompts repeat from one run to the next."""

    name = "vllm-mlx"

    def __init__(self, env_dir: Path, model_dir: Path, blas_library: str | None,
                 children: Children, log: Any, home: Path) -> None:
        self.env_dir = env_dir
        super().__init__(model_dir, blas_library, children, log,
                         env={"HOME": str(home), "HF_HUB_OFFLINE": "1"})

    def command(self, model_dir: Path) -> list[str]:
        return [str(self.env_dir / "bin" / "vllm-mlx"), "serve", str(model_dir), "--continuous-batching"]

    def request_fields(self) -> dict[str, Any]:
        return {"model": str(self.model_dir)}  # required; it serves the one model it was given


def ensure_vllm_mlx(env_dir: Path, children: Children, logs: Logs) -> str:
    """A virtual environment with vllm-mlx (and MLX's CPU wheel off macOS) at `env_dir`,
    created on first use; returns the installed vllm-mlx version."""
    python = env_dir / "bin" / "python"
    if not (env_dir / "bin" / "vllm-mlx").is_file():
        progress(f"installing vllm-mlx into {env_dir} (once; several GB)")
        log = logs.open("vllm-mlx-install")
        packages = ["vllm-mlx"] if sys.platform == "darwin" else ["vllm-mlx", "mlx[cpu]"]
        for args in ([sys.executable, "-m", "venv", str(env_dir)],
                     [str(python), "-m", "pip", "install", *packages]):
            if children.spawn(args, stdout=log, stderr=log).wait() != 0:
                raise RuntimeError(f"installing vllm-mlx failed; see {log.name}")
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-mlx'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def read_event_stream(response, sent_at: float, on_text=None, finish_needs_done: bool = False) -> Completion:
    """Server-sent events of an OpenAI chat completion, to the `[DONE]` line; each text to
    `on_text`. With `finish_needs_done`, a stream cut off before `[DONE]` has no finish reason."""
    times: list[float] = []
    texts: list[str] = []
    tokens = None
    finish_reason = None
    done = False
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue  # blank separators, ": keepalive" comments
        payload = line[6:].strip()
        if payload == b"[DONE]":
            done = True
            break
        event = json.loads(payload)
        if event.get("usage"):
            tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                times.append(time.perf_counter())
                texts.append(text)
                if on_text is not None:
                    on_text(text)
            finish_reason = choice.get("finish_reason") or finish_reason
    done_at = time.perf_counter()
    return Completion(sent_at, times[0] if times else None, done_at,
                      tokens if tokens is not None else len(times), times, "".join(texts),
                      finish_reason=None if finish_needs_done and not done else finish_reason)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- throughput: a closed loop at several concurrencies ------------------------------------


@dataclass
class LoopResult:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttfts_ms: list[float]
    errors: list[str]
    cpu_seconds: float | None = None  # the server process's, all threads, over the loop (where known)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_token(self) -> float | None:
        return None if self.cpu_seconds is None or not self.tokens else self.cpu_seconds * 1000 / self.tokens

    @property
    def cores_busy(self) -> float | None:
        return None if self.cpu_seconds is None or self.seconds <= 0 else self.cpu_seconds / self.seconds

    def summary(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "requests": self.requests,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokensPerSecond": round(self.tokens_per_second, 2),
                "ttftP50Ms": percentile(self.ttfts_ms, 0.5),
                "ttftP95Ms": percentile(self.ttfts_ms, 0.95), "errors": self.errors[:5],
                "cpuSeconds": self.cpu_seconds}


def run_closed_loop(chat: Callable[[list[dict[str, str]], int], Completion], concurrency: int,
                    seconds: float, token_mix: tuple[int, ...], words: list[str],
                    tag: str, prompt_words: Callable[[int], int] | None = None) -> LoopResult:
    """`concurrency` streams, each sending its next request as soon as the last one ended,
    until `seconds` have passed. Request j of stream i asks for token_mix[(i + j) % n]; its
    prompt has prompt_words(i) words (PROMPT_WORDS when not given)."""
    completions: list[Completion] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def one_stream(stream: int) -> None:
        request = 0
        while time.perf_counter() < deadline:
            length = prompt_words(stream) if prompt_words is not None else PROMPT_WORDS
            messages = [{"role": "user",
                         "content": distinct_prompt(words, tag, concurrency, stream, request, length=length)}]
            max_tokens = token_mix[(stream + request) % len(token_mix)]
            try:
                completion = chat(messages, max_tokens)
            except Exception as exc:  # counted and shown; the stream goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
                request += 1
                continue
            with lock:
                completions.append(completion)
            request += 1

    threads = [threading.Thread(target=one_stream, args=(i,), daemon=True)
               for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = max((c.done_at for c in completions), default=time.perf_counter())
    return LoopResult(concurrency, len(completions), sum(c.completion_tokens for c in completions),
                      end - start, [c.ttft_ms for c in completions if c.ttft_ms is not None],
                      errors)


def measure_throughput(report: Report, sidecar: SidecarUnderTest, servers: list[MlxLmServer],
                       scale: Scale, words: list[str]) -> None:
    """Every level on every server, `scale.throughput_rounds` times; the servers take turns,
    the order rotated by one at each level and round, so drift in the machine's load hits all.
    Each round has its own prompts (no cache holds them); rounds are summed per level."""
    section = "throughput (closed loop, aggregate tokens/s; TTFT client-side)"
    sides = {"sidecar": sidecar.chat, **{server.name: server.chat for server in servers}}
    pids = {"sidecar": sidecar.client.process.pid, **{server.name: server.process.pid for server in servers}}
    names = list(sides)
    runs: dict[str, list[list[LoopResult]]] = {name: [[] for _ in scale.concurrencies] for name in names}
    for round_ in range(scale.throughput_rounds):
        for level, concurrency in enumerate(scale.concurrencies):
            turn = (round_ * len(scale.concurrencies) + level) % len(names)
            for side in names[turn:] + names[:turn]:
                progress(f"throughput: {side}, {concurrency} streams, {scale.loop_seconds:g} s"
                         f" (round {round_ + 1} of {scale.throughput_rounds})")
                warm_up_at(sides[side], concurrency, words)
                result = with_cpu_seconds([pids[side]], functools.partial(
                    run_closed_loop, sides[side], concurrency, scale.loop_seconds, scale.token_mix, words,
                    f"load{level}" + (f"-{round_}" if round_ else "")))
                runs[side][level].append(result)
                progress(f"  {result.tokens_per_second:.1f} tok/s over {result.requests} requests"
                         + (f", {len(result.errors)} errors: {result.errors[0]}" if result.errors else ""))
    results = {name: [merge_loops(rounds) for rounds in runs[name]] for name in names}
    report.raw["throughput"] = {side: [r.summary() for r in rs] for side, rs in results.items()}
    report.raw["throughput"]["rounds"] = {side: [[r.summary() for r in rounds] for rounds in levels]
                                          for side, levels in runs.items()}
    for server in servers:
        report.raw["throughput"][f"{server.name} connection retries"] = server.connection_retries
    for level in range(len(scale.concurrencies)):
        add_throughput_figures(report, section, {name: results[name][level] for name in names})
    for server in servers:
        report.add(section, f"{server.name} connections reset and retried", server.connection_retries)


def measure_mixed_prompts(report: Report, sidecar: SidecarUnderTest, servers: list[MlxLmServer],
                          scale: Scale, words: list[str]) -> None:
    """The throughput loop at one level, where every 4th stream's prompts are long and the
    others' short, as when an agent with a long context and quick router calls share a model:
    a server that prefills them together pads the short ones to the long one's length."""
    streams = scale.mixed_streams
    section = (f"mixed prompts ({streams} streams; streams 0, 4, ... send {scale.long_prompt_words}-word "
               f"prompts, the others {PROMPT_WORDS} words)")
    sides = {"sidecar": sidecar.chat, **{server.name: server.chat for server in servers}}
    names = list(sides)
    runs: dict[str, list[LoopResult]] = {name: [] for name in names}
    for round_ in range(scale.throughput_rounds):
        turn = round_ % len(names)
        for side in names[turn:] + names[:turn]:
            progress(f"mixed prompts: {side}, {streams} streams, {scale.loop_seconds:g} s "
                     f"(round {round_ + 1} of {scale.throughput_rounds})")
            warm_up_at(sides[side], streams, words)
            result = run_closed_loop(sides[side], streams, scale.loop_seconds, scale.token_mix, words,
                                     f"mixed-{round_}",
                                     lambda stream: scale.long_prompt_words if stream % 4 == 0 else PROMPT_WORDS)
            runs[side].append(result)
            progress(f"  {result.tokens_per_second:.1f} tok/s over {result.requests} requests")
    results = {name: merge_loops(rounds) for name, rounds in runs.items()}
    report.raw["mixedPrompts"] = {side: r.summary() for side, r in results.items()}
    for side, result in results.items():
        report.add(section, f"{side} aggregate", result.tokens_per_second, "tok/s")
        report.add(section, f"{side} TTFT p50 / p95",
                   format_pair(percentile(result.ttfts_ms, 0.5), percentile(result.ttfts_ms, 0.95), "ms"))
    ours = results.pop("sidecar")
    for side, theirs in results.items():
        report.add(section, f"sidecar / {side} aggregate", ratio_or_none(ours.tokens_per_second,
                                                                         theirs.tokens_per_second), "x")
        report.add(section, f"TTFT p50 sidecar / {side}", ratio_or_none(percentile(ours.ttfts_ms, 0.5),
                                                                         percentile(theirs.ttfts_ms, 0.5)), "x")


def merge_loops(rounds: list[LoopResult]) -> LoopResult:
    """Rounds of one level on one server as one loop: tokens and seconds summed."""
    cpu = [r.cpu_seconds for r in rounds]
    return LoopResult(rounds[0].concurrency, sum(r.requests for r in rounds), sum(r.tokens for r in rounds),
                      sum(r.seconds for r in rounds), [t for r in rounds for t in r.ttfts_ms],
                      [e for r in rounds for e in r.errors],
                      None if None in cpu else sum(c for c in cpu if c is not None))


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of the process, from /proc/<pid>/stat (None without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu_seconds(pids: list[int], loop: Callable[[], LoopResult]) -> LoopResult:
    """`loop`'s result with the CPU time the processes `pids` spent during it, where /proc tells."""
    before = [cpu_seconds(pid) for pid in pids]
    result = loop()
    after = [cpu_seconds(pid) for pid in pids]
    if None not in before and None not in after:
        result.cpu_seconds = sum(after) - sum(before)  # type: ignore[arg-type]
    return result


def add_throughput_figures(report: Report, section: str, results: dict[str, LoopResult]) -> None:
    """Each server's figures at one level; the sidecar against each other server, and against
    the best of them when there are several. Targets from 4 streams: >= 1.2x the aggregate,
    TTFT p50 no worse."""
    ours = results["sidecar"]
    others = {name: result for name, result in results.items() if name != "sidecar"}
    streams = f"{ours.concurrency:>2} stream{'s' if ours.concurrency > 1 else ' '}"
    busy = ours.concurrency >= 4
    for side, result in results.items():
        report.add(section, f"{streams}: {side} aggregate", result.tokens_per_second, "tok/s")
        report.add(section, f"{streams}: {side} TTFT p50 / p95",
                   format_pair(percentile(result.ttfts_ms, 0.5),
                               percentile(result.ttfts_ms, 0.95), "ms"))
        if result.cpu_seconds is not None:
            report.add(section, f"{streams}: {side} CPU per token (cores busy)",
                       f"{result.cpu_ms_per_token:.2f} ms ({result.cores_busy:.2f})")
        if result.errors:
            report.add(section, f"{streams}: {side} failed requests", len(result.errors),
                       target="0", passed=False)
    comparisons = [(name, theirs, False) for name, theirs in others.items()]
    if len(others) > 1:
        best = max(others, key=lambda name: others[name].tokens_per_second)
        comparisons.append((f"best of others ({best})", others[best], True))
    for name, theirs, judged in comparisons:
        ratio = ratio_or_none(ours.tokens_per_second, theirs.tokens_per_second)
        label = f"{streams}: sidecar / {name}"
        if busy and (judged or len(others) == 1):
            report.add_at_least(section, label, ratio, 1.2, "x")
        else:
            report.add(section, label, ratio, "x")
    fastest_ttft = min((p for p in (percentile(r.ttfts_ms, 0.5) for r in others.values()) if p is not None),
                       default=None)
    ttft_ratio = ratio_or_none(percentile(ours.ttfts_ms, 0.5), fastest_ttft)
    label = f"{streams}: TTFT p50 sidecar / best of others"
    if busy:
        report.add_at_most(section, label, ttft_ratio, 1.0, "x")
    else:
        report.add(section, label, ttft_ratio, "x")


def format_pair(a: float | None, b: float | None, unit: str) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{a:.0f} / {b:.0f} {unit}"


def warm_up_at(chat: Callable[[list[dict[str, str]], int], Completion], concurrency: int,
               words: list[str]) -> None:
    """A short closed loop of short requests, not measured: the first batches of a new size
    are slow on both servers (MLX allocates and compiles per shape)."""
    run_closed_loop(chat, concurrency, 2.0, (16, 32), words, "warm-up")


# ---- single stream vs in-process stream_generate -------------------------------------------


def reference_decode(model, tokenizer, prompt: str, max_tokens: int) -> dict[str, float]:
    """stream_generate, timed on visible text: TTFT ms, decode tokens/s, token span, text."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    events = [(time.perf_counter(), r.text) for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0))]
    visible = [i for i, (_, text) in enumerate(events) if text]
    span = visible[-1] - visible[0]
    t0, t1 = events[visible[0]][0], events[visible[-1]][0]
    return {"ttftMs": (t0 - start) * 1000, "tokensPerSecond": span / (t1 - t0), "span": span,
            "text": "".join(text for _, text in events)}


def serve_reference(model_dir: str) -> int:
    """The worker's side: one JSON line in ({prompt, maxTokens}), one JSON line out."""
    from mlx_lm import load

    model, tokenizer = load(model_dir)
    for line in sys.stdin:
        request = json.loads(line)
        result = reference_decode(model, tokenizer, request["prompt"], request["maxTokens"])
        print(json.dumps(result), flush=True)
    return 0


class ReferenceWorker:
    """mlx_lm.stream_generate in a plain child process (its main thread, no sidecar code),
    with the same BLAS as mlx_lm.server, sleeping on a pipe between runs like the sidecar."""

    def __init__(self, model_dir: Path, blas_library: str | None, children: Children,
                 log) -> None:
        self.process = children.spawn(
            [sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(model_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=with_preloaded(blas_library, dict(os.environ)))
        self.children = children

    def run(self, prompt: str, max_tokens: int) -> dict[str, float]:
        self.process.stdin.write(json.dumps({"prompt": prompt, "maxTokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the reference worker exited; see its log")
        return json.loads(line)

    def close(self) -> None:
        self.children.stop(self.process)


def sidecar_decode(completion: Completion, span: int) -> dict[str, Any]:
    """The sidecar timed like the reference, over the reference's token span."""
    times = completion.chunk_times
    seconds = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"ttftMs": completion.ttft_ms, "tokensPerSecond": span / seconds,
            "text": completion.text}


def one_pair_of_runs(sidecar: SidecarUnderTest, worker: ReferenceWorker, prompt: str,
                     max_tokens: int, reference_first: bool) -> dict[str, dict[str, Any]]:
    if reference_first:
        reference = worker.run(prompt, max_tokens)
        completion = sidecar.generate(prompt, max_tokens)
    else:
        completion = sidecar.generate(prompt, max_tokens)
        reference = worker.run(prompt, max_tokens)
    return {"reference": reference, "sidecar": sidecar_decode(completion, int(reference["span"]))}


def measure_single_stream(report: Report, sidecar: SidecarUnderTest, worker: ReferenceWorker,
                          scale: Scale) -> None:
    section = "single stream vs in-process mlx_lm.stream_generate"
    pairs = []
    order = random.Random(0)
    for run in range(scale.single_runs + 1):  # run 0 warms both up and is not counted
        measured = one_pair_of_runs(sidecar, worker, f"Run {run}. {SINGLE_STREAM_PROMPT}",
                                    scale.single_max_tokens, order.random() < 0.5)
        if run > 0:
            pairs.append(measured)
        progress(f"single stream run {run}: reference {measured['reference']['tokensPerSecond']:.1f}"
                 f" tok/s, sidecar {measured['sidecar']['tokensPerSecond']:.1f} tok/s")
    report.raw["singleStream"] = pairs
    reference_tps = median_or_none(p["reference"]["tokensPerSecond"] for p in pairs)
    sidecar_tps = median_or_none(p["sidecar"]["tokensPerSecond"] for p in pairs)
    report.add(section, "in-process decode (median)", reference_tps, "tok/s")
    report.add(section, "sidecar decode, client-side (median)", sidecar_tps, "tok/s")
    report.add(section, "in-process TTFT (median)",
               median_or_none(p["reference"]["ttftMs"] for p in pairs), "ms")
    report.add(section, "sidecar TTFT, client-side (median)",
               median_or_none(p["sidecar"]["ttftMs"] for p in pairs), "ms")
    paired = median_or_none(p["sidecar"]["tokensPerSecond"] / p["reference"]["tokensPerSecond"]
                            for p in pairs)
    report.add_at_least(section, "decode sidecar / in-process (median of pairs)", paired, 0.99, "x")
    same = sum(p["sidecar"]["text"] == p["reference"]["text"] for p in pairs)
    report.add(section, "runs with the same text on both sides", f"{same} of {len(pairs)}",
               target="all", passed=same == len(pairs))


# ---- transport: from a request's line to its first token on the wire -----------------------

TRANSPORT_IDLE_S = (0.0, 0.05, 0.3, 1.0)
TRANSPORT_MAX_TOKENS = 8


class WireClient:
    """A sidecar on a raw pipe, written and read by the calling thread alone: what the wire
    itself adds, with no client library's threads or parsing in between."""

    def __init__(self, env: dict[str, str], children: Children, log) -> None:
        self.process = children.spawn(sidecar_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log, env={**os.environ, **sidecar_env(env)})
        self.children = children
        self._framer = LineFramer(1 << 30)
        self._read: list[tuple[bytes, float]] = []  # lines read but not yet taken, with when
        self._last_id = 0

    def call(self, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], float, float | None]:
        """(the response, when its line was written, when its first chunk was read)."""
        self._last_id += 1
        line = encode_message({"jsonrpc": "2.0", "id": self._last_id, "method": method, "params": params})
        sent_at = time.perf_counter()
        view = memoryview(line)
        while view:
            view = view[os.write(self.process.stdin.fileno(), view):]
        first_chunk_at = None
        while True:
            message, read_at = self._next_message()
            if message.get("method") == "generate/chunk":
                first_chunk_at = first_chunk_at or read_at
            elif message.get("id") == self._last_id:
                if "error" in message:
                    raise RpcCallError(message["error"])
                return message["result"], sent_at, first_chunk_at

    def _next_message(self) -> tuple[dict[str, Any], float]:
        while not self._read:
            data = os.read(self.process.stdout.fileno(), 1 << 16)
            read_at = time.perf_counter()
            if not data:
                raise RuntimeError("the wire-client sidecar exited; see its log")
            self._read = [(line, read_at) for line in self._framer.feed(data)
                          if isinstance(line, bytes) and line.strip()]
        line, read_at = self._read.pop(0)
        return json.loads(line), read_at

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # EOF ends the sidecar
        self.children.stop(self.process, grace=10.0)


def measure_transport(report: Report, sidecar: SidecarUnderTest, base_env: dict[str, str], model: str,
                      scale: Scale, children: Children, logs: Logs) -> None:
    section = "transport: client-seen TTFT minus the sidecar's ttftMs"
    progress("starting a sidecar on a raw pipe for the transport section")
    wire = WireClient(base_env, children, logs.open("sidecar-wire"))
    try:
        info = wire.call("initialize", {"protocolVersion": 1, "clientInfo": {"name": "localmlx-bench"}})[0]
        wire.call("models/load", {"model": model})
        flags = {"cache": False} if (info.get("capabilities") or {}).get("responseCache") is True else {}

        def on_the_wire(prompt: str) -> float | None:
            result, sent_at, first_chunk_at = wire.call("generate", {
                "model": model, "prompt": prompt, "maxTokens": TRANSPORT_MAX_TOKENS, "temperature": 0,
                "stream": True, **flags})
            return transport_gap_ms(sent_at, first_chunk_at, result.get("timings"))

        def through_the_client(prompt: str) -> float | None:
            completion = sidecar.generate(prompt, TRANSPORT_MAX_TOKENS)
            return transport_gap_ms(completion.sent_at, completion.first_text_at, completion.timings)

        sides = {"wire": on_the_wire, "Python client": through_the_client}
        gaps: dict[tuple[str, float], list[float]] = {}
        for run in range(scale.transport_rounds + 1):  # run 0 warms both up and is not counted
            for idle in TRANSPORT_IDLE_S:
                for name in (list(sides) if run % 2 else list(reversed(sides))):
                    time.sleep(idle)
                    gap = sides[name](f"Run {run}, {name}, {idle}. {SINGLE_STREAM_PROMPT}")
                    if run > 0 and gap is not None:
                        gaps.setdefault((name, idle), []).append(gap)
    finally:
        wire.close()
    report.raw["transport"] = {f"{name} after {idle * 1000:g} ms idle": values
                               for (name, idle), values in gaps.items()}
    for name in sides:
        for idle in TRANSPORT_IDLE_S:
            report.add_at_most(section, f"{name}, after {idle * 1000:g} ms idle (median)",
                               median_or_none(gaps.get((name, idle), [])), 2.0, "ms")


def transport_gap_ms(sent_at: float, first_chunk_at: float | None, timings: dict[str, Any] | None) -> float | None:
    if first_chunk_at is None or not timings or "ttftMs" not in timings:
        return None
    return (first_chunk_at - sent_at) * 1000 - timings["ttftMs"]


# ---- prefix cache: the second turn of a conversation ---------------------------------------


def measure_prefix_cache(report: Report, with_cache: SidecarUnderTest,
                         without_cache: SidecarUnderTest, scale: Scale, words: list[str],
                         tokenizer_path: Path) -> None:
    section = f"prefix cache (second turn of a ~{scale.system_tokens}-token conversation)"
    outcome = {}
    for label, sidecar in (("on", with_cache), ("off", without_cache)):
        turns = [two_turns(sidecar, words, tokenizer_path, f"{label}-{rep}", scale.system_tokens)
                 for rep in range(scale.prefix_repeats)]
        outcome[label] = turns
        first = median_or_none(t["firstTtftMs"] for t in turns)
        second = median_or_none(t["secondTtftMs"] for t in turns)
        cached = median_or_none(t["secondCachedTokens"] or 0 for t in turns)
        report.add(section, f"prefix cache {label}: turn 1 TTFT", first, "ms")
        report.add(section, f"prefix cache {label}: turn 2 TTFT", second, "ms")
        report.add(section, f"prefix cache {label}: turn 2 cachedTokens", cached, "count")
        ratio = ratio_or_none(second, first)
        percent = None if ratio is None else ratio * 100
        if label == "on":
            report.add_at_most(section, "prefix cache on: turn 2 / turn 1 TTFT", percent, 25, "%")
        else:
            report.add(section, "prefix cache off: turn 2 / turn 1 TTFT", percent, "%")
    report.raw["prefixCache"] = outcome


def two_turns(sidecar: SidecarUnderTest, words: list[str], tokenizer_path: Path, tag: str,
              system_tokens: int) -> dict[str, Any]:
    progress(f"prefix cache: conversation {tag}")
    system = long_system_text(words, tokenizer_path, tag, system_tokens)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "What did the sea tell the mountains?"}]
    first = sidecar.chat(messages, 32)
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And what did the mountains answer?"}]
    second = sidecar.chat(messages, 8)
    return {"firstTtftMs": first.ttft_ms, "secondTtftMs": second.ttft_ms,
            "firstCachedTokens": first.cached_tokens, "secondCachedTokens": second.cached_tokens}


# ---- exact response cache ------------------------------------------------------------------


def measure_response_cache(report: Report, sidecar: SidecarUnderTest, words: list[str]) -> None:
    section = "response cache (the same deterministic request twice)"
    progress("response cache: one request, twice")
    messages = [{"role": "user", "content": distinct_prompt(words, "response-cache", time.time())}]
    miss = sidecar.chat(messages, 64, response_cache=True)
    hit = sidecar.chat(messages, 64, response_cache=True)
    report.raw["responseCache"] = {
        "miss": {"ttftMs": miss.ttft_ms, "totalMs": miss.total_ms, "cached": miss.from_response_cache},
        "hit": {"ttftMs": hit.ttft_ms, "totalMs": hit.total_ms, "cached": hit.from_response_cache},
        "sameText": miss.text == hit.text}
    report.add(section, "first request: TTFT / total", format_pair(miss.ttft_ms, miss.total_ms, "ms"))
    report.add(section, "second request: TTFT / total", format_pair(hit.ttft_ms, hit.total_ms, "ms"))
    report.add(section, "second request answered with cached: true", hit.from_response_cache is True,
               target="yes", passed=hit.from_response_cache is True)
    report.add(section, "same text both times", miss.text == hit.text, target="yes",
               passed=miss.text == hit.text)


# ---- cold start ----------------------------------------------------------------------------


def measure_cold_start(report: Report, base_env: dict[str, str], scale: Scale,
                       children: Children, logs: Logs) -> None:
    section = "cold start (spawn -> initialize answered)"
    times: dict[str, list[float]] = {"auto": [], "bundled": []}
    reported: dict[str, str] = {}
    log = logs.open("sidecar-cold-start")
    for run in range(scale.cold_starts):
        for blas in ("auto", "bundled") if run % 2 == 0 else ("bundled", "auto"):
            started = time.perf_counter()
            sidecar = SidecarUnderTest({**base_env, "LOCALMLX_BLAS": blas}, children, log)
            times[blas].append((time.perf_counter() - started) * 1000)
            reported[blas] = sidecar.blas
            sidecar.close()
        progress(f"cold start run {run}: auto {times['auto'][-1]:.0f} ms, "
                 f"bundled {times['bundled'][-1]:.0f} ms")
    report.raw["coldStartMs"] = times
    for blas, values in times.items():
        report.add_below(section, f"LOCALMLX_BLAS={blas} (reports {reported[blas]}), median",
                         median_or_none(values), 300, "ms")


# ---- a reader that stalls ------------------------------------------------------------------


def resident_kib(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in KiB from /proc; (RSS from `ps`, None) where there is no /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True,
                                 text=True, timeout=5).stdout.strip()
            return (int(out) if out else None), None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None, None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def kib(name: str) -> int | None:
        value = fields.get(name, "").split()
        return int(value[0]) if value else None

    return kib("VmRSS"), kib("VmHWM")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss, _ = resident_kib(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stopped.wait(self.every)

    def latest(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def peak_between(self, start: float, end: float) -> int | None:
        inside = [rss for at, rss in self.samples if start <= at <= end]
        return max(inside) if inside else None


class PausableReader(threading.Thread):
    """Reads a sidecar's stdout on a raw pipe, unless paused; keeps every message in order."""

    def __init__(self, stdout) -> None:
        super().__init__(daemon=True, name="pausable-reader")
        self.stdout = stdout
        self.reading = threading.Event()
        self.reading.set()
        self.messages: list[dict[str, Any]] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        framer = LineFramer(1 << 30)
        fd = self.stdout.fileno()
        while True:
            self.reading.wait()
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            lines = [line for line in framer.feed(data) if not isinstance(line, OversizedLine)]
            with self.changed:
                self.messages.extend(json.loads(line) for line in lines if line.strip())
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for_responses(self, ids: set[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not ids <= {m.get("id") for m in self.messages if "method" not in m}:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    def response(self, request_id: int) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get("id") == request_id and "method" not in m),
                    None)


def measure_stalled_reader(report: Report, base_env: dict[str, str], model: str, scale: Scale,
                           words: list[str], children: Children, logs: Logs) -> None:
    section = f"stalled reader ({scale.stall_streams} streams, stdout unread for {scale.stall_seconds:g} s)"
    log = logs.open("sidecar-stalled-reader")
    # Without the prefix cache: the KV it keeps for later requests (bounded by its own
    # settings) would show up here as growth, and it is not what a stalled reader costs.
    env = {**os.environ, **sidecar_env({**base_env, "LOCALMLX_PREFIX_CACHE": "false"})}
    process = children.spawn(sidecar_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=log, env=env)
    reader, sampler = PausableReader(process.stdout), RssSampler(process.pid)
    reader.start()
    sampler.start()
    try:
        outcome = stall_while_streaming(process, reader, sampler, model, scale, words)
    finally:
        sampler.stopped.set()
        with contextlib.suppress(OSError):
            process.stdin.close()  # EOF ends the sidecar
        children.stop(process, grace=10.0)
    report.raw["stalledReader"] = outcome
    growth = None if outcome["growthKib"] is None else outcome["growthKib"] / 1024
    report.add(section, "RSS when the stall began", kib_to_mib(outcome["rssAtStallKib"]), "MiB")
    report.add(section, "highest RSS during the stall", kib_to_mib(outcome["peakDuringStallKib"]), "MiB")
    report.add_below(section, "RSS growth during the stall", growth, 64, "MiB")
    report.add(section, "VmHWM (process lifetime peak)", kib_to_mib(outcome["vmHwmKib"]), "MiB")
    complete = outcome["completeStreams"]
    report.add(section, "streams complete after reading resumed",
               f"{complete} of {scale.stall_streams}", target="all",
               passed=complete == scale.stall_streams)


def kib_to_mib(value: int | None) -> float | None:
    return None if value is None else value / 1024


def stall_while_streaming(process: subprocess.Popen, reader: PausableReader,
                          sampler: RssSampler, model: str, scale: Scale,
                          words: list[str]) -> dict[str, Any]:
    """A first pass of the same streams, read normally, lets the sidecar reach the memory
    that this workload needs (KV caches, MLX's buffer cache); the second pass stalls."""
    def send(message: dict[str, Any]) -> None:
        process.stdin.write(encode_message(message))
        process.stdin.flush()

    send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
          "params": {"protocolVersion": 1, "clientInfo": {"name": "localmlx-bench"}}})
    send({"jsonrpc": "2.0", "id": 2, "method": "models/load", "params": {"model": model}})
    if not reader.wait_for_responses({1, 2}, REQUEST_TIMEOUT_S):
        raise RuntimeError("the stalled-reader sidecar did not initialize and load")
    capabilities = (reader.response(1).get("result") or {}).get("capabilities") or {}

    def start_streams(first_id: int) -> list[int]:
        ids = list(range(first_id, first_id + scale.stall_streams))
        for request_id in ids:
            params = {"model": model, "temperature": 0, "stream": True,
                      "maxTokens": scale.stall_max_tokens,
                      "messages": [{"role": "user",
                                    "content": distinct_prompt(words, "stall", request_id)}]}
            if capabilities.get("responseCache") is True:
                params["cache"] = False
            send({"jsonrpc": "2.0", "id": request_id, "method": "chat", "params": params})
        return ids

    progress(f"stalled reader: {scale.stall_streams} streams of {scale.stall_max_tokens} "
             "tokens, read normally")
    reader.wait_for_responses(set(start_streams(100)), REQUEST_TIMEOUT_S)
    progress("stalled reader: the same again, with stdout unread for "
             f"{scale.stall_seconds:g} s after 1.5 s")
    rss_before_streams = sampler.latest()
    stream_ids = start_streams(200)
    time.sleep(1.5)  # streams in full swing, read normally
    stall_began = time.monotonic()
    rss_at_stall = sampler.latest()
    reader.reading.clear()
    time.sleep(scale.stall_seconds)
    stall_ended = time.monotonic()
    reader.reading.set()
    finished = reader.wait_for_responses(set(stream_ids), REQUEST_TIMEOUT_S)
    peak = sampler.peak_between(stall_began, stall_ended)
    checks = {request_id: stream_is_complete(reader.messages, request_id, scale.stall_max_tokens)
              for request_id in stream_ids}
    return {"rssBeforeStreamsKib": rss_before_streams, "rssAtStallKib": rss_at_stall,
            "peakDuringStallKib": peak,
            "growthKib": None if peak is None or rss_at_stall is None else peak - rss_at_stall,
            "vmHwmKib": resident_kib(process.pid)[1], "allResponded": finished,
            "streams": checks, "completeStreams": sum(c["complete"] for c in checks.values())}


def stream_is_complete(messages: list[dict[str, Any]], request_id: int,
                       max_tokens: int) -> dict[str, Any]:
    """Seq contiguous from 0, no chunk after the response, a result of the full length."""
    seqs, response_at, chunk_after_response = [], None, False
    for index, message in enumerate(messages):
        if message.get("method") == "generate/chunk" and \
                (message.get("params") or {}).get("requestId") == request_id:
            seqs.append(message["params"].get("seq"))
            chunk_after_response |= response_at is not None
        elif message.get("id") == request_id and "method" not in message:
            response_at = index
    result = messages[response_at].get("result") if response_at is not None else None
    usage = (result or {}).get("usage") or {}
    full_length = result is not None and (result.get("finishReason") == "stop"
                                          or usage.get("completionTokens") == max_tokens)
    contiguous = seqs == list(range(len(seqs))) and len(seqs) > 0
    return {"chunks": len(seqs), "contiguous": contiguous, "result": result is not None,
            "fullLength": full_length, "chunkAfterResponse": chunk_after_response,
            "complete": contiguous and full_length and not chunk_after_response}


# ---- the run -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer repeats")
    parser.add_argument("--distributed", action="store_true",
                        help="the sharded benchmark instead (scripts/bench_distributed.py; its own flags)")
    parser.add_argument("--speculative", action="store_true",
                        help="the speculative-decoding benchmark instead (scripts/bench_speculative.py; its own flags)")
    parser.add_argument("--finetune", action="store_true",
                        help="the fine-tuning and adapter benchmark instead (scripts/bench_finetune.py; its own flags)")
    parser.add_argument("--vision", action="store_true",
                        help="images: the sidecar vs in-process mlx-vlm, and cold start with mlx-vlm installed, "
                             "instead (scripts/bench_vision.py; its own flags)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="write every figure and the raw numbers here")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"where the benchmark model is built and kept [{DEFAULT_MODELS_DIR}]")
    parser.add_argument("--quantize", type=int, choices=(4, 8), metavar="BITS",
                        help="bench a BITS-bit conversion of the model instead (mlx_lm convert)")
    parser.add_argument("--concurrency", help="comma-separated stream counts [1,4,8,16]")
    parser.add_argument("--seconds", type=float, help="closed-loop duration per level, server and round")
    parser.add_argument("--rounds", type=int, help="throughput rounds, the servers' order rotated [3; quick: 1]")
    parser.add_argument("--vllm-mlx", action="store_true",
                        help="vllm-mlx as a third server in the throughput section (installed on first "
                             "use into MODELS_DIR/vllm-mlx-env, several GB)")
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every sidecar (repeatable)")
    parser.add_argument("--log-dir", type=Path, help="where server logs go [a new temp dir]")
    parser.add_argument("--reference-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def scale_from(args: argparse.Namespace) -> Scale:
    scale = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.concurrency:
        changes["concurrencies"] = tuple(int(n) for n in args.concurrency.split(","))
    if args.seconds:
        changes["loop_seconds"] = args.seconds
    if args.rounds:
        changes["throughput_rounds"] = args.rounds
    return Scale(**{**asdict(scale), **changes})


def run_sections(args: argparse.Namespace, report: Report, children: Children, logs: Logs) -> None:
    sections = set(args.only.split(","))
    scale = scale_from(args)
    words = corpus_words()
    model_dir = prepare_model(args.models_dir.expanduser(), args.quantize, children, logs)
    base_env = {"LOCALMLX_MODELS_DIR": str(model_dir.parent), "LOCALMLX_LOG_LEVEL": "INFO",
                **dict(kv.split("=", 1) for kv in args.sidecar_env)}
    blas_library = optimized_blas_library()
    report.context.update({
        "model": describe_model(model_dir),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load average": f"{load_average()} (at start)",
        "mlx_lm side": f"mlx_lm.server and the in-process reference, BLAS "
                       f"{blas_library or 'as installed (none to preload)'}",
        "scale": "quick" if args.quick else "full"})
    report.raw["scale"] = asdict(scale)
    vllm_mlx_env = None
    if args.vllm_mlx and sections & {"throughput", "mixed-prompts"}:
        vllm_mlx_env = args.models_dir.expanduser() / "vllm-mlx-env"
        version = ensure_vllm_mlx(vllm_mlx_env, children, logs)
        report.context["vllm-mlx"] = f"{version} (continuous batching), BLAS as mlx_lm.server's, in {vllm_mlx_env}"

    if sections & {"single-stream", "transport", "throughput", "mixed-prompts", "prefix-cache", "response-cache"}:
        progress("starting the sidecar")
        sidecar = SidecarUnderTest(base_env, children, logs.open("sidecar"))
        try:
            sidecar.load(model_dir.name)
            report.context["sidecar"] = (f"BLAS {sidecar.blas}, response-cache flag "
                                         f"{'sent' if sidecar.sends_cache_flag else 'not supported'}")
            report.raw["sidecarInfo"] = sidecar.info
            run_sidecar_sections(report, sidecar, sections, scale, words, model_dir, base_env,
                                 blas_library, children, logs, vllm_mlx_env)
        finally:
            sidecar.close()
    if "cold-start" in sections:
        measure_cold_start(report, base_env, scale, children, logs)
    if "stalled-reader" in sections:
        measure_stalled_reader(report, base_env, model_dir.name, scale, words, children, logs)
    report.context["load average"] += f", {load_average()} (at end)"


def run_sidecar_sections(report: Report, sidecar: SidecarUnderTest, sections: set[str],
                         scale: Scale, words: list[str], model_dir: Path,
                         base_env: dict[str, str], blas_library: str | None,
                         children: Children, logs: Logs, vllm_mlx_env: Path | None = None) -> None:
    if "single-stream" in sections:
        progress("starting the in-process reference worker")
        worker = ReferenceWorker(model_dir, blas_library, children, logs.open("reference-worker"))
        try:
            measure_single_stream(report, sidecar, worker, scale)
        finally:
            worker.close()
    if "transport" in sections:
        measure_transport(report, sidecar, base_env, model_dir.name, scale, children, logs)
    if sections & {"throughput", "mixed-prompts"}:
        progress("starting mlx_lm.server" + (" and vllm-mlx" if vllm_mlx_env else ""))
        servers: list[MlxLmServer] = []
        home = Path(tempfile.mkdtemp(prefix="localmlx-bench-vllm-mlx-home-"))
        try:
            servers.append(MlxLmServer(model_dir, blas_library, children, logs.open("mlx_lm-server")))
            if vllm_mlx_env is not None:
                servers.append(VllmMlxServer(vllm_mlx_env, model_dir, blas_library, children,
                                             logs.open("vllm-mlx"), home))
            if "throughput" in sections:
                measure_throughput(report, sidecar, servers, scale, words)
            if "mixed-prompts" in sections:
                measure_mixed_prompts(report, sidecar, servers, scale, words)
        finally:
            for server in servers:
                children.stop(server.process)
            shutil.rmtree(home, ignore_errors=True)
    if "prefix-cache" in sections:
        progress("starting a sidecar without the prefix cache")
        without = SidecarUnderTest({**base_env, "LOCALMLX_PREFIX_CACHE": "false",
                                    "LOCALMLX_ENABLE_CACHE": "false"},
                                   children, logs.open("sidecar-no-prefix-cache"))
        try:
            without.load(model_dir.name)
            measure_prefix_cache(report, sidecar, without, scale, words,
                                 model_dir / "tokenizer.json")
        finally:
            without.close()
    if "response-cache" in sections:
        measure_response_cache(report, sidecar, words)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace, Report, Children, Logs], None],
                   name: str) -> int:
    """A benchmark's `run`, then, whatever happened, every process it started stopped and the
    figures measured so far printed (and written, with --json); 0 when every target is met."""
    interrupt_on_sigint_and_sigterm()
    report, children = Report(), Children()
    logs = Logs(args.log_dir or Path(tempfile.mkdtemp(prefix=f"localmlx-{name}-logs-")))
    progress(f"server logs in {logs.directory}")
    try:
        run(args, report, children, logs)
    except KeyboardInterrupt:
        progress("interrupted: stopping everything started")
        return 130
    finally:
        children.stop_all()
        logs.close()
        if report.figures:
            print_table(report)
        if args.json and report.figures:
            write_json(report, args.json)
    return 0 if all(f.passed is not False for f in report.figures) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_worker:
        return serve_reference(args.reference_worker)
    return run_and_report(args, run_sections, "bench")


if __name__ == "__main__":
    for flag, name in (("--distributed", "bench_distributed.py"), ("--speculative", "bench_speculative.py"),
                       ("--finetune", "bench_finetune.py"), ("--vision", "bench_vision.py")):
        if flag in sys.argv[1:]:  # one model over several hosts / one stream, speculating: its own script
            script = str(Path(__file__).with_name(name))
            os.execv(sys.executable, [sys.executable, script, *(a for a in sys.argv[1:] if a != flag)])
    sys.exit(main())

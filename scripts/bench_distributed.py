#!/usr/bin/env python3
"""One model over several hosts: the sharded anchor (`mlx_lm.server`) and the targets beside it.

Hosts are simulated on this machine with network namespaces (`tests/netns.py`): rank 0 runs in
the root namespace (host 0, the bridge's address), rank r inside namespace r. Needs root.

The model is `tests/distributed_models.build_bench_model`: a ~57M-parameter fp32 qwen2 built
offline and deterministically (hidden 768, 8 layers, small vocabulary), which shards both ways.

Targets. A target is started by a function `start(setup) -> Target` given the group (`Setup`:
the simulated hosts, the `mlx.launch` hostfile, the launcher template, the mode, the model) and
is driven through the same four calls (`chat`, `rank_pids`, `health`, `close`), so every figure
means the same thing for each target:

- `mlx_lm.server`, the anchor: `python -m mlx_lm server` once per rank, each started with
  MLX_RANK and MLX_HOSTFILE (a file holding the ring's JSON list of "ip:port" per rank, as
  `mlx.launch` writes it) and the ring backend; rank 0 in the root namespace serves HTTP on
  loopback, rank r runs inside namespace r. `--pipeline` selects pipeline mode, else a group
  larger than one is tensor parallel (mlx_lm/server.py's ModelProvider). OpenBLAS is preloaded
  into every rank (LD_PRELOAD) where installed, as scripts/bench.py does.
- Every rank of every target gets OPENBLAS_NUM_THREADS = cores / ranks (`--blas-threads`): the
  simulated hosts share this machine's cores, and oversubscribing them costs more than sharding
  gains.
- `sidecar`: `python -m sidecar` spawned normally (rank 0), configured by LOCALMLX_HOSTFILE,
  LOCALMLX_DISTRIBUTED_MODE, LOCALMLX_DISTRIBUTED_BACKEND=ring and LOCALMLX_DISTRIBUTED_LAUNCHER
  (`ip netns exec <ns>{rank}`); it starts the other ranks itself through the launcher.

Figures, per target, mode and group size (1 rank: a plain single process):
- throughput: a closed loop at 1, 4 and 8 streams (scripts/bench.py's `run_closed_loop`:
  distinct prompts, greedy, streamed); aggregate tokens/s and client-side TTFT p50. Ratios:
  2 ranks / 1 rank per target, and sidecar / mlx_lm.server at the same configuration.
- CPU per token: utime + stime of every rank over each loop / its completion tokens, with the
  cores the ranks kept busy together (the ranks share this machine's cores).
- idle CPU of every rank: utime + stime from /proc/<pid>/stat over 10 s with nothing running,
  as % of one core.
- faults (fresh group each): a long stream runs; at its first text rank 1 gets SIGSTOP, or
  SIGKILL, or its host's link goes down (`link_down`: no carrier, packets dropped). Watched for the fault window: whether and how the stream ends, what /health (or
  `ping`) answers, rank 0's CPU, whether rank 0 lives, and whether a new short request is
  answered afterwards.

    sudo .venv/bin/python scripts/bench_distributed.py [--quick] [--targets mlx_lm.server,sidecar]
        [--modes tensor,pipeline] [--ranks 2] [--delays 0,1] [--faults stop,kill,link|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench import (
    Children,
    Completion,
    Logs,
    LoopResult,
    corpus_words,
    cpu_seconds,
    distinct_prompt,
    interrupt_on_sigint_and_sigterm,
    load_average,
    optimized_blas_library,
    percentile,
    progress,
    read_event_stream,
    run_closed_loop,
    warm_up_at,
    with_cpu_seconds,
    with_preloaded,
)

from tests.distributed_models import build_bench_model, parameter_count
from tests.netns import SimulatedHosts, available

DEFAULT_MODELS_DIR = Path("~/.cache/localmlx/bench").expanduser()
REQUEST_TIMEOUT_S = 600.0
HEALTH_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Scale:
    concurrencies: tuple[int, ...] = (1, 4, 8)
    loop_seconds: float = 15.0  # per concurrency level, target and configuration
    token_mix: tuple[int, ...] = (64, 96, 128, 160)
    idle_seconds: float = 10.0
    fault_window: float = 15.0  # how long a fault is watched
    fault_max_tokens: int = 4000  # the stream the fault interrupts would run far longer


FULL = Scale()
QUICK = Scale(loop_seconds=6.0, token_mix=(32, 48, 64), fault_window=12.0)


# ---- a target: what every figure is measured through -------------------------------------------


@dataclass
class Setup:
    """One configuration: `hosts` None (and hostfile, launcher, mode None) means one rank."""

    model_dir: Path
    hosts: SimulatedHosts | None
    hostfile: Path | None
    launcher: str | None
    mode: str | None
    blas_library: str | None
    children: Children
    logs: Logs
    blas_threads: int | None = None  # OPENBLAS_NUM_THREADS of every rank (None: OpenBLAS's default)

    @property
    def ranks(self) -> int:
        return 1 if self.hosts is None else self.hosts.n

    @property
    def label(self) -> str:
        if self.hosts is None:
            return "1 rank"
        delay = f" +{self.hosts.delay_ms:g}ms" if self.hosts.delay_ms else ""
        return f"{self.mode} {self.ranks} ranks{delay}"

    def rank_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with this configuration's BLAS threads (every rank, every target)."""
        return env if self.blas_threads is None else {**env, "OPENBLAS_NUM_THREADS": str(self.blas_threads)}


OnText = Callable[[str], None]


class Target(Protocol):
    def chat(self, messages: list[dict[str, str]], max_tokens: int, on_text: OnText | None = None,
             timeout: float = REQUEST_TIMEOUT_S) -> Completion:
        """One greedy streamed chat (`on_text` gets each piece of text as it is read); raises
        on an error; a stream that closes without a proper end has `finish_reason` None."""

    def rank_pids(self) -> list[int]:
        """Process ids, rank 0 first."""

    def health(self) -> str:
        """One short line: what a liveness probe answers (within HEALTH_TIMEOUT_S)."""

    def log_excerpt(self) -> str:
        """Rank 0's last lines that tell of an error (for the fault table)."""

    def close(self) -> None: ...


Starter = Callable[[Setup], Target]


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def error_lines(path: Path, count: int = 3) -> str:
    """The last distinct error lines of a log (exception summaries, lost connections)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    found: list[str] = []
    for line in (ln.strip() for ln in lines):
        telling = re.match(r"^[\w.]*(Error|Exception)\b.*:", line) or "lost" in line or "died" in line
        if telling and not line.startswith("raise ") and line[:160] not in found:
            found.append(line[:160])
    return " | ".join(found[-count:])


# ---- the anchor: mlx_lm.server, one process per rank ---------------------------------------------


class MlxLmServerGroup:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.port = free_port("127.0.0.1")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []
        env = setup.rank_env(with_preloaded(setup.blas_library, dict(os.environ)))
        if setup.hosts is not None:
            ring = setup.hosts.write_ring_hostfile(
                setup.logs.directory / f"ring-{self.port}.json", free_port(setup.hosts.address(0)))
            env["MLX_HOSTFILE"] = str(ring)
        argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(setup.model_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "WARNING"]
        if setup.mode == "pipeline":
            argv.append("--pipeline")
        for rank in range(setup.ranks):
            name = f"mlx_lm-server-{setup.label.replace(' ', '-')}-{self.port}-rank{rank}"
            log = setup.logs.open(name)
            self.log_paths.append(setup.logs.directory / f"{name}.log")
            rank_env = env if setup.hosts is None else {**env, "MLX_RANK": str(rank)}
            prefix = [] if setup.hosts is None else setup.hosts.exec_prefix(rank)
            self.processes.append(setup.children.spawn([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                                       stderr=log, env=rank_env))
        self._wait_until_healthy()

    def _wait_until_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rank, process in enumerate(self.processes):
                if process.poll() is not None:
                    raise RuntimeError(f"mlx_lm.server rank {rank} exited ({process.returncode}): "
                                       f"{error_lines(self.log_paths[rank])}")
            if self.health().startswith("200"):
                return
            time.sleep(0.2)
        raise TimeoutError("mlx_lm.server did not become healthy")

    def chat(self, messages: list[dict[str, str]], max_tokens: int, on_text: OnText | None = None,
             timeout: float = REQUEST_TIMEOUT_S) -> Completion:
        body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        sent_at = time.perf_counter()
        for attempt in range(4):  # its accept backlog is 5: retry resets, as the OpenAI SDKs do
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
            except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
                connection.close()
                if attempt == 3:
                    raise
                time.sleep(0.05)
                continue
            try:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
                return read_event_stream(response, sent_at, on_text, finish_needs_done=True)
            finally:
                connection.close()
        raise AssertionError("unreachable")

    def rank_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def health(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HEALTH_TIMEOUT_S)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            return f"{response.status} {response.read()[:60].decode(errors='replace')}"
        except TimeoutError:
            return f"no answer in {HEALTH_TIMEOUT_S:g} s"
        except OSError as exc:
            return f"{type(exc).__name__}"
        finally:
            connection.close()

    def log_excerpt(self) -> str:
        return error_lines(self.log_paths[0])

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped rank takes SIGTERM only once resumed
            self.setup.children.stop(process, grace=3.0)


def start_mlx_lm_server(setup: Setup) -> Target:
    return MlxLmServerGroup(setup)


# ---- the sidecar: rank 0 over stdio, the other ranks started through the launcher ----------------


class SidecarGroup:
    """Drives `python -m sidecar` as Wooster does (JSON-RPC over stdio). A draft for the
    distributed sidecar of issue 18: the settings are the issue's; the rank pids are looked up
    in the namespaces (the sidecar starts them)."""

    def __init__(self, setup: Setup) -> None:
        from sidecar.client import SidecarClient, sidecar_command

        self.setup = setup
        env = {"LOCALMLX_MODELS_DIR": str(setup.model_dir.parent), "LOCALMLX_LOG_LEVEL": "INFO"}
        if setup.hosts is not None:
            assert setup.hostfile is not None and setup.launcher is not None and setup.mode is not None
            env.update({"LOCALMLX_HOSTFILE": str(setup.hostfile), "LOCALMLX_DISTRIBUTED_MODE": setup.mode,
                        "LOCALMLX_DISTRIBUTED_BACKEND": "ring", "LOCALMLX_DISTRIBUTED_LAUNCHER": setup.launcher,
                        # rank r listens on port + r: only host 0's port space is shared with the machine
                        "LOCALMLX_DISTRIBUTED_PORT": str(free_port(setup.hosts.address(0)))})
        if os.environ.get("LD_PRELOAD"):
            env["LD_PRELOAD"] = ""  # the sidecar picks its BLAS itself
        env = setup.rank_env(env)  # its followers inherit it through the launcher
        name = f"sidecar-{setup.label.replace(' ', '-')}-{time.monotonic_ns()}"
        self.log_path = setup.logs.directory / f"{name}.log"
        self.client = SidecarClient(sidecar_command(), env=env, stderr=setup.logs.open(name).fileno())
        setup.children.track(self.client.process)
        self.client.initialize(name="localmlx-bench-distributed")
        self.model = setup.model_dir.name
        self.client.request("models/load", {"model": self.model}, timeout=REQUEST_TIMEOUT_S)

    def chat(self, messages: list[dict[str, str]], max_tokens: int, on_text: OnText | None = None,
             timeout: float = REQUEST_TIMEOUT_S) -> Completion:
        from sidecar.client import RpcCallError

        if self.client.process.poll() is not None:
            raise RuntimeError(f"the sidecar exited ({self.client.process.returncode})")
        params = {"model": self.model, "messages": messages, "maxTokens": max_tokens, "temperature": 0,
                  "cache": False}
        sent_at = time.perf_counter()
        times: list[float] = []
        texts: list[str] = []
        response: dict[str, Any] = {}
        for item in self.client.stream("chat", params, timeout=timeout):
            if "requestId" in item:  # a chunk
                if item.get("text"):
                    times.append(time.perf_counter())
                    texts.append(item["text"])
                    if on_text is not None:
                        on_text(item["text"])
            else:
                response = item
        if "error" in response:
            raise RpcCallError(response["error"])
        result = response.get("result") or {}
        return Completion(sent_at, times[0] if times else None, time.perf_counter(),
                          (result.get("usage") or {}).get("completionTokens", len(times)), times, "".join(texts),
                          finish_reason=result.get("finishReason"))

    def rank_pids(self) -> list[int]:
        pids = [self.client.process.pid]
        if self.setup.hosts is not None:
            for rank in range(1, self.setup.ranks):
                try:
                    pids.append(self.setup.hosts.rank_process(rank))
                except LookupError:
                    pids.append(-1)
        return pids

    def health(self) -> str:
        if self.client.process.poll() is not None:
            return f"exited ({self.client.process.returncode})"
        try:
            response = self.client.call("ping", timeout=HEALTH_TIMEOUT_S)
        except TimeoutError:
            return f"no answer in {HEALTH_TIMEOUT_S:g} s"
        except Exception as exc:
            return type(exc).__name__
        return "ok" if "result" in response else f"error {response.get('error', {}).get('code')}"

    def log_excerpt(self) -> str:
        return error_lines(self.log_path)

    def close(self) -> None:
        pids = self.rank_pids()[1:]
        try:
            self.client.close(timeout=5)
        except Exception:
            pass
        finally:
            self.setup.children.stop(self.client.process, grace=3.0)
            for pid in (p for p in pids if p > 0):  # a follower left behind must not leak
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def start_sidecar(setup: Setup) -> Target:
    return SidecarGroup(setup)


TARGETS: dict[str, Starter] = {"mlx_lm.server": start_mlx_lm_server, "sidecar": start_sidecar}


# ---- measurements --------------------------------------------------------------------------------


def cpu_percent_over(pids: list[int], seconds: float) -> list[float | None]:
    before = [cpu_seconds(pid) for pid in pids]
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    after = [cpu_seconds(pid) for pid in pids]
    return [None if a is None or b is None else 100 * (b - a) / elapsed for a, b in zip(before, after, strict=True)]


@dataclass
class FaultOutcome:
    fault: str
    stream: str  # how the interrupted stream ended, or that it did not
    tokens_after_fault: int
    health: list[str]  # "+Ns: answer"
    rank0_cpu_percent: float | None
    rank0_alive: bool
    new_request: str
    rank0_log: str


@dataclass
class Run:
    target: str
    label: str
    mode: str | None
    ranks: int
    loops: list[dict[str, Any]] = field(default_factory=list)
    idle_cpu_percent: list[float | None] = field(default_factory=list)
    faults: list[FaultOutcome] = field(default_factory=list)
    error: str | None = None
    load: str = ""  # the machine's load average when the run began (others share it)

    def tokens_per_second(self, concurrency: int) -> float | None:
        return next((loop["tokensPerSecond"] for loop in self.loops if loop["concurrency"] == concurrency), None)

    def ttft_p50(self, concurrency: int) -> float | None:
        return next((loop["ttftP50Ms"] for loop in self.loops if loop["concurrency"] == concurrency), None)

    def cpu_per_token(self, concurrency: int) -> str:
        loop = next((loop for loop in self.loops if loop["concurrency"] == concurrency), {})
        ms, cores = loop.get("cpuMsPerToken"), loop.get("coresBusy")
        return "n/a" if ms is None or cores is None else f"{ms:.1f} ({cores:.2f})"


def summary(result: LoopResult) -> dict[str, Any]:
    return {"concurrency": result.concurrency, "requests": result.requests, "tokens": result.tokens,
            "seconds": round(result.seconds, 2), "tokensPerSecond": round(result.tokens_per_second, 2),
            "ttftP50Ms": percentile(result.ttfts_ms, 0.5), "errors": result.errors[:3],
            "cpuMsPerToken": result.cpu_ms_per_token, "coresBusy": result.cores_busy}


def measure_load(target_name: str, start: Starter, setup: Setup, scale: Scale, words: list[str]) -> Run:
    """Throughput at each concurrency, then idle CPU of every rank."""
    run = Run(target_name, setup.label, setup.mode, setup.ranks, load=load_average())
    progress(f"{target_name}, {setup.label}: starting")
    try:
        target = start(setup)
    except Exception as exc:
        run.error = f"did not start: {type(exc).__name__}: {exc}"
        progress(run.error)
        return run
    try:
        def chat(messages: list[dict[str, str]], max_tokens: int) -> Completion:
            return target.chat(messages, max_tokens)

        for concurrency in scale.concurrencies:
            warm_up_at(chat, concurrency, words)
            result = with_cpu_seconds(target.rank_pids(), functools.partial(
                run_closed_loop, chat, concurrency, scale.loop_seconds, scale.token_mix, words,
                f"{target_name}-{setup.label}"))
            run.loops.append(summary(result))
            progress(f"  {concurrency} streams: {result.tokens_per_second:.1f} tok/s, TTFT p50 "
                     f"{percentile(result.ttfts_ms, 0.5) or 0:.0f} ms"
                     + (f", {len(result.errors)} errors: {result.errors[0]}" if result.errors else ""))
        progress(f"  idle CPU over {scale.idle_seconds:g} s")
        run.idle_cpu_percent = cpu_percent_over(target.rank_pids(), scale.idle_seconds)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        progress(f"  failed: {run.error}")
    finally:
        target.close()
    return run


def measure_fault(start: Starter, setup: Setup, fault: str, scale: Scale, words: list[str]) -> FaultOutcome:
    """A fresh group; a long stream; at its first text rank 1 gets SIGSTOP or SIGKILL, or its
    host's link goes down; then watch."""
    assert setup.hosts is not None
    hosts = setup.hosts
    target = start(setup)
    try:
        target.chat([{"role": "user", "content": "warm up"}], 8)
        pids = target.rank_pids()
        first_text = threading.Event()
        texts: list[float] = []
        ended: dict[str, Any] = {}

        def on_text(_: str) -> None:
            texts.append(time.monotonic())
            first_text.set()

        def stream() -> None:
            try:
                completion = target.chat([{"role": "user", "content": distinct_prompt(words, "fault", fault)}],
                                         scale.fault_max_tokens, on_text, timeout=scale.fault_window + 5)
                ended["how"] = (f"finish_reason={completion.finish_reason}" if completion.finish_reason
                                else "closed without a proper end (no [DONE] / no finish)")
            except Exception as exc:
                ended["how"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            ended["at"] = time.monotonic()

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        if not first_text.wait(120):
            raise RuntimeError("the stream produced no text")
        cpu_before, faulted_at = cpu_seconds(pids[0]), time.monotonic()
        tokens_at_fault = len(texts)
        if fault == "link":
            hosts.link_down(1)
        else:
            os.kill(pids[1], {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}[fault])
        health = []
        for probe_at in (2.0, scale.fault_window - HEALTH_TIMEOUT_S - 1):  # at fixed times after the fault
            time.sleep(max(0.0, faulted_at + probe_at - time.monotonic()))
            health.append(f"+{time.monotonic() - faulted_at:.0f}s: {target.health()}")
        thread.join(max(0.0, faulted_at + scale.fault_window - time.monotonic()))
        cpu_after, watched = cpu_seconds(pids[0]), time.monotonic() - faulted_at
        if "at" in ended:
            how = f"ended after {ended['at'] - faulted_at:.1f} s: {ended['how']}"
        else:
            how = f"still open after {watched:.0f} s"
        try:
            target.chat([{"role": "user", "content": "still there?"}], 8, timeout=5)
            new_request = "answered"
        except Exception as exc:
            new_request = f"{type(exc).__name__}: {str(exc)[:80] or 'no answer in 5 s'}"
        return FaultOutcome(
            fault, how, len([t for t in texts[tokens_at_fault:] if t > faulted_at]), health,
            None if cpu_before is None or cpu_after is None else 100 * (cpu_after - cpu_before) / watched,
            cpu_seconds(pids[0]) is not None and not _is_zombie(pids[0]), new_request, target.log_excerpt())
    finally:
        if fault == "link":
            hosts.link_up(1)
        target.close()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


# ---- the table -----------------------------------------------------------------------------------


FAULT_NAMES = {"stop": "SIGSTOP of rank 1", "kill": "SIGKILL of rank 1", "link": "rank 1's link down"}


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def print_report(runs: list[Run], faults: dict[tuple[str, str], list[FaultOutcome]], context: dict[str, str],
                 concurrencies: tuple[int, ...], out: Any = sys.stdout) -> None:
    for key, value in context.items():
        print(f"{key + ':':<14}{value}", file=out)
    width = max([len(f"{r.target} {r.label}") for r in runs] + [24])
    print("\nthroughput: aggregate tokens/s (TTFT p50 ms)", file=out)
    print(f"  {'':<{width}}" + "".join(f"{f'{c} stream' + ('s' if c > 1 else ''):>20}" for c in concurrencies)
          + "   load avg at start", file=out)
    for run in runs:
        cells = [f"{fmt(run.tokens_per_second(c))} ({fmt(run.ttft_p50(c), '.0f')})" for c in concurrencies]
        print(f"  {run.target + ' ' + run.label:<{width}}" + "".join(f"{cell:>20}" for cell in cells)
              + f"   {run.load}" + (f"   ERROR {run.error}" if run.error else ""), file=out)

    print("\nCPU ms per token, all ranks (cores busy)", file=out)
    for run in runs:
        cells = "".join(f"{run.cpu_per_token(c):>20}" for c in concurrencies)
        print(f"  {run.target + ' ' + run.label:<{width}}" + cells, file=out)

    print("\nratios (aggregate tokens/s)", file=out)
    by_key = {(r.target, r.label): r for r in runs}
    for run in runs:
        single = by_key.get((run.target, "1 rank"))
        if run.ranks > 1 and single is not None:
            cells = [ratio(run.tokens_per_second(c), single.tokens_per_second(c)) for c in concurrencies]
            print(f"  {run.target + ' ' + run.label + ' / 1 rank':<{width + 10}}"
                  + "".join(f"{cell:>10}" for cell in cells), file=out)
    for run in runs:
        anchor = by_key.get(("mlx_lm.server", run.label))
        if run.target != "mlx_lm.server" and anchor is not None:
            cells = [ratio(run.tokens_per_second(c), anchor.tokens_per_second(c)) for c in concurrencies]
            print(f"  {run.target + ' / mlx_lm.server ' + run.label:<{width + 10}}"
                  + "".join(f"{cell:>10}" for cell in cells) + "   (target >= 1.10x at 4, 8)", file=out)

    print("\nidle CPU over the idle window (% of one core; target < 2 % per rank)", file=out)
    for run in runs:
        cells = "  ".join(f"rank {i}: {fmt(v)}" for i, v in enumerate(run.idle_cpu_percent)) or "n/a"
        print(f"  {run.target + ' ' + run.label:<{width}}  {cells}", file=out)

    if faults:
        print("\nfaults during a stream (target: reported within 10 s)", file=out)
    for (target, label), outcomes in faults.items():
        for o in outcomes:
            print(f"  {target} {label}, {FAULT_NAMES.get(o.fault, o.fault)}:", file=out)
            print(f"    stream:       {o.stream} ({o.tokens_after_fault} text events after the fault)", file=out)
            print(f"    health:       {'; '.join(o.health)}", file=out)
            print(f"    rank 0:       {'alive' if o.rank0_alive else 'gone'}, CPU {fmt(o.rank0_cpu_percent)} % "
                  f"while watched", file=out)
            print(f"    new request:  {o.new_request}", file=out)
            if o.rank0_log:
                print(f"    rank 0 log:   {o.rank0_log}", file=out)


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter loops")
    parser.add_argument("--targets", default="mlx_lm.server", help=f"comma-separated, of {','.join(TARGETS)}")
    parser.add_argument("--modes", default="tensor,pipeline")
    parser.add_argument("--ranks", default="2", help="comma-separated group sizes besides 1 [2]")
    parser.add_argument("--faults", default="stop,kill,link", help="of stop,kill,link (rank 1's host loses its "
                        "link), or none")
    parser.add_argument("--fault-mode", default="tensor", help="the mode faults are injected in")
    parser.add_argument("--delays", default="0", help="comma-separated added one-way link delays in ms, "
                        "each a group of its own (tests/link_delay.py relays the frames) [0]")
    parser.add_argument("--no-single", action="store_true", help="skip the 1-rank configuration")
    parser.add_argument("--concurrency", help="comma-separated stream counts [1,4,8]")
    parser.add_argument("--seconds", type=float, help="closed-loop duration per level")
    parser.add_argument("--blas-threads", default="auto",
                        help="OPENBLAS_NUM_THREADS per rank: auto (cores / ranks), default (unset), or N")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def blas_threads(args: argparse.Namespace, ranks: int) -> int | None:
    """All ranks share this machine's cores: more BLAS threads than cores oversubscribe them (a
    2-rank tensor group on 2 cores ran 3x slower at 4 streams with 2 threads per rank than 1)."""
    if args.blas_threads == "default":
        return None
    if args.blas_threads == "auto":
        return max(1, (os.cpu_count() or 1) // ranks)
    return int(args.blas_threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = available()
    if not ok:
        print(f"bench_distributed: cannot simulate hosts: {why}", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    if args.concurrency:
        scale = Scale(**{**asdict(scale), "concurrencies": tuple(int(c) for c in args.concurrency.split(","))})
    if args.seconds:
        scale = Scale(**{**asdict(scale), "loop_seconds": args.seconds})
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"unknown targets {unknown}; known: {list(TARGETS)}", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(n) for n in args.ranks.split(",") if n]
    fault_kinds = [] if args.faults == "none" else [f for f in args.faults.split(",") if f]
    delays = [float(d) for d in args.delays.split(",") if d]

    interrupt_on_sigint_and_sigterm()
    children = Children()
    logs = Logs(args.log_dir or Path(tempfile.mkdtemp(prefix="localmlx-bench-distributed-")))
    progress(f"logs in {logs.directory}")
    words = corpus_words()
    runs: list[Run] = []
    faults: dict[tuple[str, str], list[FaultOutcome]] = {}
    blas = optimized_blas_library()
    model_dir = build_bench_model(args.models_dir.expanduser())
    config = json.loads((model_dir / "config.json").read_text())
    context = {
        "model": f"{model_dir.name}: qwen2, {parameter_count(model_dir) / 1e6:.1f}M, hidden {config['hidden_size']}, "
                 f"{config['num_hidden_layers']} layers, fp32",
        "machine": f"{os.cpu_count()} cores, load {load_average()} at start",
        "blas": f"mlx_lm.server ranks: {blas or 'bundled (no OpenBLAS to preload)'}; sidecar: its own choice; "
                f"threads per rank: {args.blas_threads}"
                + (f" (cores / ranks: {os.cpu_count()} cores shared by the ranks)" if args.blas_threads == "auto" else ""),
        "hosts": "network namespaces on one bridge (tests/netns.py), ring backend; link delay (one way, "
                 f"each link): {', '.join(f'{d:g} ms' for d in delays)}"
                 + (" (a userspace relay of TAP frames, tests/link_delay.py)" if any(delays) else ""),
        "scale": f"{'quick' if args.quick else 'full'}: {scale.loop_seconds:g} s per level",
    }
    try:
        if not args.no_single:
            single = Setup(model_dir, None, None, None, None, blas, children, logs, blas_threads(args, 1))
            for name in targets:
                runs.append(measure_load(name, TARGETS[name], single, scale, words))
        for n, delay in ((n, delay) for n in sizes for delay in delays):
            with SimulatedHosts(n, delay_ms=delay) as hosts:
                hostfile = hosts.write_hostfile(logs.directory / f"hosts-{n}-{delay:g}ms.json")
                for mode in modes:
                    setup = Setup(model_dir, hosts, hostfile, hosts.launcher(), mode, blas, children, logs,
                                  blas_threads(args, n))
                    for name in targets:
                        runs.append(measure_load(name, TARGETS[name], setup, scale, words))
                        if mode == args.fault_mode and fault_kinds and delay == delays[0]:
                            outcomes = faults.setdefault((name, setup.label), [])
                            for kind in fault_kinds:
                                progress(f"{name}, {setup.label}: fault {kind}")
                                try:
                                    outcomes.append(measure_fault(TARGETS[name], setup, kind, scale, words))
                                except Exception as exc:
                                    outcomes.append(FaultOutcome(kind, f"not measured: {type(exc).__name__}: "
                                                                       f"{exc}", 0, [], None, False, "", ""))
    except KeyboardInterrupt:
        progress("interrupted: stopping everything started")
        return 130
    finally:
        children.stop_all()
        logs.close()
        context["machine"] += f", {load_average()} at end"
        if runs:
            print_report(runs, faults, context, scale.concurrencies)
        if args.json and runs:
            args.json.write_text(json.dumps({"context": context, "runs": [asdict(r) for r in runs],
                                             "faults": {f"{t} {label}": [asdict(o) for o in outcomes]
                                                        for (t, label), outcomes in faults.items()}},
                                            indent=2, default=str) + "\n")
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

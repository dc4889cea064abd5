/** Start-up failures, junk on stdout, close (graceful and forced), crashes, restarts, orphans. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { describe, test } from "node:test";
import { performance } from "node:perf_hooks";
import {
  ClientClosedError,
  ErrorCode,
  LocalMLX,
  ProtocolVersionError,
  RpcError,
  SidecarCrashError,
  SidecarStartError,
  SidecarUnavailableError,
  type LocalMLXEvents,
  type RestartInfo,
} from "../src/index";
import { fixtures, messages, modelsDir, packageRoot, processGone, python, sleep, startClient, waitFor } from "./helpers";

const T = { timeout: 60_000 };

/** Records when (performance.now()) and how a promise settled; `at` stays undefined while it is pending. */
function settled(promise: Promise<unknown>): Promise<{ at?: number; error?: unknown }> & { at?: number } {
  const state: { at?: number; error?: unknown } = {};
  const done = promise.then(
    () => {
      state.at = performance.now();
      return state;
    },
    (error: unknown) => {
      state.at = performance.now();
      state.error = error;
      return state;
    },
  );
  return Object.defineProperty(done, "at", { get: () => state.at });
}

/** Kills the sidecar with SIGKILL and waits until the client has seen it die. */
async function crash(mlx: LocalMLX): Promise<void> {
  const crashed = new Promise((resolve) => mlx.once("crash", resolve));
  // An idle sidecar does not hold the event loop open (keepAlive: false): this timer does.
  const holdLoopOpen = setInterval(() => undefined, 1_000);
  process.kill(mlx.pid!, "SIGKILL");
  await crashed;
  clearInterval(holdLoopOpen);
}

describe("start-up", () => {
  test("a Python that does not exist: SidecarStartError naming it", T, async () => {
    await assert.rejects(LocalMLX.start({ python: "/nonexistent/python3" }), (error: unknown) => {
      assert.ok(error instanceof SidecarStartError);
      assert.match(error.message, /\/nonexistent\/python3.*ENOENT/);
      return true;
    });
  });

  test("a sidecar that dies at start-up: SidecarStartError with exit code and stderr tail", T, async () => {
    const args = ["-c", "import sys; sys.stderr.write('Traceback: no module named sidecar\\n'); sys.exit(3)"];
    await assert.rejects(LocalMLX.start({ python, args }), (error: unknown) => {
      assert.ok(error instanceof SidecarStartError);
      assert.equal(error.details.exit?.code, 3);
      assert.match(error.stderrTail, /no module named sidecar/);
      assert.match(error.message, /exited with code 3/);
      return true;
    });
  });

  test("another protocol version: ProtocolVersionError", T, async () => {
    await assert.rejects(
      LocalMLX.start({ python, args: [join(fixtures, "wrong_version.py")] }),
      (error: unknown) => error instanceof ProtocolVersionError && /version 99/.test(error.message),
    );
  });

  test("junk on stdout is skipped and reported; streams still work", T, async () => {
    const warnings: LocalMLXEvents["warning"][0][] = [];
    const mlx = await LocalMLX.start({
      python,
      args: [join(fixtures, "junk_proxy.py")],
      env: { LOCALMLX_MODELS_DIR: modelsDir },
    });
    mlx.on("warning", (warning) => warnings.push(warning));
    try {
      const prediction = mlx.chat({ messages, maxTokens: 40, temperature: 0 });
      const seqs: number[] = [];
      for await (const chunk of prediction) seqs.push(chunk.seq);
      const result = await prediction.result;
      assert.equal(result.usage.completionTokens, 40);
      assert.deepEqual(seqs, [...seqs.keys()]);
      assert.ok(warnings.length >= 3, `${warnings.length} warnings`);
      assert.ok(warnings.every((w) => w.kind === "junk"));
      assert.deepEqual(
        (await mlx.status()).models.map((m) => m.model),
        ["demo"],
      );
    } finally {
      await mlx.close();
    }
  });
});

describe("close", () => {
  test("graceful: shutdown, exit code 0, idempotent; later calls fail with ClientClosedError", T, async () => {
    const lines: string[] = [];
    const mlx = await startClient({ logger: { info: (line) => lines.push(line) } });
    const pid = mlx.pid!;
    const exits: LocalMLXEvents["exit"][0][] = [];
    mlx.on("exit", (info) => exits.push(info));
    const closing = mlx.close();
    assert.equal(mlx.close(), closing, "close() twice is the same close");
    const result = await closing;
    assert.deepEqual(result, { stage: "shutdown", code: 0, signal: null, exited: true });
    assert.ok(processGone(pid));
    assert.equal(exits.length, 1);
    assert.equal(exits[0]!.expected, true);
    assert.ok(lines.some((line) => /localmlx: .*serving/.test(line)), "stderr lines reach the logger");
    await assert.rejects(mlx.status(), ClientClosedError);
    await assert.rejects(mlx.chat({ messages }).result, ClientClosedError);
  });

  test("a generation in flight ends when the client closes", T, async () => {
    const mlx = await startClient();
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0 });
    for await (const _chunk of prediction) break;
    const running = mlx.chat({ messages, maxTokens: 2000, temperature: 0 });
    await new Promise((resolve) => setTimeout(resolve, 100));
    const result = await mlx.close();
    assert.equal(result.stage, "shutdown");
    await assert.rejects(running.result, (error: unknown) => {
      // the sidecar cancels it on shutdown (-32802); had it not answered, ClientClosedError
      return (error instanceof RpcError && error.code === ErrorCode.ServerCancelled) || error instanceof ClientClosedError;
    });
  });

  test("a consumer that stopped reading does not hold up close()", T, async () => {
    const mlx = await startClient({ highWaterMark: 2 });
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0 });
    const iterator = prediction[Symbol.asyncIterator]();
    await iterator.next(); // then stop pulling: the unread chunks wait in the prediction, joined
    await sleep(300);
    const started = Date.now();
    const result = await mlx.close();
    assert.equal(result.stage, "shutdown");
    assert.ok(Date.now() - started < 3_000, `close took ${Date.now() - started} ms`);
    await assert.rejects(prediction.result);
  });

  test("forced: a sidecar that does not answer is SIGTERMed, then SIGKILLed", T, async () => {
    const mlx = await startClient({ model: undefined });
    const pid = mlx.pid!;
    process.kill(pid, "SIGSTOP"); // deaf to shutdown, EOF and SIGTERM alike
    const started = Date.now();
    const result = await mlx.close({ gracefulMs: 300, terminateMs: 300, killMs: 5_000 });
    assert.equal(result.stage, "SIGKILL");
    assert.equal(result.signal, "SIGKILL");
    assert.ok(Date.now() - started < 3_000);
    assert.ok(processGone(pid));
  });
});

describe("crashes", () => {
  test("kill -9 mid-stream: every pending call rejects within 100 ms; the next call restarts (after the backoff) and reloads", T, async (t) => {
    const initialDelayMs = 500;
    const mlx = await startClient({ restart: { initialDelayMs } });
    const events: string[] = [];
    const restarts: RestartInfo[] = [];
    let crashedAt = 0;
    let respawnedAt = 0;
    mlx.on("exit", (info) => events.push(`exit:${info.signal}:${info.expected}`));
    mlx.on("crash", () => {
      crashedAt = Date.now();
      events.push("crash");
    });
    mlx.on("spawn", () => (respawnedAt = Date.now()));
    mlx.on("restart", (info) => {
      events.push("restart");
      restarts.push(info);
    });
    try {
      const firstPid = mlx.pid!;
      const stream = mlx.chat({ messages, maxTokens: 1500, temperature: 0 });
      const unstreamed = settled(mlx.request("chat", { model: "demo", messages, maxTokens: 1500, temperature: 0, stream: false }));
      const iterator = stream[Symbol.asyncIterator]();
      for (let i = 0; i < 3; i++) assert.equal((await iterator.next()).done, false, "the stream is running");
      const iterated = settled(
        (async () => {
          for (;;) if ((await iterator.next()).done) throw new Error("the stream ended before the kill");
        })(),
      );
      const result = settled(stream.result);
      assert.equal(unstreamed.at, undefined, "the unstreamed chat is still pending");

      const killedAt = performance.now();
      process.kill(firstPid, "SIGKILL");
      const outcomes = { iterator: await iterated, result: await result, unstreamed: await unstreamed };
      const latencies = Object.entries(outcomes).map(([name, outcome]) => `${name} ${(outcome.at! - killedAt).toFixed(1)} ms`);
      t.diagnostic(`rejected after the kill: ${latencies.join(", ")}`);
      for (const [name, outcome] of Object.entries(outcomes)) {
        const { error } = outcome;
        assert.ok(error instanceof SidecarCrashError, `${name}: got ${String(error)}`);
        assert.equal(error.signal, "SIGKILL");
        assert.equal(error.code, null);
        assert.equal(error.pid, firstPid);
        assert.match(error.stderrTail, /serving/);
        assert.ok(outcome.at! - killedAt < 100, `${name} rejected ${(outcome.at! - killedAt).toFixed(1)} ms after the kill`);
      }
      assert.deepEqual(events, ["exit:SIGKILL:false", "crash"]);
      assert.equal(mlx.pid, undefined, "no sidecar runs until the next call");

      const reply = await mlx.chat({ messages, maxTokens: 8, temperature: 0 }).result;
      assert.equal(reply.usage.completionTokens, 8);
      assert.ok(respawnedAt - crashedAt >= initialDelayMs, `restarted ${respawnedAt - crashedAt} ms after the crash`);
      assert.deepEqual(events, ["exit:SIGKILL:false", "crash", "restart"]);
      assert.notEqual(mlx.pid, undefined);
      assert.notEqual(mlx.pid, firstPid);
      assert.deepEqual(restarts, [{ pid: mlx.pid, start: 2, reloaded: ["demo"], failed: [] }]);
      assert.deepEqual(
        (await mlx.status()).models.map((m) => m.model),
        ["demo"],
      );
    } finally {
      await mlx.close();
    }
  });

  test("kill -9 while idle is noticed at once; the next call restarts, reloads and succeeds", T, async (t) => {
    const mlx = await startClient();
    const restarts: RestartInfo[] = [];
    mlx.on("restart", (info) => restarts.push(info));
    try {
      const firstPid = mlx.pid!;
      const noticed = new Promise<number>((resolve) => mlx.once("crash", () => resolve(performance.now())));
      const holdLoopOpen = setInterval(() => undefined, 1_000); // an idle sidecar does not (keepAlive: false)
      const killedAt = performance.now();
      process.kill(firstPid, "SIGKILL");
      const latency = (await noticed) - killedAt;
      clearInterval(holdLoopOpen);
      t.diagnostic(`crash noticed ${latency.toFixed(1)} ms after the kill`);
      assert.ok(latency < 100, `noticed ${latency.toFixed(1)} ms after the kill`);
      assert.equal(mlx.pid, undefined);

      const reply = await mlx.chat({ messages, maxTokens: 8, temperature: 0 }).result;
      assert.equal(reply.usage.completionTokens, 8);
      assert.notEqual(mlx.pid, undefined);
      assert.notEqual(mlx.pid, firstPid);
      assert.deepEqual(restarts, [{ pid: mlx.pid, start: 2, reloaded: ["demo"], failed: [] }]);
    } finally {
      await mlx.close();
    }
  });

  test("kill -9 while a child of the sidecar holds its stderr open: pending calls still reject within 100 ms", T, async (t) => {
    // Every child of the sidecar inherits its stderr; this one outlives it by 3 s.
    const mlx = await startClient({ args: [join(fixtures, "stderr_heir.py")] });
    try {
      const firstPid = mlx.pid!;
      const stream = mlx.chat({ messages, maxTokens: 1500, temperature: 0 });
      const iterator = stream[Symbol.asyncIterator]();
      assert.equal((await iterator.next()).done, false);
      const iterated = settled(
        (async () => {
          for (;;) if ((await iterator.next()).done) throw new Error("the stream ended before the kill");
        })(),
      );
      const result = settled(stream.result);
      const killedAt = performance.now();
      process.kill(firstPid, "SIGKILL");
      const outcomes = { iterator: await iterated, result: await result };
      const latencies = Object.entries(outcomes).map(([name, outcome]) => `${name} ${(outcome.at! - killedAt).toFixed(1)} ms`);
      t.diagnostic(`rejected after the kill: ${latencies.join(", ")}`);
      for (const [name, { error, at }] of Object.entries(outcomes)) {
        assert.ok(error instanceof SidecarCrashError, `${name}: got ${String(error)}`);
        assert.equal(error.signal, "SIGKILL");
        assert.ok(at! - killedAt < 100, `${name} rejected ${(at! - killedAt).toFixed(1)} ms after the kill`);
      }
      await mlx.ping();
      assert.notEqual(mlx.pid, firstPid);
    } finally {
      await mlx.close();
    }
  });

  test("a non-streaming call pending at the crash fails with SidecarCrashError too", T, async () => {
    const mlx = await startClient({ model: undefined });
    try {
      await mlx.models.unload("demo");
      const loading = mlx.models.load("demo");
      process.kill(mlx.pid!, "SIGKILL");
      // Written to a dead pipe (EPIPE) before the client has seen the exit: fails, never throws.
      const afterKill = mlx.ping();
      await assert.rejects(loading, SidecarCrashError);
      await assert.rejects(afterKill, SidecarCrashError);
      await mlx.ping();
    } finally {
      await mlx.close();
    }
  });

  test("the restart budget: after maxCrashes within the window the client gives up until restart()", T, async () => {
    const mlx = await startClient({ model: undefined, restart: { maxCrashes: 2, initialDelayMs: 50 } });
    const unavailable: SidecarUnavailableError[] = [];
    mlx.on("unavailable", (error) => unavailable.push(error));
    try {
      await crash(mlx);
      const before = Date.now();
      await mlx.ping(); // restarted, after the backoff
      assert.ok(Date.now() - before >= 40, "the first restart waits initialDelayMs");
      await crash(mlx);
      assert.equal(unavailable.length, 1);
      await assert.rejects(mlx.ping(), (error: unknown) => {
        assert.ok(error instanceof SidecarUnavailableError);
        assert.ok(error.lastCrash instanceof SidecarCrashError);
        return true;
      });
      await mlx.restart();
      await mlx.ping();
    } finally {
      await mlx.close();
    }
  });

  test("restart: false stays down after a crash", T, async () => {
    const mlx = await startClient({ model: undefined, restart: false });
    try {
      await crash(mlx);
      await assert.rejects(mlx.ping(), SidecarUnavailableError);
    } finally {
      await mlx.close();
    }
  });
});

describe("no orphans", () => {
  function runHost(mode: "stay" | "forget") {
    const host = spawn(process.execPath, ["--import", "tsx", join(__dirname, "fixtures", "host.ts"), mode], {
      cwd: packageRoot,
      env: { ...process.env, LOCALMLX_MODELS_DIR: modelsDir },
      stdio: ["ignore", "pipe", "inherit"],
    });
    const sidecarPid = new Promise<number>((resolve, reject) => {
      let out = "";
      host.stdout.on("data", (chunk: Buffer) => {
        out += chunk.toString("utf8");
        const line = out.split("\n").find((l) => l.startsWith("{"));
        if (line) resolve((JSON.parse(line) as { sidecarPid: number }).sidecarPid);
      });
      host.once("exit", (code) => reject(new Error(`host exited early (${code})`)));
    });
    const exited = new Promise<number | null>((resolve) => host.once("exit", (code) => resolve(code)));
    return { host, sidecarPid, exited };
  }

  test("when the Node host is killed with SIGKILL, the sidecar sees EOF and exits", T, async () => {
    const { host, sidecarPid, exited } = runHost("stay");
    const pid = await sidecarPid;
    assert.ok(!processGone(pid));
    process.kill(host.pid!, "SIGKILL");
    await exited;
    await waitFor(() => processGone(pid), 5_000, `sidecar ${pid} to exit`);
  });

  test("a host that forgets close() still exits on its own, and so does its sidecar", T, async () => {
    const { sidecarPid, exited } = runHost("forget");
    const pid = await sidecarPid;
    const code = await Promise.race([exited, sleep(10_000).then(() => "still running")]);
    assert.equal(code, 0, "an idle sidecar must not keep the host alive");
    await waitFor(() => processGone(pid), 5_000, `sidecar ${pid} to exit`);
  });
});

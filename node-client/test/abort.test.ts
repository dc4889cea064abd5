/**
 * Abort, as documented: a generation resolves "cancelled"; every other call rejects with the
 * exported AbortError (its `reason` the signal's). And `await using` closes the client.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { AbortError, LocalMLX, LocalMLXError } from "../src/index";
import { messages, processGone, startClient, waitFor } from "./helpers";

function isAbortError(method: string, reason?: unknown): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof AbortError, `${method}: ${String(error)} is not the exported AbortError`);
    assert.ok(error instanceof LocalMLXError);
    assert.equal(error.name, "AbortError");
    assert.match(error.message, new RegExp(`^${method.replace("/", "\\/")}: aborted`));
    if (reason !== undefined) {
      assert.equal(error.reason, reason);
      assert.equal(error.cause, reason);
    }
    return true;
  };
}

describe("abort", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;

  before(async () => {
    mlx = await startClient();
  });
  after(async () => {
    await mlx?.close();
  });

  test("an already-aborted signal: every call but chat/generate rejects with AbortError, sending nothing", async () => {
    const signal = AbortSignal.abort();
    await assert.rejects(mlx.status({ signal }), isAbortError("server/status", signal.reason));
    await assert.rejects(mlx.ping({ signal }), isAbortError("ping"));
    await assert.rejects(mlx.tokenize("hello", { signal }), isAbortError("tokenize"));
    await assert.rejects(mlx.embed("hello", { signal }), isAbortError("embed"));
    await assert.rejects(mlx.models.load("demo", { signal }), isAbortError("models/load"));
    await assert.rejects(mlx.models.status("demo", { signal }), isAbortError("models/status"));
    await assert.rejects(mlx.models.list({ signal }), isAbortError("models/list"));
    await assert.rejects(mlx.models.unload("demo", { signal }), isAbortError("models/unload"));
    await assert.rejects(mlx.request("server/status", {}, { signal }), isAbortError("server/status"));
    // A generation is not an error: it resolves "cancelled" with zero usage.
    for (const prediction of [mlx.chat({ messages, signal }), mlx.generate({ prompt: "Once", signal })]) {
      const result = await prediction.result;
      assert.equal(result.finishReason, "cancelled");
      assert.equal(result.usage.completionTokens, 0);
    }
    assert.deepEqual((await mlx.status()).models.map((m) => m.model), ["demo"], "the unload was never sent");
  });

  test("aborting in flight: the call rejects with AbortError carrying the reason; a generation resolves cancelled", async () => {
    await mlx.models.unload("demo");
    const controller = new AbortController();
    const loading = mlx.models.load("demo", { signal: controller.signal });
    const reason = new Error("changed my mind");
    controller.abort(reason);
    await assert.rejects(loading, (error: unknown) => isAbortError("models/load", reason)(error) && /changed my mind/.test((error as Error).message));

    const chat = new AbortController();
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0, signal: chat.signal });
    let chunks = 0;
    for await (const _chunk of prediction) if (++chunks === 3) chat.abort();
    const result = await prediction.result;
    assert.equal(result.finishReason, "cancelled");
    assert.ok(result.usage.completionTokens < 2000);
  });

  test("AbortSignal.timeout(): AbortError whose reason is the TimeoutError DOMException", async () => {
    const signal = AbortSignal.timeout(1);
    await waitFor(() => signal.aborted, 1_000, "the signal");
    await assert.rejects(mlx.status({ signal }), (error: unknown) => {
      assert.ok(error instanceof AbortError);
      assert.equal((error.reason as Error).name, "TimeoutError");
      assert.match(error.message, /server\/status: aborted: .*timeout/);
      return true;
    });
  });

  test("aborting while the sidecar restarts stops the wait at once", async () => {
    const client = await startClient({ model: undefined });
    try {
      const crashed = new Promise((resolve) => client.once("crash", resolve));
      const holdLoopOpen = setInterval(() => undefined, 1_000);
      process.kill(client.pid!, "SIGKILL");
      await crashed;
      clearInterval(holdLoopOpen);
      const controller = new AbortController();
      const call = client.status({ signal: controller.signal });
      const started = Date.now();
      setTimeout(() => controller.abort(), 20);
      await assert.rejects(call, AbortError);
      assert.ok(Date.now() - started < 200, `rejected after ${Date.now() - started} ms, not when the restart was done`);
      await client.ping(); // the restart went on
    } finally {
      await client.close();
    }
  });
});

describe("await using", { timeout: 60_000 }, () => {
  test("closes the sidecar when the scope ends", async () => {
    let pid: number | undefined;
    {
      await using scoped = await startClient({ model: undefined });
      pid = scoped.pid;
      await scoped.ping();
    }
    assert.ok(pid !== undefined && processGone(pid), "the sidecar is gone after the block");
  });

  test("Symbol.asyncDispose is close()", async () => {
    const client = await startClient({ model: undefined });
    await client[Symbol.asyncDispose]();
    await assert.rejects(client.ping(), /closed/);
  });
});

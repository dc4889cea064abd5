/** Abort, break and timeouts against the real sidecar. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { AbortError, LocalMLX, TimeoutError } from "../src/index";
import { messages, startClient } from "./helpers";

describe("cancellation and timeouts", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  const warnings: string[] = [];

  before(async () => {
    mlx = await startClient();
    mlx.on("warning", (w) => warnings.push(w.message));
  });
  after(async () => {
    await mlx?.close();
  });

  /** Resolves once the sidecar runs and queues nothing; fails after `withinMs`. */
  async function idle(withinMs: number): Promise<void> {
    const deadline = Date.now() + withinMs;
    for (;;) {
      const { active, queued } = (await mlx.status()).requests;
      if (active + queued === 0) return;
      if (Date.now() > deadline) assert.fail(`the sidecar still runs ${active} and queues ${queued} requests`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  test("aborting mid-stream sends $/cancelRequest and ends the iterator cleanly", async () => {
    const controller = new AbortController();
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0, signal: controller.signal });
    let seen = 0;
    for await (const _chunk of prediction) {
      if (++seen === 3) controller.abort();
    }
    assert.equal(seen, 3, "no chunk after the abort");
    const result = await prediction.result;
    assert.equal(result.finishReason, "cancelled");
    assert.ok(result.usage.completionTokens < 2000);
    assert.ok(result.text.length > 0);
    assert.deepEqual(warnings, []);
    await mlx.ping();
  });

  test("breaking out of for-await cancels the generation", async () => {
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0 });
    for await (const _chunk of prediction) break;
    const result = await prediction.result;
    assert.equal(result.finishReason, "cancelled");
    assert.ok(result.usage.completionTokens < 2000);
  });

  test("an already-aborted signal sends nothing and resolves 'cancelled'", async () => {
    const prediction = mlx.chat({ messages, signal: AbortSignal.abort() });
    const chunks: unknown[] = [];
    for await (const chunk of prediction) chunks.push(chunk);
    assert.deepEqual(chunks, []);
    assert.equal((await prediction.result).finishReason, "cancelled");
    assert.equal(prediction.id, undefined);
  });

  test("prediction.cancel() stops an unconsumed generation", async () => {
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0 });
    setTimeout(() => prediction.cancel(), 100);
    const result = await prediction.result;
    assert.equal(result.finishReason, "cancelled");
  });

  test("a stream timeout rejects with TimeoutError and cancels the generation in the sidecar", async () => {
    const prediction = mlx.chat({ messages, maxTokens: 2000, temperature: 0, timeoutMs: 300 });
    const started = Date.now();
    await assert.rejects(async () => {
      for await (const _chunk of prediction) {
        // keep reading until the timeout
      }
    }, TimeoutError);
    assert.ok(Date.now() - started < 2_000);
    await assert.rejects(prediction.result, TimeoutError);
    await idle(1_500); // 2000 tokens would take several seconds: the cancel reached the sidecar
    assert.deepEqual(warnings, [], "the late cancelled response is dropped silently");
  });

  test("a request timeout rejects with TimeoutError; the client goes on", async () => {
    await mlx.models.unload("demo");
    await assert.rejects(mlx.models.load("demo", { timeoutMs: 1 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError);
      assert.equal(error.method, "models/load");
      return true;
    });
    await mlx.ping();
    await mlx.models.load("demo");
  });

  test("aborting a request rejects with AbortError, the signal's reason as its reason", async () => {
    await mlx.models.unload("demo");
    const controller = new AbortController();
    const loading = mlx.models.load("demo", { signal: controller.signal });
    controller.abort(new Error("changed my mind"));
    await assert.rejects(loading, (error: unknown) => error instanceof AbortError && /changed my mind/.test(error.message));
    await assert.rejects(mlx.status({ signal: AbortSignal.abort() }), AbortError);
    await mlx.models.load("demo");
  });
});

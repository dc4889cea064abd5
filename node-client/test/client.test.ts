/** The client against the real sidecar and the embedded demo model: calls, streams, errors, sizes. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ErrorCode, LocalMLX, PROTOCOL_VERSION, RpcError, type LoadProgress, type PredictionChunk } from "../src/index";
import { messages, startClient } from "./helpers";

describe("a started client", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  const progress: LoadProgress[] = [];

  before(async () => {
    mlx = await startClient({ onProgress: (p) => progress.push(p) });
  });
  after(async () => {
    await mlx?.close();
  });

  test("initialize told us about the server", () => {
    assert.equal(mlx.info?.protocolVersion, PROTOCOL_VERSION);
    assert.equal(mlx.info?.serverInfo.name, "localmlx");
    assert.ok(mlx.info!.limits.maxLineBytes > 0);
    assert.ok(mlx.pid! > 0);
    assert.deepEqual(mlx.trackedModels, ["demo"]);
  });

  test("start({model}) loaded the model with progress callbacks", () => {
    assert.ok(progress.length >= 1);
    const last = progress[progress.length - 1]!;
    assert.equal(last.completed, last.total);
    assert.ok(progress.every((p) => !("token" in p)));
  });

  test("streams a chat reply chunk by chunk, then the result", async () => {
    const prediction = mlx.chat({ messages, maxTokens: 24, temperature: 0 });
    const chunks: PredictionChunk[] = [];
    for await (const chunk of prediction) chunks.push(chunk);
    const result = await prediction.result;
    assert.ok(chunks.length >= 2);
    assert.deepEqual(
      chunks.map((c) => c.seq),
      [...chunks.keys()],
    );
    assert.equal(result.text, chunks.map((c) => c.text).join(""));
    assert.equal(result.finishReason, "length");
    assert.equal(result.model, "demo");
    assert.equal(result.usage.completionTokens, 24);
    assert.ok(result.timings.tokensPerSecond > 0);
  });

  test("streamed text equals the sidecar's unstreamed text (multi-byte characters included)", async () => {
    const params = { messages, maxTokens: 60, temperature: 0 };
    const streamed = await mlx.chat(params).result;
    const unstreamed = await mlx.request("chat", params);
    assert.equal(streamed.text, unstreamed.text);
    assert.ok(/[^\x00-\x7f]/.test(streamed.text), "the demo model's reply has non-ASCII characters");
  });

  test("awaiting the prediction itself gives the result; generate takes a raw prompt", async () => {
    const result = await mlx.generate({ prompt: "Once upon a time", maxTokens: 8, temperature: 0 });
    assert.equal(result.usage.completionTokens, 8);
    assert.equal(typeof result.text, "string");
  });

  test("concurrent streams never mix", async () => {
    const prompts = ["Tell me about the sea.", "What do mountains look like?", "Say something about rivers."];
    const solo: string[] = [];
    for (const content of prompts) {
      solo.push((await mlx.chat({ messages: [{ role: "user", content }], maxTokens: 30, temperature: 0 }).result).text);
    }
    const together = await Promise.all(
      prompts.map(async (content) => {
        let text = "";
        for await (const chunk of mlx.chat({ messages: [{ role: "user", content }], maxTokens: 30, temperature: 0 })) {
          text += chunk.text;
        }
        return text;
      }),
    );
    assert.deepEqual(together, solo);
    assert.notEqual(solo[0], solo[1]);
  });

  test("status, models.list, tokenize, ping", async () => {
    const status = await mlx.status();
    assert.deepEqual(
      status.models.map((m) => m.model),
      ["demo"],
    );
    assert.ok(status.memory.activeBytes > 0);
    assert.deepEqual(status.requests, { active: 0, queued: 0, paused: 0 });
    assert.ok(status.caches.demo !== undefined, "the loaded model reports its caches");
    const models = await mlx.models.list();
    assert.ok(models.some((m) => m.model === "demo" && m.loaded));
    const demo = await mlx.models.status("demo");
    assert.equal(demo.state, "loaded");
    assert.equal(demo.description?.type, "llama");
    const { tokens } = await mlx.tokenize("hello world");
    assert.ok(tokens.length > 0);
    await mlx.ping();
  });

  test("models.load of a loaded model, and unload then load again", async () => {
    const again = await mlx.models.load("demo");
    assert.equal(again.alreadyLoaded, true);
    const unloaded = await mlx.models.unload("demo");
    assert.deepEqual(unloaded, { model: "demo", unloaded: true });
    assert.deepEqual(mlx.trackedModels, []);
    const steps: string[] = [];
    const loaded = await mlx.models.load("demo", { onProgress: (p) => steps.push(p.phase) });
    assert.equal(loaded.alreadyLoaded, false);
    assert.ok(steps.length > 0);
    assert.deepEqual(mlx.trackedModels, ["demo"]);
  });

  test("errors are typed RpcErrors with code and data", async () => {
    await assert.rejects(mlx.models.load("no-such-model-here"), (error: unknown) => {
      assert.ok(error instanceof RpcError);
      assert.equal(error.code, ErrorCode.ModelNotFound);
      assert.equal(error.codeName, "ModelNotFound");
      assert.equal(error.method, "models/load");
      return true;
    });
    // An invalid param reaches the sidecar's schema check (-32602, with the offending paths).
    await assert.rejects(mlx.chat({ messages, temperature: -1 }).result, (error: unknown) => {
      assert.ok(error instanceof RpcError);
      assert.equal(error.code, ErrorCode.InvalidParams);
      assert.ok(Array.isArray(error.data.errors));
      return true;
    });
  });

  test("a failed stream throws from the iterator", async () => {
    const prediction = mlx.chat({ messages: [{ role: "user", content: "hi" }], model: "no-such-model-here" });
    await assert.rejects(async () => {
      for await (const _chunk of prediction) assert.fail("no chunk expected");
    }, RpcError);
  });

  test("large messages: a 2 MiB request out, a multi-megabyte response in", async () => {
    const text = "the sea and the mountains, ünïcödé 🌊 ".repeat(55_000); // ~2.2 MB of UTF-8
    const { tokens } = await mlx.tokenize(text, { timeoutMs: 60_000 });
    assert.ok(tokens.length > 100_000, `got ${tokens.length} tokens`);
    await mlx.ping();
  });
});

describe("size limits", { timeout: 120_000 }, () => {
  test("a request over the sidecar's maxLineBytes is refused locally, and the client goes on", async () => {
    const mlx = await startClient({ model: undefined, env: { LOCALMLX_MAX_LINE_BYTES: "4096" } });
    try {
      assert.equal(mlx.info?.limits.maxLineBytes, 4096);
      await assert.rejects(
        mlx.tokenize("a".repeat(5000)),
        (error: unknown) => error instanceof RpcError && error.code === ErrorCode.MessageTooLarge,
      );
      assert.ok((await mlx.tokenize("a".repeat(1000))).tokens.length > 0);
    } finally {
      await mlx.close();
    }
  });

  test("a response over maxMessageBytes fails its request, reports a warning, and the client goes on", async () => {
    const mlx = await startClient({ model: undefined, maxMessageBytes: 4096 });
    const warnings: string[] = [];
    mlx.on("warning", (w) => warnings.push(w.kind));
    try {
      await assert.rejects(
        mlx.tokenize("hello ".repeat(3000)),
        (error: unknown) => error instanceof RpcError && error.code === ErrorCode.MessageTooLarge,
      );
      assert.deepEqual(warnings, ["oversized"]);
      await mlx.ping();
    } finally {
      await mlx.close();
    }
  });
});

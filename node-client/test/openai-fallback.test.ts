/**
 * The fallback to a remote OpenAI-compatible server, against a real one on loopback:
 * `mlx_lm.server` from the project's venv serving the demo model. Local fails (a sidecar that
 * cannot start, a model it does not have, a sidecar whose crash budget is spent) and the remote
 * serves, said so in `x-localmlx-served-by` and `servedBy`; then local serves again.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import {
  Fallback,
  LocalMLX,
  chatWithFallback,
  fallbackOptionsFromEnv,
  startOpenAIServer,
  type OpenAIServer,
} from "../src/index";
import { modelsDir, processGone, python, startClient, waitFor } from "./helpers";

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

/** `mlx_lm.server` on the demo model; resolves once it listens. */
async function startRemote(): Promise<{ child: ChildProcess; baseURL: string; hfCache: string }> {
  const port = await freePort();
  // Its /v1/models scans the Hugging Face cache, and fails when there is none.
  const hfCache = mkdtempSync(join(tmpdir(), "localmlx-remote-hf-"));
  const child = spawn(python, ["-m", "mlx_lm.server", "--model", join(modelsDir, "localmlx-demo"), "--host", "127.0.0.1", "--port", String(port)], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, HF_HUB_CACHE: hfCache, HF_HUB_OFFLINE: "1" },
  });
  await new Promise<void>((resolve, reject) => {
    let log = "";
    const onData = (chunk: Buffer): void => {
      log += chunk.toString("utf8");
      if (log.includes("Starting httpd")) {
        child.stderr!.off("data", onData);
        child.stderr!.resume();
        resolve();
      }
    };
    child.stderr!.on("data", onData);
    child.once("exit", (code) => reject(new Error(`mlx_lm.server exited (${code}): ${log.slice(-2000)}`)));
  });
  return { child, baseURL: `http://127.0.0.1:${port}/v1`, hfCache };
}

const hello = [{ role: "user" as const, content: "Hello" }];

describe("fallback to a remote OpenAI-compatible server (mlx_lm.server)", { timeout: 120_000 }, () => {
  let remote: { child: ChildProcess; baseURL: string; hfCache: string };
  let mlx: LocalMLX;

  before(async () => {
    [remote, mlx] = await Promise.all([startRemote(), startClient()]);
  });
  after(async () => {
    remote?.child.kill("SIGKILL");
    if (remote) rmSync(remote.hfCache, { recursive: true, force: true });
    await mlx?.close();
  });

  /** The remote serves its one model whatever name local used. */
  const remoteOptions = (): { baseURL: string; apiKey: string; model: string } => ({ baseURL: remote.baseURL, apiKey: "unused", model: "default_model" });

  test("settings come from LOCALMLX_FALLBACK_TO_OPENAI, OPENAI_API_KEY and OPENAI_BASE_URL", () => {
    assert.equal(fallbackOptionsFromEnv({}), undefined);
    assert.equal(fallbackOptionsFromEnv({ LOCALMLX_FALLBACK_TO_OPENAI: "false", OPENAI_API_KEY: "k" }), undefined);
    assert.deepEqual(
      fallbackOptionsFromEnv({ LOCALMLX_FALLBACK_TO_OPENAI: "true", OPENAI_API_KEY: "k", OPENAI_BASE_URL: "http://h/v1", LOCALMLX_FALLBACK_MODEL: "gpt-4o-mini" }),
      { apiKey: "k", baseURL: "http://h/v1", model: "gpt-4o-mini" },
    );
  });

  test("a sidecar that cannot start: the remote serves (plain, streamed, models)", async () => {
    // Through the endpoint: a sidecar python that does not exist.
    const endpoint: OpenAIServer = await startOpenAIServer({
      port: 0,
      localmlx: { python: "/nonexistent/python3", startTimeoutMs: 5_000 },
      fallback: new Fallback({ ...remoteOptions(), cooldownMs: 600_000 }),
    });
    try {
      assert.ok(endpoint.fallback?.coolingDown, "the failed start began the cool-down");
      const openai = new OpenAI({ baseURL: endpoint.url, apiKey: "unused", maxRetries: 0 });
      const { data, response } = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 8, temperature: 0 }).withResponse();
      assert.equal(response.headers.get("x-localmlx-served-by"), "remote");
      assert.equal(data.object, "chat.completion");
      assert.ok(data.usage!.completion_tokens > 0);

      const stream = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 8, temperature: 0, stream: true });
      let text = "";
      for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? "";
      assert.ok(text.length > 0);

      const models = await openai.models.list().withResponse();
      assert.equal(models.response.headers.get("x-localmlx-served-by"), "remote");
    } finally {
      await endpoint.close();
    }
  });

  test("a model the sidecar does not have goes remote, then the next local model is local again", async () => {
    const fallback = new Fallback({ ...remoteOptions(), cooldownMs: 600_000 });
    const server = await startOpenAIServer({ client: mlx, port: 0, fallback });
    try {
      const openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
      const missing = await openai.chat.completions
        .create({ model: "nobody/not-on-this-machine", messages: hello, max_tokens: 6, temperature: 0 })
        .withResponse();
      assert.equal(missing.response.headers.get("x-localmlx-served-by"), "remote");
      assert.ok(missing.data.choices[0]!.message.content !== undefined);
      assert.equal(fallback.coolingDown, false, "a missing model does not take the sidecar out");

      const local = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 6, temperature: 0 }).withResponse();
      assert.equal(local.response.headers.get("x-localmlx-served-by"), "local");

      // Bad requests stay local errors: the remote would refuse them too.
      await assert.rejects(
        openai.chat.completions.create({ model: "demo", messages: hello, temperature: 9 }),
        (error: unknown) => error instanceof OpenAI.BadRequestError,
      );
    } finally {
      await server.close();
    }
  });

  test("chatWithFallback: servedBy local, remote for a missing model", async () => {
    const fallback = new Fallback(remoteOptions());
    const local = await chatWithFallback({ model: "demo", messages: hello, max_tokens: 5, temperature: 0 }, { local: mlx, fallback });
    assert.equal(local.servedBy, "local");
    assert.equal(local.completion.usage.completion_tokens, 5);
    const remoteServed = await chatWithFallback({ model: "nobody/missing", messages: hello, max_tokens: 5, temperature: 0 }, { local: mlx, fallback });
    assert.equal(remoteServed.servedBy, "remote");
    assert.equal(remoteServed.completion.object, "chat.completion");
    assert.ok(remoteServed.localError);
    const noFallback = chatWithFallback({ model: "nobody/missing", messages: hello }, { local: mlx, fallback: false });
    await assert.rejects(noFallback, (error: unknown) => (error as { status?: number }).status === 404 || (error as Error).name === "RpcError");
  });

  test("a sidecar whose crash budget is spent goes remote, and comes back after the cool-down", async () => {
    const fragile = await startClient({ restart: false });
    const fallback = new Fallback({ ...remoteOptions(), cooldownMs: 600_000 });
    const server = await startOpenAIServer({ client: fragile, port: 0, fallback });
    try {
      const openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
      const pid = fragile.pid!;
      const unavailable = new Promise((resolve) => fragile.once("unavailable", resolve));
      process.kill(pid, "SIGKILL");
      await unavailable;
      await waitFor(() => processGone(pid), 5_000, "the sidecar to exit");

      const down = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 4, temperature: 0 }).withResponse();
      assert.equal(down.response.headers.get("x-localmlx-served-by"), "remote");
      assert.ok(fallback.coolingDown);
      const stillDown = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 4, temperature: 0 }).withResponse();
      assert.equal(stillDown.response.headers.get("x-localmlx-served-by"), "remote", "during the cool-down local is not tried");

      fallback.reset(); // the cool-down is over
      const back = await openai.chat.completions.create({ model: "demo", messages: hello, max_tokens: 4, temperature: 0 }).withResponse();
      assert.equal(back.response.headers.get("x-localmlx-served-by"), "local");
      assert.notEqual(fragile.pid, pid, "a new sidecar serves");
    } finally {
      await server.close();
      await fragile.close();
    }
  });
});

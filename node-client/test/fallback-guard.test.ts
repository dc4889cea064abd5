/**
 * A fallback to a remote provider never happens silently, and never against the user's word. A
 * real loopback HTTP server stands in for the remote and counts what reaches it: with
 * LOCALMLX_FALLBACK_TO_OPENAI=false it sees nothing, whatever asks (the endpoint given a fallback,
 * chatWithFallback, a Fallback used directly, the service), even when the sidecar cannot start or
 * the model is missing; with it true, each request it sees was logged at warning level with why.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  Fallback,
  RemoteForbiddenError,
  chatWithFallback,
  embedWithFallback,
  fallbackOf,
  fallbackOptionsFromEnv,
  startOpenAIServer,
  type LocalMLX,
} from "../src/index";
import { startClient } from "./helpers";
import { ServiceProcess, configFile, countingRemote, freePort, serviceEnv } from "./service-helpers";

const T = { timeout: 120_000 };
const hello = [{ role: "user" as const, content: "Hello" }];

async function post(port: number, path: string, body: unknown): Promise<{ status: number; servedBy: string | null; body: any }> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: response.status, servedBy: response.headers.get("x-localmlx-served-by"), body: await response.json() };
}

/** Sets environment variables for one test, then puts them back. */
async function withEnv<T>(vars: Record<string, string>, body: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((key) => [key, process.env[key]]));
  Object.assign(process.env, vars);
  try {
    return await body();
  } finally {
    for (const [key, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }
}

describe("the remote fallback", () => {
  let remote: Awaited<ReturnType<typeof countingRemote>>;
  let mlx: LocalMLX;

  before(async () => {
    [remote, mlx] = await Promise.all([countingRemote(), startClient()]);
  });
  after(async () => {
    await remote?.close();
    await mlx?.close();
  });

  test("LOCALMLX_FALLBACK_TO_OPENAI=false: nothing in the library sends anything remote, even when given a fallback", T, async () => {
    remote.requests.length = 0;
    await withEnv({ LOCALMLX_FALLBACK_TO_OPENAI: "false", OPENAI_BASE_URL: remote.url, OPENAI_API_KEY: "sk-test" }, async () => {
      const given = { baseURL: remote.url, apiKey: "sk-test" };
      assert.equal(fallbackOptionsFromEnv(), undefined);
      assert.equal(fallbackOf(given), undefined);
      assert.equal(fallbackOf(new Fallback(given)), undefined);

      // The sidecar cannot start: the endpoint does not start on the remote's strength.
      await assert.rejects(startOpenAIServer({ port: 0, localmlx: { python: "/nonexistent/python3", startTimeoutMs: 5_000 }, fallback: given }));
      const down = await startOpenAIServer({ port: 0, localmlx: { python: "/nonexistent/python3", startTimeoutMs: 5_000 }, fallback: given, requireSidecar: false });
      try {
        const port = down.addresses[0]!.port;
        const chat = await post(port, "/v1/chat/completions", { model: "demo", messages: hello, max_tokens: 4 });
        assert.equal(chat.status, 503);
        assert.equal(chat.body.error.code, "sidecar_unavailable");
        assert.equal((await post(port, "/v1/embeddings", { model: "e", input: "x" })).status, 503);
      } finally {
        await down.close();
      }

      // The model is missing: 404, not the remote.
      const server = await startOpenAIServer({ client: mlx, port: 0, fallback: new Fallback(given) });
      try {
        const missing = await post(server.addresses[0]!.port, "/v1/chat/completions", { model: "nobody/not-here", messages: hello, max_tokens: 4 });
        assert.equal(missing.status, 404);
        assert.equal(missing.body.error.code, "model_not_found");
      } finally {
        await server.close();
      }
      await assert.rejects(chatWithFallback({ model: "nobody/not-here", messages: hello }, { local: mlx, fallback: given }), (e: unknown) => (e as Error).name === "RpcError");
      await assert.rejects(embedWithFallback({ model: "nobody/not-here", input: "x" }, { local: mlx, fallback: new Fallback(given) }));

      // Even a Fallback used directly refuses.
      await assert.rejects(new Fallback(given).request("POST", "/chat/completions", { model: "m", messages: hello }), (e: unknown) => {
        assert.ok(e instanceof RemoteForbiddenError);
        assert.equal(e.status, 503);
        assert.match(e.message, /LOCALMLX_FALLBACK_TO_OPENAI=false keeps every request on this machine/);
        return true;
      });
    });
    assert.deepEqual(remote.requests, [], "the remote saw nothing");
  });

  test("when it is on, every request that goes remote is a warning with its reason", T, async () => {
    remote.requests.length = 0;
    const warnings: string[] = [];
    const fallback = new Fallback({ baseURL: remote.url, apiKey: "sk-test", model: "remote-model", logger: { warn: (m) => warnings.push(m) } });
    const local = await chatWithFallback({ model: "demo", messages: hello, max_tokens: 3 }, { local: mlx, fallback });
    assert.equal(local.servedBy, "local");
    assert.deepEqual(warnings, [], "nothing to say when local serves");
    const served = await chatWithFallback({ model: "nobody/not-here", messages: hello, max_tokens: 3 }, { local: mlx, fallback });
    assert.equal(served.servedBy, "remote");
    assert.equal(remote.requests.length, 1);
    assert.equal(warnings.length, 1);
    assert.match(
      warnings[0]!,
      new RegExp(`^localmlx fallback: sending POST ${remote.url.replace(/[.]/g, "\\.")}/chat/completions \\(model remote-model\\) off this machine: local could not serve \\(model_not_found\\): .*nobody/not-here`),
    );
    // A direct request names its own reason.
    await fallback.request("GET", "/models", undefined, undefined, "asked for the remote's models");
    assert.match(warnings[1]!, /sending GET .*\/models off this machine: asked for the remote's models$/);
    assert.equal(remote.requests.length, 2);
  });
});

describe("the service and the remote", () => {
  let remote: Awaited<ReturnType<typeof countingRemote>>;
  before(async () => {
    remote = await countingRemote();
  });
  after(async () => remote?.close());

  test("=false (and unset): no request leaves, with no sidecar or a missing model", T, async () => {
    remote.requests.length = 0;
    const [a, b] = await Promise.all([freePort(), freePort()]);
    const noSidecar = ServiceProcess.serve(
      configFile({ tiers: { fast: { port: a, model: "demo" } } }).path,
      serviceEnv({ LOCALMLX_PYTHON: "/nonexistent/python3", LOCALMLX_FALLBACK_TO_OPENAI: "false", OPENAI_BASE_URL: remote.url, OPENAI_API_KEY: "sk-test" }),
    );
    // Off by default too: a key and a base URL in the environment are not a yes.
    const noModel = ServiceProcess.serve(
      configFile({ tiers: { fast: { port: b, model: "nobody/not-downloaded" } } }).path,
      serviceEnv({ OPENAI_BASE_URL: remote.url, OPENAI_API_KEY: "sk-test" }),
    );
    try {
      await Promise.all([noSidecar.ready(), noModel.ready()]);
      assert.equal((await post(a, "/v1/chat/completions", { model: "x", messages: hello, max_tokens: 3 })).status, 503);
      assert.equal((await post(a, "/v1/embeddings", { model: "x", input: "x" })).status, 503);
      assert.equal((await fetch(`http://127.0.0.1:${a}/v1/models`)).status, 503);
      const missing = await post(b, "/v1/chat/completions", { model: "x", messages: hello, max_tokens: 3 });
      assert.equal(missing.status, 404);
      assert.equal(missing.body.error.code, "model_not_found");
      const health = (await (await fetch(`http://127.0.0.1:${b}/health`)).json()) as any;
      assert.deepEqual(health.fallback, { enabled: false });
      assert.equal(health.tiers[0].available, false);
      await noModel.waitFor((r) => r.level === "warn" && r.msg.includes("not on this machine") && r.model === "nobody/not-downloaded", "the missing model's warning");
    } finally {
      await Promise.all([noSidecar.stop(), noModel.stop()]);
    }
    assert.deepEqual(remote.requests, []);
    assert.doesNotMatch([...noSidecar.lines, ...noModel.lines].join("\n"), /off this machine/);
  });

  test("=true: what goes remote is logged at warning level with the reason", T, async () => {
    remote.requests.length = 0;
    const port = await freePort();
    const service = ServiceProcess.serve(
      configFile({ tiers: { fast: { port, model: "demo" } } }).path,
      serviceEnv({ LOCALMLX_PYTHON: "/nonexistent/python3", LOCALMLX_FALLBACK_TO_OPENAI: "true", OPENAI_BASE_URL: remote.url, OPENAI_API_KEY: "sk-test" }),
    );
    try {
      await service.ready();
      const first = await post(port, "/v1/chat/completions", { model: "x", messages: hello, max_tokens: 3 });
      assert.equal(first.status, 200);
      assert.equal(first.servedBy, "remote");
      const second = await post(port, "/v1/chat/completions", { model: "x", messages: hello, max_tokens: 3 });
      assert.equal(second.servedBy, "remote");
      assert.equal(remote.requests.length, 2);
      const health = (await (await fetch(`http://127.0.0.1:${port}/health`)).json()) as any;
      assert.equal(health.fallback.enabled, true);
      assert.equal(health.fallback.baseURL, remote.url);
    } finally {
      await service.stop();
    }
    const warnings = service.records.filter((r) => r.source === "fallback");
    assert.equal(warnings.length, remote.requests.length, "one warning per request that left");
    for (const record of warnings) {
      assert.equal(record.level, "warn");
      assert.match(record.msg, /^localmlx fallback: sending POST http:\/\/127\.0\.0\.1:\d+\/v1\/chat\/completions \(model x\) off this machine: /);
      // The start failed, so the cool-down began: the reason says the sidecar failed.
      assert.match(record.msg, /the local sidecar failed and is cooling down|local could not serve \(sidecar_unavailable\)/);
    }
  });
});

/**
 * `localmlx-client serve`, as a user runs it: the real bin, the real sidecar on the demo model
 * (and a tiny Qwen3-Embedding for the embeddings tier). Ports and models from the config, one
 * sidecar for every port, /health, structured logs without prompt text, SIGHUP reloads without
 * dropping requests in flight, SIGTERM drains and leaves no sidecar, config errors name the key.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { buildFamilyModel, buildShortContextDemo, processGone, waitFor } from "./helpers";
import { ServiceProcess, configFile, freePort, serviceEnv, type LogRecord } from "./service-helpers";
import { defaultConfigPath, defaultServiceConfig, loadServiceConfig, parseServiceConfig, ServiceConfigError, ServiceLog } from "../src/index";

const T = { timeout: 120_000 };

async function getJson(port: number, path: string): Promise<{ status: number; body: any }> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: response.status, body: await response.json() };
}

async function post(port: number, path: string, body: unknown): Promise<{ status: number; body: any; servedBy: string | null }> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: response.status, body: await response.json(), servedBy: response.headers.get("x-localmlx-served-by") };
}

/** A streamed chat: `first` resolves at the first content chunk, `done` with the whole text and whether `[DONE]` came. */
function streamChat(port: number, body: Record<string, unknown>): { first: Promise<void>; done: Promise<{ text: string; sawDone: boolean; chunks: number }> } {
  let markFirst!: () => void;
  const first = new Promise<void>((resolve) => (markFirst = resolve));
  const done = (async () => {
    const response = await fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...body, stream: true }),
    });
    assert.equal(response.status, 200);
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    let chunks = 0;
    let sawDone = false;
    try {
      for await (const bytes of response.body as unknown as AsyncIterable<Uint8Array>) {
        buffer += decoder.decode(bytes, { stream: true });
        let end: number;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end).replace(/^data: /, "");
          buffer = buffer.slice(end + 2);
          if (event === "[DONE]") sawDone = true;
          else {
            const delta = (JSON.parse(event) as { choices?: Array<{ delta?: { content?: string } }> }).choices?.[0]?.delta?.content;
            if (delta) {
              text += delta;
              chunks++;
              markFirst();
            }
          }
        }
      }
    } catch {
      // the connection was cut: what arrived is the answer
    }
    markFirst();
    return { text, sawDone, chunks };
  })();
  return { first, done };
}

const hello = (content = "Tell me about the sea.") => [{ role: "user", content }];

describe("localmlx-client serve", () => {
  test("serves each tier's port from the config with one sidecar; /health says what it serves; logs are JSON lines with no prompt text", T, async () => {
    const embedding = buildFamilyModel("qwen3-embedding");
    const [router, fast, embeddings] = await Promise.all([freePort(), freePort(), freePort()]);
    const config = configFile({
      tiers: { router: { port: router, model: "demo" }, fast: { port: fast, model: "demo" }, embeddings: { port: embeddings, model: embedding } },
    });
    const service = ServiceProcess.serve(config.path);
    try {
      await service.ready();
      const healths = await Promise.all([router, fast, embeddings].map((port) => getJson(port, "/health")));
      const sidecarPid = healths[0]!.body.sidecar.pid as number;
      assert.equal(typeof sidecarPid, "number");
      for (const [index, name] of ["router", "fast", "embeddings"].entries()) {
        const { status, body } = healths[index]!;
        assert.equal(status, 200);
        assert.equal(body.status, "ok");
        assert.equal(body.service, "localmlx");
        assert.equal(body.tier, name);
        assert.equal(body.config, config.path);
        assert.deepEqual(body.sidecar, { state: "running", pid: sidecarPid }, "one sidecar behind every port");
        assert.deepEqual(
          body.tiers.map((t: { name: string; port: number; model: string; available: boolean }) => [t.name, t.port, t.model, t.available]),
          [["router", router, "demo", true], ["fast", fast, "demo", true], ["embeddings", embeddings, embedding, true]],
        );
        assert.deepEqual(body.fallback, { enabled: false });
      }
      assert.deepEqual(service.children(), [sidecarPid], "one process plus its sidecar");

      // What Wooster's LocalModelClient.isHealthy asks: GET <url>/v1/models, 200 with a data array.
      for (const port of [router, fast, embeddings]) {
        const models = await getJson(port, "/v1/models");
        assert.equal(models.status, 200);
        assert.ok(Array.isArray(models.body.data));
      }

      // Wooster's names for its models: each port serves its tier's model whatever is asked.
      const marker = "zebra-marker-7731 keep this out of the log";
      const chat = await post(fast, "/v1/chat/completions", { model: "mlx-community/Qwen3-30B-A3B-4bit", messages: hello(marker), max_tokens: 6, temperature: 0 });
      assert.equal(chat.status, 200);
      assert.equal(chat.servedBy, "local");
      assert.equal(chat.body.model, "mlx-community/Qwen3-30B-A3B-4bit");
      assert.equal(chat.body.usage.completion_tokens, 6);
      const vectors = await post(embeddings, "/v1/embeddings", { model: "Qwen/Qwen3-Embedding-8B", input: ["a note about the sea", marker] });
      assert.equal(vectors.status, 200);
      const dimensions = vectors.body.data[0].embedding.length as number;
      assert.ok(dimensions > 0);
      // Wooster's HttpEmbeddings always sends `dimensions` (MLX_EMBEDDINGS_DIMENSIONS): the model's own is accepted.
      const sized = await post(embeddings, "/v1/embeddings", { model: "Qwen/Qwen3-Embedding-8B", input: ["a note"], dimensions });
      assert.equal(sized.body.data[0].embedding.length, dimensions);

      const request = await service.waitFor((r) => r.msg === "request" && r.path === "/v1/chat/completions", "the chat's log record");
      assert.equal(request.level, "info");
      assert.equal(request.tier, "fast");
      assert.equal(request.model, "demo");
      assert.equal(request.servedBy, "local");
      assert.equal(request.status, 200);
      assert.equal(typeof request.durationMs, "number");
      await service.waitFor((r) => r.msg === "request" && r.tier === "embeddings" && r.model === embedding, "the embeddings' log record");
      const polls = service.records.filter((r) => r.msg === "request" && r.path === "/health");
      assert.ok(polls.every((r) => r.level === "debug"), "health checks are not logged at info");
    } finally {
      const exit = await service.stop();
      assert.deepEqual(exit, { code: 0, signal: null });
    }
    for (const line of service.lines) {
      if (line.trim() === "") continue;
      const record = JSON.parse(line) as LogRecord; // every line is one JSON object
      assert.ok(typeof record.time === "string" && typeof record.level === "string" && typeof record.msg === "string", line);
    }
    assert.doesNotMatch(service.lines.join("\n"), /zebra-marker/, "no prompt text in the log");
    const sidecar = service.records.find((r) => r.msg === "serving")!.sidecarPid as number;
    await waitFor(() => processGone(sidecar), 5_000, "the sidecar to be gone");
  });

  test("an agent-sized prompt (~7,000 tokens) gets an answer from the demo model", T, async (t) => {
    const port = await freePort();
    const config = configFile({ tiers: { fast: { port, model: "demo" } } });
    const service = ServiceProcess.serve(config.path);
    try {
      await service.ready();
      // Wooster's code-agent prompt is about 6,800 tokens; the demo used to stop at 2,048.
      const system = "You are Wooster's code agent. Write JavaScript that calls the tools below. ".repeat(220);
      const started = Date.now();
      const chat = await post(port, "/v1/chat/completions", { model: "any", messages: [{ role: "system", content: system }, ...hello("Hi")], max_tokens: 4, temperature: 0 });
      const ms = Date.now() - started;
      assert.equal(chat.status, 200, JSON.stringify(chat.body));
      assert.ok(chat.body.usage.prompt_tokens >= 6_800 && chat.body.usage.prompt_tokens < 32_768, `prompt_tokens ${chat.body.usage.prompt_tokens}`);
      assert.equal(chat.body.usage.completion_tokens, 4);
      t.diagnostic(`prefill of ${chat.body.usage.prompt_tokens} tokens + 4 generated: ${ms} ms`);
    } finally {
      await service.stop();
    }
  });

  test("SIGHUP reloads: a moved port listens anew, a kept port serves its new model, a request in flight finishes; a bad config changes nothing", T, async () => {
    const short = buildShortContextDemo();
    const [a, b, c] = await Promise.all([freePort(), freePort(), freePort()]);
    const config = configFile({ tiers: { router: { port: a, model: "demo" }, fast: { port: b, model: "demo" } } });
    const service = ServiceProcess.serve(config.path);
    try {
      await service.ready();
      const stream = streamChat(a, { model: "x", messages: hello(), max_tokens: 400, temperature: 0 });
      await stream.first;
      // router moves from a to c; fast keeps b with another model.
      config.write({ tiers: { router: { port: c, model: "demo" }, fast: { port: b, model: short } } });
      const mark = service.records.length;
      service.child.kill("SIGHUP");
      const reloaded = await service.waitFor((r) => r.msg === "reloaded", "the reload", 30_000, mark);
      assert.deepEqual(reloaded.tiers, [`router=${c}:demo`, `fast=${b}:${short}`]);

      const result = await stream.done;
      assert.ok(result.sawDone, "the request in flight on the old port ran to its end");
      assert.ok(result.chunks > 10);
      const streamed = await service.waitFor((r) => r.msg === "request" && r.port === a && r.stream === true, "the streamed request's record");
      assert.equal(streamed.finishReason, "length");
      const records = service.records;
      const order = (r: LogRecord | undefined): number => records.findIndex((x) => x.time === r?.time && x.msg === r?.msg);
      assert.ok(order(streamed) > order(reloaded), "it was still running when the reload was applied");

      await assert.rejects(fetch(`http://127.0.0.1:${a}/health`), "the old port is closed");
      const moved = await getJson(c, "/health");
      assert.equal(moved.body.tier, "router");
      const kept = await getJson(b, "/health");
      assert.equal(kept.body.tier, "fast");
      assert.equal(kept.body.tiers.find((t: { name: string }) => t.name === "fast").model, short);
      const chat = await post(b, "/v1/chat/completions", { model: "x", messages: hello(), max_tokens: 3 });
      assert.equal(chat.status, 200);
      await service.waitFor((r) => r.msg === "request" && r.port === b && r.model === short, "a request on the kept port served by its new model");

      // A config with an error: refused, with the key named; everything keeps serving.
      config.write({ tiers: { router: { port: c, model: "demo", prot: 1 } } });
      const mark2 = service.records.length;
      service.child.kill("SIGHUP");
      const refused = await service.waitFor((r) => r.msg.startsWith("reload refused"), "the refused reload", 30_000, mark2);
      assert.equal(refused.level, "error");
      assert.match(String(refused.error), /tiers\.router\.prot: unknown key/);
      assert.equal((await getJson(b, "/health")).status, 200);
      assert.equal((await getJson(c, "/health")).status, 200);
    } finally {
      assert.deepEqual(await service.stop(), { code: 0, signal: null });
    }
  });

  test("SIGTERM lets a request in flight finish, then stops with no sidecar left; past drainTimeoutMs it is cut", T, async () => {
    const port = await freePort();
    const config = configFile({ tiers: { fast: { port, model: "demo" } } });
    const service = ServiceProcess.serve(config.path);
    await service.ready();
    const sidecar = (await getJson(port, "/health")).body.sidecar.pid as number;
    const stream = streamChat(port, { model: "x", messages: hello(), max_tokens: 400, temperature: 0 });
    await stream.first;
    service.child.kill("SIGTERM");
    const result = await stream.done;
    assert.ok(result.sawDone, "the stream ran to its end");
    assert.deepEqual(await service.exited, { code: 0, signal: null });
    const stopping = service.records.findIndex((r) => r.msg === "stopping");
    const streamed = service.records.findIndex((r) => r.msg === "request" && r.stream === true);
    assert.ok(stopping >= 0 && streamed > stopping, "the request ended after the stop began: it was drained, not cut");
    assert.equal(service.records.at(-1)!.msg, "stopped");
    assert.ok(processGone(sidecar), "no sidecar left behind");

    // A deadline of 300 ms: the long stream is cut, the service still exits cleanly.
    const port2 = await freePort();
    const config2 = configFile({ tiers: { fast: { port: port2, model: "demo" } }, drainTimeoutMs: 300 });
    const hurried = ServiceProcess.serve(config2.path);
    await hurried.ready();
    const sidecar2 = (await getJson(port2, "/health")).body.sidecar.pid as number;
    const long = streamChat(port2, { model: "x", messages: hello(), max_tokens: 20_000, temperature: 0 });
    await long.first;
    hurried.child.kill("SIGTERM");
    const cut = await long.done;
    assert.equal(cut.sawDone, false);
    assert.deepEqual(await hurried.exited, { code: 0, signal: null });
    assert.ok(processGone(sidecar2));
  });

  test("a sidecar that cannot start: the service still listens, /health is 503 and says why; text logs", T, async () => {
    const port = await freePort();
    const config = configFile({ tiers: { fast: { port, model: "demo" } } });
    const service = new ServiceProcess(["serve", "--config", config.path, "--log-format", "text"], serviceEnv({ LOCALMLX_PYTHON: "/nonexistent/python3" }));
    try {
      await waitFor(() => service.lines.some((line) => / INFO serving /.test(line)), 60_000, "the service to listen");
      const health = await getJson(port, "/health");
      assert.equal(health.status, 503);
      assert.equal(health.body.status, "degraded");
      assert.equal(health.body.sidecar.state, "down");
      assert.match(health.body.sidecar.error, /python3/);
      const chat = await post(port, "/v1/chat/completions", { model: "x", messages: hello(), max_tokens: 3 });
      assert.equal(chat.status, 503);
      assert.equal(chat.body.error.code, "sidecar_unavailable");
    } finally {
      assert.deepEqual(await service.stop("SIGINT"), { code: 0, signal: null });
    }
    const lines = service.lines.filter((line) => line.trim() !== "");
    for (const line of lines) assert.match(line, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARN|ERROR) \S/, line);
    assert.ok(lines.some((line) => line.includes(` INFO tier tier=fast url=http://127.0.0.1:${port}/v1 model=demo`)), lines.join("\n"));
    assert.ok(lines.some((line) => / WARN request tier=fast method=POST path=\/v1\/chat\/completions port=\d+ status=503 /.test(line)), lines.join("\n"));
  });

  test("config errors name the key, and the service does not start", T, async () => {
    const config = configFile({ tiers: { fast: { port: 8081, model: "demo" }, thinking: { port: 8081, model: "demo" } } });
    const service = ServiceProcess.serve(config.path);
    const exit = await service.exited;
    assert.equal(exit.code, 2);
    assert.match(service.lines.join("\n"), /serve\.json: tiers\.thinking\.port: 8081 is tiers\.fast's port too/);
    const missing = ServiceProcess.serve("/nonexistent/serve.json");
    assert.equal((await missing.exited).code, 2);
    assert.match(missing.lines.join("\n"), /\/nonexistent\/serve\.json: no such file/);
  });
});

describe("the service's config", () => {
  test("defaults are Wooster's tiers at Wooster's ports", () => {
    const config = defaultServiceConfig();
    assert.deepEqual(
      Object.entries(config.tiers).map(([name, tier]) => [name, tier.port]),
      [["router", 8080], ["fast", 8081], ["thinking", 8083], ["embeddings", 8084]],
    );
    assert.equal(config.host, "127.0.0.1");
    assert.equal(config.tiers.fast!.model, "demo");
    assert.deepEqual(parseServiceConfig({}), config);
  });

  test("every bad value is refused with its key", () => {
    const cases: Array<[unknown, RegExp]> = [
      [[], /^x\.json: must be an object/],
      [{ tier: {} }, /^x\.json: tier: unknown key \(known: host, tiers/],
      [{ tiers: {} }, /tiers: must name at least one tier/],
      [{ tiers: { fast: { port: "8081", model: "demo" } } }, /tiers\.fast\.port: must be an integer from 0 to 65535 \(got "8081"\)/],
      [{ tiers: { fast: { port: 70000, model: "demo" } } }, /tiers\.fast\.port: must be an integer/],
      [{ tiers: { fast: { port: 1, model: "" } } }, /tiers\.fast\.model: must be a non-empty string/],
      [{ tiers: { fast: { port: 1, model: "m", preload: "yes" } } }, /tiers\.fast\.preload: must be true or false/],
      [{ tiers: { "fa st": { port: 1, model: "m" } } }, /tiers\.fa st: a tier's name is letters/],
      [{ sidecar: { env: { "BAD-NAME": "1" } } }, /sidecar\.env\.BAD-NAME: not an environment variable name/],
      [{ sidecar: { env: { LOCALMLX_X: { a: 1 } } } }, /sidecar\.env\.LOCALMLX_X: must be a string, number or boolean/],
      [{ sidecar: { pyhton: "/usr/bin/python3" } }, /sidecar\.pyhton: unknown key/],
      [{ drainTimeoutMs: -1 }, /drainTimeoutMs: must be a number of milliseconds/],
      [{ log: { format: "xml" } }, /log\.format: must be "json" or "text"/],
      [{ log: { level: "loud" } }, /log\.level: must be one of debug, info, warn, error/],
    ];
    for (const [value, message] of cases) {
      assert.throws(() => parseServiceConfig(value, "x.json"), (error: unknown) => error instanceof ServiceConfigError && message.test(error.message), JSON.stringify(value));
    }
    const ok = parseServiceConfig({ $comment: "mine", host: "::1", tiers: { a: { port: 0, model: "m" }, b: { port: 0, model: "m" } }, sidecar: { env: { LOCALMLX_MAX_TOKENS: 512, LOCALMLX_AUTO_DOWNLOAD: true } } });
    assert.deepEqual(ok.sidecar.env, { LOCALMLX_MAX_TOKENS: "512", LOCALMLX_AUTO_DOWNLOAD: "true" });
    assert.equal(ok.host, "::1");
  });

  test("where it is looked for: LOCALMLX_SERVE_CONFIG, then the platform's config dir; no file there means the defaults", () => {
    assert.equal(defaultConfigPath({}, "darwin", "/Users/me"), "/Users/me/Library/Application Support/localmlx/serve.json");
    assert.equal(defaultConfigPath({}, "linux", "/home/me"), "/home/me/.config/localmlx/serve.json");
    assert.equal(defaultConfigPath({ XDG_CONFIG_HOME: "/cfg" }, "linux", "/home/me"), "/cfg/localmlx/serve.json");
    assert.equal(defaultConfigPath({ LOCALMLX_SERVE_CONFIG: "/etc/x.json" }, "linux", "/home/me"), "/etc/x.json");
    const empty = configFile({}).dir;
    assert.deepEqual(loadServiceConfig({ env: { XDG_CONFIG_HOME: empty }, platform: "linux" }), { config: defaultServiceConfig(), path: undefined });
    assert.throws(() => loadServiceConfig({ env: { LOCALMLX_SERVE_CONFIG: `${empty}/missing.json` } }), /missing\.json: no such file/);
    const file = configFile("{ not json");
    assert.throws(() => loadServiceConfig({ path: file.path }), /serve\.json: not valid JSON/);
  });
});

describe("the service's log", () => {
  test("one line per event whatever the values hold; levels below the threshold are dropped", () => {
    const lines: string[] = [];
    const json = new ServiceLog("json", "info", (line) => lines.push(line));
    json.debug("not shown");
    json.info("line\nbreak \"quoted\"", { model: "a\nb", port: 8081, ok: true, none: undefined });
    assert.equal(lines.length, 1);
    assert.ok(lines[0]!.endsWith("\n") && !lines[0]!.slice(0, -1).includes("\n"));
    const record = JSON.parse(lines[0]!);
    assert.equal(record.msg, 'line\nbreak "quoted"');
    assert.deepEqual([record.level, record.model, record.port, record.ok, "none" in record], ["info", "a\nb", 8081, true, false]);

    const text = new ServiceLog("text", "debug", (line) => lines.push(line));
    text.warn("two\nlines", { path: "/v1/chat/completions", error: 'bad "thing" here', n: 3, list: ["a", "b"] });
    const line = lines[1]!;
    assert.equal(line.split("\n").length, 2, "one line");
    assert.match(line, /^\d{4}-\d\d-\d\dT[\d:.]+Z WARN two\\nlines path=\/v1\/chat\/completions error="bad \\"thing\\" here" n=3 list=\["a","b"\]\n$/);
  });
});

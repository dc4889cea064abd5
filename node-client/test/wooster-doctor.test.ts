/**
 * The readiness checks (src/wooster-readiness.ts) and `localmlx-client wooster-doctor`: each
 * finding, from Wooster-shaped temp dirs with their own .env files, against real endpoints on
 * ephemeral ports: the localmlx endpoint (the demo model for chat, a tiny Qwen3-Embedding for
 * embeddings), a localmlx endpoint whose sidecar cannot start (it answers from its remote
 * fallback), a loopback OpenAI-compatible server that is not localmlx, a slow one, a closed port.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import {
  checkWooster,
  checkWoosterEndpoints,
  checkWoosterEnv,
  checkWoosterInstall,
  readWoosterEnv,
  startOpenAIServer,
  woosterRouting,
  type OpenAIServer,
  type ReadinessFinding,
} from "../src/index";
import { buildFamilyModel, fixtures, freePort, modelsDir, packageRoot, python } from "./helpers";

const execFileAsync = promisify(execFile);
const bin = join(packageRoot, "bin", "localmlx-client.cjs");
const T = { timeout: 120_000 };

function finding(findings: ReadinessFinding[], id: string): ReadinessFinding {
  const found = findings.find((f) => f.id === id);
  assert.ok(found, `no finding ${id} in ${findings.map((f) => f.id).join(", ")}`);
  return found;
}

/** A loopback HTTP server answering every request with `handler`. */
async function serve(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ server: Server; url: string }> {
  const server = createServer(handler);
  await new Promise<void>((resolveListen) => server.listen(0, "127.0.0.1", resolveListen));
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

const MODEL_LIST = '{"object":"list","data":[{"id":"other-model","object":"model"}]}';

describe("Wooster readiness: the doctor's and the plugin's checks", () => {
  const root = mkdtempSync(join(tmpdir(), "localmlx-doctor-"));
  let endpoint: OpenAIServer;
  let remoteOnly: OpenAIServer;
  let chat = "";
  let embeddings = "";
  let dimensions = 0;
  let other: { server: Server; url: string };
  let slow: { server: Server; url: string };
  let closed = "";

  /** Settings under which Wooster stays local on the test's endpoints. */
  function localEnv(extra: Record<string, string | undefined> = {}): Record<string, string | undefined> {
    return {
      ROUTING_LOCAL_ENABLED: "true",
      ROUTING_LOCAL_SERVER_URL: chat,
      ROUTING_ROUTER_URL: chat,
      ROUTING_FAST_URL: chat,
      ROUTING_THINKING_URL: chat,
      MLX_EMBEDDINGS_ENABLED: "true",
      MLX_EMBEDDINGS_URL: `${embeddings}/v1`,
      MLX_EMBEDDINGS_DIMENSIONS: String(dimensions),
      ...extra,
    };
  }

  /** A Wooster-shaped checkout: the stand-in host, Node 20 allowed (CI's), the plugin installed, @localmlx/client linked, a .env. */
  let checkouts = 0;
  function checkout(dotenv: string, options: { plugin?: boolean; linked?: boolean; nodeModules?: boolean } = {}): string {
    const dir = join(root, `wooster-${++checkouts}`);
    cpSync(join(fixtures, "wooster-host"), dir, { recursive: true });
    writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "wooster", private: true, engines: { node: ">=20" } }));
    if (options.nodeModules !== false) mkdirSync(join(dir, "node_modules", "@localmlx"), { recursive: true });
    if (options.plugin !== false) cpSync(join(packageRoot, "wooster"), join(dir, "src", "plugins", "localMLX"), { recursive: true, filter: (f) => !f.endsWith("tsconfig.json") });
    if (options.linked !== false && options.nodeModules !== false) symlinkSync(packageRoot, join(dir, "node_modules", "@localmlx", "client"), "dir");
    writeFileSync(join(dir, ".env"), dotenv);
    return dir;
  }

  function dotenvOf(env: Record<string, string | undefined>): string {
    return Object.entries(env)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${v}`)
      .join("\n");
  }

  /** The doctor as a user runs it, with nothing of this process's environment that steers Wooster. */
  async function doctor(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    const env: NodeJS.ProcessEnv = {};
    for (const [k, v] of Object.entries(process.env)) if (!/^(LOCALMLX_|OPENAI_|PLUGIN_|ROUTING_|MLX_)/.test(k)) env[k] = v;
    try {
      const { stdout, stderr } = await execFileAsync(process.execPath, [bin, "wooster-doctor", ...args], { env, timeout: 60_000 });
      return { code: 0, stdout, stderr };
    } catch (error) {
      const e = error as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  }

  before(async () => {
    const embeddingModel = buildFamilyModel("qwen3-embedding");
    endpoint = await startOpenAIServer({
      listen: [
        { port: 0, host: "127.0.0.1", aliases: { "*": "demo" } },
        { port: 0, host: "127.0.0.1", aliases: { "*": embeddingModel } },
      ],
      localmlx: { env: { LOCALMLX_MODELS_DIR: modelsDir }, python },
      fallback: false,
    });
    [chat, embeddings] = endpoint.addresses.map((a) => `http://127.0.0.1:${a.port}`) as [string, string];
    const size = await fetch(`${embeddings}/v1/embeddings`, { method: "POST", headers: { "content-type": "application/json" }, body: '{"input":"x","model":"any"}' });
    dimensions = ((await size.json()) as { data: Array<{ embedding: number[] }> }).data[0]!.embedding.length;
    // Not localmlx: lists a model, and embeds with 8 dimensions whatever is asked.
    other = await serve((req, res) => {
      const embedding = req.method === "POST" && req.url === "/v1/embeddings";
      req.resume().on("end", () =>
        res.writeHead(200, { "content-type": "application/json" }).end(embedding ? JSON.stringify({ object: "list", data: [{ index: 0, embedding: Array(8).fill(0.25) }] }) : MODEL_LIST),
      );
    });
    // A localmlx endpoint whose sidecar cannot start, falling back to `other` as its remote.
    remoteOnly = await startOpenAIServer({
      listen: [{ port: 0, host: "127.0.0.1" }],
      localmlx: { python: "/nonexistent/python3" },
      fallback: { baseURL: `${other.url}/v1`, apiKey: "sk-test" },
    });
    // Slow to list its models the first two times (it is starting), then quick.
    let asked = 0;
    slow = await serve((_req, res) => {
      const wait = ++asked <= 2 ? 400 : 0;
      setTimeout(() => res.writeHead(200, { "content-type": "application/json", "x-localmlx-served-by": "local" }).end(MODEL_LIST), wait);
    });
    closed = `http://127.0.0.1:${await freePort()}`;
  });

  after(async () => {
    await Promise.all([endpoint?.close(), remoteOnly?.close()]);
    other?.server.close();
    slow?.server.close();
    rmSync(root, { recursive: true, force: true });
  });

  test("all local: every finding ok, staysLocal, and the doctor exits 0 saying so (text and --json)", T, async () => {
    const dir = checkout(dotenvOf(localEnv({ PLUGIN_LOCALMLX_ENABLED: "true" })));
    const { env } = readWoosterEnv(dir, {});
    const result = await checkWooster({ dir, env });
    const notOk = result.findings.filter((f) => f.level !== "ok");
    assert.deepEqual(notOk, []);
    assert.equal(result.staysLocal, true);
    assert.deepEqual(
      result.findings.map((f) => f.id),
      ["node", "dependencies", "plugin", "package", "plugin-enabled", "routing", "url:local", "url:router", "url:fast", "url:thinking", "url:embeddings", "embeddings", "embedding-dimensions", "openai-key", "localmlx-fallback", "endpoint:local", "endpoint:router", "endpoint:fast", "endpoint:thinking", "endpoint:embeddings", "embedding-model"],
    );
    assert.match(finding(result.findings, "endpoint:fast").message, /is localmlx, answering in \d+ ms/);
    assert.match(finding(result.findings, "embedding-model").message, new RegExp(`gives ${dimensions}-dimensional vectors, as MLX_EMBEDDINGS_DIMENSIONS says`));

    const text = await doctor([dir]);
    assert.equal(text.code, 0, text.stdout + text.stderr);
    assert.match(text.stdout, /^Wooster at .*: settings from .*\.env under this shell's environment/);
    assert.match(text.stdout, /\n {2}ok {4}endpoint:local +http:\/\/127\.0\.0\.1:\d+\/v1\/models is localmlx/);
    assert.match(text.stdout, /\nWooster will stay local\.\n$/);
    const json = await doctor([dir, "--json"]);
    assert.equal(json.code, 0);
    const parsed = JSON.parse(json.stdout) as { staysLocal: boolean; findings: ReadinessFinding[]; dotenv: string };
    assert.equal(parsed.staysLocal, true);
    assert.equal(parsed.dotenv, join(dir, ".env"));
    assert.deepEqual(parsed.findings.map((f) => [f.id, f.level]), result.findings.map((f) => [f.id, f.level]));
  });

  test("the issue's recipe (no ROUTING_LOCAL_ENABLED, in-process endpoint, no embeddings setting): the doctor exits 1, each FAIL with its fix", T, async () => {
    const dir = checkout(["PLUGIN_LOCALMLX_ENABLED=true", "LOCALMLX_AUTO_START_SERVER=true", "LOCALMLX_SERVE_TIERS=true", `ROUTING_FAST_URL=${closed}`, `ROUTING_ROUTER_URL=${closed}`, `ROUTING_THINKING_URL=${closed}`].join("\n"));
    const run = await doctor([dir]);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.match(run.stdout, /\n {2}FAIL {2}routing +Wooster's agent does not try local models.*\n +fix: set ROUTING_LOCAL_ENABLED=true\n/);
    assert.match(run.stdout, /\n {2}FAIL {2}embeddings +MLX_EMBEDDINGS_ENABLED is not true: Wooster embeds project documents with OpenAI.*\n +fix: set MLX_EMBEDDINGS_ENABLED=true/);
    assert.match(run.stdout, /\n {2}WARN {2}auto-start-server +LOCALMLX_AUTO_START_SERVER is on: .*\n +fix: start the localmlx endpoint before Wooster.*localmlx-client serve/);
    assert.match(run.stdout, /\n {2}FAIL {2}endpoint:fast +nothing answers at http:\/\/127\.0\.0\.1:\d+\/v1\/models \(ECONNREFUSED\)/);
    assert.match(run.stdout, /\nWooster will NOT stay local: 5 FAIL above \(1 warning\)\.\n$/);
  });

  test("usage: no directory, a directory that is not Wooster, an unknown option: exit 2", async () => {
    const none = await doctor([]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /which Wooster checkout\?/);
    const notWooster = join(root, "not-wooster");
    mkdirSync(notWooster, { recursive: true });
    writeFileSync(join(notWooster, "package.json"), "{}");
    const wrong = await doctor([notWooster]);
    assert.equal(wrong.code, 2);
    assert.match(wrong.stderr, /not a Wooster checkout: .*Nothing was checked/);
    const option = await doctor([notWooster, "--jsn"]);
    assert.equal(option.code, 2);
    assert.match(option.stderr, /unknown option --jsn/);
  });

  describe("the settings, read from .env as Wooster reads them", () => {
    const envOf = (dotenv: string) => readWoosterEnv(checkout(dotenv, { plugin: false }), {}).env;

    test(".env is parsed by dotenv (quotes, comments, export), and the process environment wins over it", () => {
      const dir = checkout('# comment\nexport ROUTING_FAST_URL="http://127.0.0.1:9999" # trailing\nMLX_EMBEDDINGS_MODEL=\'a b\'\nROUTING_LOCAL_ENABLED=false\n', { plugin: false });
      const { env, dotenvFile } = readWoosterEnv(dir, { ROUTING_LOCAL_ENABLED: "true" });
      assert.equal(dotenvFile, join(dir, ".env"));
      assert.equal(env.ROUTING_FAST_URL, "http://127.0.0.1:9999");
      assert.equal(env.MLX_EMBEDDINGS_MODEL, "a b");
      assert.equal(env.ROUTING_LOCAL_ENABLED, "true");
    });

    test("routing: local only with ROUTING_LOCAL_ENABLED=true or an explicit ROUTING_STRATEGY=intelligent; ROUTING_ENABLED=false sends all to OpenAI", () => {
      assert.equal(finding(checkWoosterEnv(envOf("")), "routing").level, "fail");
      assert.equal(finding(checkWoosterEnv(envOf("ROUTING_LOCAL_ENABLED=TRUE")), "routing").level, "fail", "Wooster compares with 'true' exactly");
      assert.equal(finding(checkWoosterEnv(envOf("ROUTING_LOCAL_ENABLED=true")), "routing").level, "ok");
      assert.equal(finding(checkWoosterEnv(envOf("ROUTING_STRATEGY=intelligent")), "routing").level, "ok");
      const off = finding(checkWoosterEnv(envOf("ROUTING_LOCAL_ENABLED=true\nROUTING_ENABLED=false")), "routing");
      assert.equal(off.level, "fail");
      assert.match(off.message, /ROUTING_ENABLED=false: .* every agent call to OpenAI/);
      // Which endpoints Wooster calls follows the same decisions.
      assert.deepEqual(woosterRouting(envOf("")).tiers.map((t) => t.name), ["router", "fast", "thinking"]);
      assert.deepEqual(woosterRouting(envOf("ROUTING_LOCAL_ENABLED=true\nROUTING_STRATEGY=speed\nMLX_EMBEDDINGS_ENABLED=true")).tiers.map((t) => t.name), ["local", "embeddings"]);
      assert.deepEqual(
        woosterRouting(envOf("ROUTING_LOCAL_ENABLED=true\nMLX_EMBEDDINGS_ENABLED=true")).tiers.map((t) => [t.name, t.healthUrl]),
        [
          ["local", "http://127.0.0.1:8081/v1/models"],
          ["router", "http://127.0.0.1:8080/v1/models"],
          ["fast", "http://127.0.0.1:8081/v1/models"],
          ["thinking", "http://127.0.0.1:8083/v1/models"],
          ["embeddings", "http://127.0.0.1:8084/v1/models"],
        ],
        "Wooster's defaults",
      );
    });

    test("plugin-enabled: PLUGIN_LOCALMLX_ENABLED other than true skips the plugin (warn); unset loads it", () => {
      assert.equal(finding(checkWoosterEnv(envOf("PLUGIN_LOCALMLX_ENABLED=false")), "plugin-enabled").level, "warn");
      assert.equal(finding(checkWoosterEnv(envOf("PLUGIN_LOCALMLX_ENABLED=yes")), "plugin-enabled").level, "warn", "Wooster loads it only for 'true'");
      assert.match(finding(checkWoosterEnv(envOf("")), "plugin-enabled").message, /unset: Wooster loads plugins unless told not to/);
    });

    test("tier URLs: not a URL (fail), not on this machine (warn), a chat tier ending in /v1 (fail: Wooster adds /v1 itself)", () => {
      const findings = checkWoosterEnv(envOf("ROUTING_LOCAL_ENABLED=true\nROUTING_ROUTER_URL=nonsense\nROUTING_THINKING_URL=http://192.168.1.20:8083\nROUTING_FAST_URL=http://127.0.0.1:8081/v1"));
      assert.equal(finding(findings, "url:router").level, "fail");
      assert.match(finding(findings, "url:router").message, /ROUTING_ROUTER_URL=nonsense is not a URL/);
      assert.equal(finding(findings, "url:thinking").level, "warn");
      assert.match(finding(findings, "url:thinking").message, /is not on this machine/);
      assert.equal(finding(findings, "url:fast").level, "fail");
      assert.equal(finding(findings, "url:fast").fix, "set ROUTING_FAST_URL=http://127.0.0.1:8081");
      assert.equal(finding(findings, "url:local").level, "ok");
      assert.match(finding(findings, "url:local").message, /ROUTING_LOCAL_SERVER_URL, Wooster's default/);
    });

    test("embeddings: off sends them to OpenAI (fail); MLX_EMBEDDINGS_DIMENSIONS must be a number (fail), default 4096", () => {
      assert.equal(finding(checkWoosterEnv(envOf("")), "embeddings").level, "fail");
      const on = checkWoosterEnv(envOf("MLX_EMBEDDINGS_ENABLED=true"));
      assert.equal(finding(on, "embeddings").level, "ok");
      assert.match(finding(on, "embedding-dimensions").message, /4096-dimensional vectors \(MLX_EMBEDDINGS_DIMENSIONS unset: Wooster's default/);
      assert.equal(finding(checkWoosterEnv(envOf("MLX_EMBEDDINGS_ENABLED=true\nMLX_EMBEDDINGS_DIMENSIONS=big")), "embedding-dimensions").level, "fail");
    });

    test("OPENAI_API_KEY: set or not, ok, saying what happens when local does not answer; the placeholder counts as unset", () => {
      assert.match(finding(checkWoosterEnv(envOf("OPENAI_API_KEY=sk-x")), "openai-key").message, /is set: where a local endpoint does not answer .*uses OpenAI with it/);
      assert.match(finding(checkWoosterEnv(envOf("")), "openai-key").message, /is not set/);
      assert.match(finding(checkWoosterEnv(envOf("OPENAI_API_KEY=YOUR_OPENAI_API_KEY_HERE")), "openai-key").message, /is not set/);
    });

    test("LOCALMLX_FALLBACK_TO_OPENAI on (warn), LOCALMLX_AUTO_START_SERVER on (warn: Wooster checked before plugins loaded)", () => {
      const findings = checkWoosterEnv(envOf("LOCALMLX_FALLBACK_TO_OPENAI=true\nLOCALMLX_AUTO_START_SERVER=1"));
      assert.equal(finding(findings, "localmlx-fallback").level, "warn");
      assert.equal(finding(findings, "auto-start-server").level, "warn");
      assert.equal(finding(checkWoosterEnv(envOf("")), "localmlx-fallback").level, "ok");
      assert.equal(checkWoosterEnv(envOf("")).some((f) => f.id === "auto-start-server"), false);
    });
  });

  describe("the checkout", () => {
    test("node: older than Wooster's engines fails; no engines: Node 22 wanted, newer warns", () => {
      const dir = checkout("");
      assert.equal(finding(checkWoosterInstall(dir, { nodeVersion: "v18.20.0" }), "node").level, "fail");
      assert.equal(finding(checkWoosterInstall(dir, { nodeVersion: "v20.1.0" }), "node").level, "ok");
      writeFileSync(join(dir, "package.json"), '{"name":"wooster"}');
      assert.equal(finding(checkWoosterInstall(dir, { nodeVersion: "v20.19.0" }), "node").level, "fail");
      assert.match(finding(checkWoosterInstall(dir, { nodeVersion: "v20.19.0" }), "node").message, /Wooster's README asks for Node\.js 22 LTS/);
      assert.equal(finding(checkWoosterInstall(dir, { nodeVersion: "v22.12.0" }), "node").level, "ok");
      assert.equal(finding(checkWoosterInstall(dir, { nodeVersion: "v24.1.0" }), "node").level, "warn");
    });

    test("dependencies, plugin and package: each missing, and a plugin that differs from this package's", () => {
      const bare = checkout("", { nodeModules: false, plugin: false });
      const findings = checkWoosterInstall(bare);
      assert.equal(finding(findings, "dependencies").level, "fail");
      assert.equal(finding(findings, "plugin").level, "warn");
      assert.match(finding(findings, "plugin").fix!, /^run `localmlx-client wooster-install /);
      assert.equal(findings.some((f) => f.id === "package"), false, "no plugin, no package to look for");

      const unlinked = checkout("", { linked: false });
      assert.equal(finding(checkWoosterInstall(unlinked), "package").level, "fail");
      assert.match(finding(checkWoosterInstall(unlinked), "package").message, /does not resolve from the plugin folder: Wooster cannot load the plugin/);

      const old = checkout("");
      writeFileSync(join(old, "src", "plugins", "localMLX", "config.ts"), "// an older plugin\n");
      const oldFindings = checkWoosterInstall(old);
      assert.equal(finding(oldFindings, "plugin").level, "warn");
      assert.match(finding(oldFindings, "plugin").message, /\(config\.ts differ\)/);
      assert.match(finding(oldFindings, "package").message, /@localmlx\/client 0\.1\.0 resolves from the plugin folder/);
    });
  });

  describe("the endpoints, asked as Wooster asks them", () => {
    test("a closed port: fail, saying what Wooster does instead, with the service as the fix", T, async () => {
      const findings = await checkWoosterEndpoints(localEnv({ ROUTING_LOCAL_SERVER_URL: closed, MLX_EMBEDDINGS_URL: `${closed}/v1` }));
      const local = finding(findings, "endpoint:local");
      assert.equal(local.level, "fail");
      assert.match(local.message, /nothing answers at .*\(ECONNREFUSED\): Wooster's agent falls back to OpenAI for the whole session/);
      assert.match(local.fix!, /localmlx-client serve/);
      assert.match(finding(findings, "endpoint:embeddings").message, /Wooster's embeddings fail/);
      assert.equal(findings.some((f) => f.id === "embedding-model"), false, "no embedding asked of a closed port");
      assert.equal(finding(findings, "endpoint:fast").level, "ok");
    });

    test("an OpenAI-compatible server that is not localmlx: warn", T, async () => {
      const found = finding(await checkWoosterEndpoints(localEnv({ ROUTING_ROUTER_URL: other.url })), "endpoint:router");
      assert.equal(found.level, "warn");
      assert.match(found.message, /answers, but is not localmlx \(no x-localmlx-served-by header\)/);
    });

    test("a localmlx endpoint answering from its remote fallback: fail", T, async () => {
      const found = finding(await checkWoosterEndpoints(localEnv({ ROUTING_THINKING_URL: remoteOnly.url.replace(/\/v1$/, "") })), "endpoint:thinking");
      assert.equal(found.level, "fail");
      assert.match(found.message, /answering from its remote fallback/);
    });

    test("a chat tier URL ending in /v1: Wooster's health check gets a 404 (fail)", T, async () => {
      const found = finding(await checkWoosterEndpoints(localEnv({ ROUTING_FAST_URL: `${chat}/v1` })), "endpoint:fast");
      assert.equal(found.level, "fail");
      assert.match(found.message, /\/v1\/v1\/models answers HTTP 404: Unknown path \/v1\/v1\/models: Wooster counts it down/);
      assert.equal(found.fix, `set ROUTING_FAST_URL=${chat}`);
    });

    test("slower than ROUTING_HEALTH_TIMEOUT twice: fail; slow only while starting: ok, said", T, async () => {
      const env = localEnv({ ROUTING_HEALTH_TIMEOUT: "150", ROUTING_ROUTER_URL: slow.url });
      const twice = finding(await checkWoosterEndpoints(env), "endpoint:router");
      assert.equal(twice.level, "fail");
      assert.match(twice.message, /answered in \d+ ms, twice: Wooster gives up after 150 ms \(ROUTING_HEALTH_TIMEOUT\)/);
      const later = finding(await checkWoosterEndpoints(env), "endpoint:router");
      assert.equal(later.level, "ok", later.message);
    });

    test("embedding dimensions: more than the model's is refused (fail), fewer are its first components (ok); each fix names the size", T, async () => {
      const more = finding(await checkWoosterEndpoints(localEnv({ MLX_EMBEDDINGS_DIMENSIONS: "4096" })), "embedding-model");
      assert.equal(more.level, "fail");
      assert.match(more.message, new RegExp(`gives ${dimensions}-dimensional vectors, and Wooster asks for 4096 .*the endpoint refuses \\(HTTP 400`));
      assert.match(more.fix!, new RegExp(`^set MLX_EMBEDDINGS_DIMENSIONS=${dimensions} \\(or less\\)`));
      const fewer = finding(await checkWoosterEndpoints(localEnv({ MLX_EMBEDDINGS_DIMENSIONS: String(dimensions - 1) })), "embedding-model");
      assert.equal(fewer.level, "ok", fewer.message);
      // A server that ignores `dimensions` (not localmlx) gives its own size: the wrong one.
      const ignoring = await checkWoosterEndpoints(localEnv({ MLX_EMBEDDINGS_URL: `${other.url}/v1`, MLX_EMBEDDINGS_DIMENSIONS: "16" }));
      assert.equal(finding(ignoring, "endpoint:embeddings").level, "warn");
      const wrong = finding(ignoring, "embedding-model");
      assert.equal(wrong.level, "fail");
      assert.match(wrong.message, /gives 8-dimensional vectors, and Wooster asks for 16 \(MLX_EMBEDDINGS_DIMENSIONS\): its vector stores get vectors of the wrong size/);
      assert.match(wrong.fix!, /^set MLX_EMBEDDINGS_DIMENSIONS=8, then run `rebuild embeddings` in Wooster$/);
    });

    test("an embeddings URL serving a chat model: the endpoint answers, the embedding does not (fail)", T, async () => {
      const found = finding(await checkWoosterEndpoints(localEnv({ MLX_EMBEDDINGS_URL: `${chat}/v1` })), "embedding-model");
      assert.equal(found.level, "fail");
      assert.match(found.message, /does not embed with Qwen\/Qwen3-Embedding-8B \(HTTP 400: .*not an embedding model\): Wooster's embeddings fail/);
    });
  });
});

/**
 * The Wooster plugin (node-client/wooster/) as Wooster runs it: installed into a stand-in Wooster
 * checkout (test/fixtures/wooster-host: Wooster's plugin loader and tsconfig) by the installer,
 * compiled there as CommonJS with the real @langchain/core, and loaded the way Wooster's
 * PluginManager loads plugins, in a separate Node process per scenario, against the real sidecar
 * and the demo model.
 */
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { startOpenAIServer, type OpenAIServer, type ReadinessFinding } from "../src/index";
import { readSettings } from "../wooster/config";
import { buildFamilyModel, buildShortContextDemo, fixtures, freePort, modelsDir, packageRoot, processGone, python, waitFor } from "./helpers";

const execFileAsync = promisify(execFile);
const installer = join(packageRoot, "bin", "localmlx-client.cjs");
const tsc = join(packageRoot, "node_modules", "typescript", "bin", "tsc");
const T = { timeout: 120_000 };
/** A Python without localmlx and MLX (the system's), or, where there is none, no interpreter at all: either way the sidecar cannot start. */
const pythonWithoutMLX = existsSync("/usr/bin/python3") ? "/usr/bin/python3" : "/nonexistent/python3";

/** A port nothing listens on: Wooster's tier URLs point there unless a scenario says otherwise, so the plugin's start-up checks ask nothing real. */
let closedPort = 0;

/** The environment of a stand-in Wooster process: only what each scenario sets, nothing inherited that steers the plugin or Wooster's routing. */
function hostEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^(LOCALMLX_|OPENAI_|PLUGIN_|TOOLS_|HF_|ROUTING_|MLX_)/.test(key)) env[key] = value;
  }
  const nowhere = `http://127.0.0.1:${closedPort}`;
  return {
    ...env,
    ROUTING_LOCAL_SERVER_URL: nowhere,
    ROUTING_ROUTER_URL: nowhere,
    ROUTING_FAST_URL: nowhere,
    ROUTING_THINKING_URL: nowhere,
    MLX_EMBEDDINGS_URL: `${nowhere}/v1`,
    PLUGIN_LOCALMLX_ENABLED: "true",
    LOCALMLX_PYTHON: python,
    LOCALMLX_MODELS_DIR: modelsDir,
    LOCALMLX_MAX_TOKENS: "24",
    HF_HUB_OFFLINE: "1",
    ...extra,
  };
}

interface Report {
  fatal?: string;
  plugins: string[];
  tools: string[];
  toolClasses: string[];
  serviceRegistered: boolean;
  childrenBefore: number[];
  pidBefore: number | null;
  pidAfterFirstUse?: number;
  pid?: number | null;
  children?: number[];
  childrenAfter?: number[];
  singles?: string[];
  url?: string;
  pidAtInit?: number;
  httpStatus?: number;
  httpObject?: string;
  tierStatus?: number;
  tierServedBy?: string | null;
  findings?: ReadinessFinding[];
  endpointFindings?: ReadinessFinding[];
  remoteRequests?: Array<{ path: string; auth?: string; body?: { model?: string } }>;
  outputs: Record<string, string>;
  logs?: string[];
}

const TEN = [
  "local_chat",
  "local_generate",
  "local_code_assist",
  "local_summarize",
  "list_local_models",
  "download_model",
  "switch_model",
  "model_status",
  "intelligent_route",
  "batch_process",
];

describe("the Wooster plugin", () => {
  const root = mkdtempSync(join(tmpdir(), "localmlx-wooster-"));
  const wooster = join(root, "wooster");
  let installOutput = "";

  /** Runs the stand-in Wooster (`dist/main.js <scenario>`) and parses its report. */
  async function host(scenario: string, env: Record<string, string> = {}): Promise<Report> {
    const { stdout } = await execFileAsync(process.execPath, [join(wooster, "dist", "main.js"), scenario], {
      cwd: wooster,
      env: hostEnv(env),
      timeout: 100_000,
      maxBuffer: 16 << 20,
    });
    const report = JSON.parse(stdout.trim().split("\n").pop()!) as Report;
    assert.equal(report.fatal, undefined, report.fatal);
    return report;
  }

  before(async () => {
    closedPort = await freePort();
    cpSync(join(fixtures, "wooster-host"), wooster, { recursive: true });
    const { stdout } = await execFileAsync(process.execPath, [installer, "wooster-install", wooster, "--no-install"]);
    installOutput = stdout;
    // What `npm install` would provide: this package, and Wooster's own @langchain/core.
    mkdirSync(join(wooster, "node_modules", "@localmlx"), { recursive: true });
    mkdirSync(join(wooster, "node_modules", "@langchain"), { recursive: true });
    symlinkSync(packageRoot, join(wooster, "node_modules", "@localmlx", "client"), "dir");
    symlinkSync(join(packageRoot, "node_modules", "@langchain", "core"), join(wooster, "node_modules", "@langchain", "core"), "dir");
    symlinkSync(join(packageRoot, "node_modules", "@types"), join(wooster, "node_modules", "@types"), "dir");
    symlinkSync(join(packageRoot, "node_modules", "dotenv"), join(wooster, "node_modules", "dotenv"), "dir"); // Wooster's configLoader loads .env
    try {
      await execFileAsync(process.execPath, [tsc, "-p", wooster], { cwd: wooster });
    } catch (error) {
      assert.fail(`the plugin does not compile in Wooster's setup (CommonJS):\n${(error as { stdout: string }).stdout}`);
    }
  });
  after(() => rmSync(root, { recursive: true, force: true }));

  describe("the installer", () => {
    test("copies the plugin into src/plugins/localMLX/ and adds the dependency", () => {
      const installed = readdirSync(join(wooster, "src", "plugins", "localMLX")).sort();
      const shipped = readdirSync(join(packageRoot, "wooster")).filter((f) => f.endsWith(".ts")).sort();
      assert.deepEqual(installed, shipped);
      assert.ok(installed.includes("index.ts"));
      for (const file of installed) {
        assert.equal(readFileSync(join(wooster, "src", "plugins", "localMLX", file), "utf8"), readFileSync(join(packageRoot, "wooster", file), "utf8"));
      }
      const pkg = JSON.parse(readFileSync(join(wooster, "package.json"), "utf8")) as { dependencies: Record<string, string> };
      assert.match(pkg.dependencies["@localmlx/client"]!, /^file:.*node-client$/);
      assert.equal(pkg.dependencies["@langchain/core"], "*");
      assert.match(installOutput, /add src\/plugins\/localMLX\/index\.ts/);
      assert.match(installOutput, /PLUGIN_LOCALMLX_ENABLED=true/);
    });

    test("is idempotent: a second run changes nothing", async () => {
      const before = readFileSync(join(wooster, "package.json"), "utf8");
      const { stdout } = await execFileAsync(process.execPath, [installer, "wooster-install", wooster, "--no-install"]);
      assert.match(stdout, /already installed and up to date/);
      assert.equal(readFileSync(join(wooster, "package.json"), "utf8"), before);
    });

    test("refuses a directory that is not a Wooster checkout, and changes nothing there", async () => {
      const other = join(root, "not-wooster");
      mkdirSync(join(other, "src"), { recursive: true });
      writeFileSync(join(other, "package.json"), '{"name":"something-else"}\n');
      await assert.rejects(execFileAsync(process.execPath, [installer, "wooster-install", other, "--no-install"]), (error: Error & { code?: number; stderr?: string }) => {
        assert.equal(error.code, 2);
        assert.match(error.stderr ?? "", /not a Wooster checkout: .*pluginManager\.ts.*Nothing was changed/);
        return true;
      });
      assert.equal(existsSync(join(other, "src", "plugins")), false);
      assert.equal(readFileSync(join(other, "package.json"), "utf8"), '{"name":"something-else"}\n');
    });

    test("--spec names the dependency; a pnpm checkout gets link:", async () => {
      const copy = join(root, "wooster-pnpm");
      cpSync(join(fixtures, "wooster-host"), copy, { recursive: true });
      writeFileSync(join(copy, "pnpm-lock.yaml"), "lockfileVersion: '9.0'\n");
      await execFileAsync(process.execPath, [installer, "wooster-install", copy, "--no-install"]);
      const deps = (JSON.parse(readFileSync(join(copy, "package.json"), "utf8")) as { dependencies: Record<string, string> }).dependencies;
      assert.match(deps["@localmlx/client"]!, /^link:/);
      await execFileAsync(process.execPath, [installer, "wooster-install", copy, "--no-install", "--spec", "^0.1.0"]);
      const again = (JSON.parse(readFileSync(join(copy, "package.json"), "utf8")) as { dependencies: Record<string, string> }).dependencies;
      assert.equal(again["@localmlx/client"], "^0.1.0");
    });
  });

  test("loads as Wooster loads it; starts nothing before first use; all ten tools work on the real sidecar; no sidecar after exit", T, async () => {
    // local_summarize splits what does not fit the context: a 2048-position demo makes that cheap.
    const report = await host("tools", { TEST_SHORT_CONTEXT_MODEL: buildShortContextDemo() });
    assert.deepEqual(report.plugins, ["localMLX"]);
    assert.deepEqual(report.tools, [...TEN, "local_vision"]); // local_vision: test/vision.test.ts
    assert.deepEqual(report.toolClasses, ["DynamicTool"]);
    assert.equal(report.serviceRegistered, true);
    assert.deepEqual(report.childrenBefore, [], "no child process before the first tool call");
    assert.equal(report.pidBefore, null);
    assert.equal(typeof report.pidAfterFirstUse, "number");
    assert.deepEqual(report.childrenAfter, [report.pid], "one sidecar, for every tool");

    const out = report.outputs;
    for (const [name, text] of Object.entries(out)) {
      assert.equal(typeof text, "string", name);
      assert.doesNotMatch(text, /^(THREW|NOT A STRING|NO TOOL)/, `${name}: ${text}`);
      assert.ok(text.trim().length > 0, `${name} answered nothing`);
    }
    assert.match(out.list_local_models!, /^Local models \(\d+\):\n[^]*- demo \(embedded, [^)]*context 32768\) \[[^\]]*active/m);
    for (const name of ["local_chat", "local_chat_json", "local_generate", "local_code_assist"]) {
      assert.doesNotMatch(out[name]!, /could not complete|served by/, `${name}: ${out[name]}`);
    }
    assert.match(out.switch_model_short!, /^Active model is now demo-context-2048 \(was demo\): llama, [^]*context 2048,/);
    assert.match(out.local_summarize!, /\(summarized in [2-9] parts\)$/);
    assert.match(out.download_model!, /^download_model could not complete: Model not found locally: mlx-community\/not-downloaded-model-4bit \(HF_HUB_OFFLINE/);
    assert.match(out.download_model_bad!, /needs a Hugging Face repo id/);
    assert.match(out.switch_model!, /^Active model is now demo \(was demo-context-2048\): llama, 2\.6M parameters, not quantized, context 32768/);
    assert.match(out.switch_model_missing!, /^switch_model could not complete: Model not found/);
    assert.match(out.model_status!, new RegExp(`running \\(pid ${report.pid}\\)`));
    assert.match(out.model_status!, /- demo: llama, not quantized, context 32768, [\d.]+ MB, stays loaded; last speed [\d.]+ tokens\/s generating/);
    assert.match(out.model_status!, /Memory: [\d.]+ [KMG]?B active/);
    assert.match(out.intelligent_route!, /\[served by local model demo: routine work/);

    // batch_process: in input order. The first three items were asked one by one before, with
    // the same messages at temperature 0: the batch gives the same text at the same positions.
    const batch = JSON.parse(out.batch_process!) as Array<{ index: number; output: string }>;
    assert.deepEqual(batch.map((r) => r.index), [0, 1, 2, 3, 4]);
    assert.deepEqual(batch.slice(0, 3).map((r) => r.output), report.singles!.map((s) => s.trim()));

    assert.ok(report.logs!.some((l) => /\[INFO\] \[localMLX\] sidecar started \(pid \d+/.test(l)));
    assert.ok(report.logs!.every((l) => !l.endsWith(" undefined")), "log lines carry no stray metadata");
    await waitFor(() => processGone(report.pid!), 10_000, "the sidecar to end after Wooster exited");
  });

  test("download_model downloads from the Hub with progress in Wooster's log; switch_model then uses it", T, async () => {
    // The Python suite's loopback Hub (olah, offline), serving the demo model as a Hub repo.
    const hub = spawn(python, [join(fixtures, "wooster_hub.py"), join(modelsDir, "localmlx-demo"), join(root, "hub")], {
      stdio: ["pipe", "pipe", "inherit"],
    });
    try {
      const url = await new Promise<string>((resolveUrl, reject) => {
        let buffered = "";
        hub.stdout.on("data", (data: Buffer) => {
          buffered += data.toString();
          if (buffered.includes("\n")) resolveUrl(buffered.split("\n")[0]!.trim());
        });
        hub.once("exit", (code) => reject(new Error(`the hub exited (${code})`)));
      });
      const report = await host("download", {
        HF_ENDPOINT: url,
        HF_HUB_OFFLINE: "0",
        HF_HUB_CACHE: join(root, "hf-cache"),
        HF_HUB_DISABLE_TELEMETRY: "1",
      });
      const out = report.outputs;
      assert.match(out.download_model!, /^Downloaded mlx-community\/localmlx-demo-hub \(revision [0-9a-f]{12}\): \d+ files, [\d.]+ MB on disk, [\d.]+ MB transferred\. Stored at .*hf-cache/);
      assert.match(out.download_again!, /already downloaded/);
      assert.match(out.switch_model!, /^Active model is now mlx-community\/localmlx-demo-hub \(was [^)]*\): llama/);
      assert.doesNotMatch(out.local_chat!, /could not complete/);
      const progress = report.logs!.filter((l) => l.includes("[localMLX] download mlx-community/localmlx-demo-hub: "));
      assert.ok(progress.length >= 1, `no download progress in the log:\n${report.logs!.join("\n")}`);
      assert.ok(progress.every((l) => /^\[INFO\] \[localMLX\] download mlx-community\/localmlx-demo-hub: \S+ .+/.test(l)));
      assert.ok(progress.some((l) => /\(100%\)/.test(l)), progress.join("\n"));
    } finally {
      hub.stdin.end();
      await new Promise((resolveExit) => (hub.exitCode !== null ? resolveExit(undefined) : hub.once("exit", resolveExit)));
    }
  });

  test("process.exit() leaves no sidecar behind", T, async () => {
    const report = await host("exit");
    assert.equal(typeof report.pid, "number");
    assert.doesNotMatch(report.outputs.local_chat!, /could not complete/);
    await waitFor(() => processGone(report.pid!), 10_000, "the sidecar to end after process.exit()");
  });

  test("no MLX on this machine: every tool answers with a clear message, none throws, nothing is left running", T, async () => {
    const report = await host("nomlx", { LOCALMLX_PYTHON: pythonWithoutMLX, LOCALMLX_MODELS_DIR: join(root, "no-models") });
    assert.deepEqual(Object.keys(report.outputs).sort(), [...TEN].sort());
    for (const [name, text] of Object.entries(report.outputs)) {
      assert.match(text, new RegExp(`^${name} could not complete: Local MLX models are not available: the localmlx sidecar could not start \\(.+\\)\\. .*LOCALMLX_PYTHON`), `${name}: ${text}`);
      assert.match(text, /LOCALMLX_FALLBACK_TO_OPENAI=true/);
    }
    assert.equal(report.pid, null);
    assert.deepEqual(report.children, []);
  });

  test("LOCALMLX_FALLBACK_TO_OPENAI: generation tools are answered by the remote when local cannot serve, and say so", T, async () => {
    const report = await host("fallback", { LOCALMLX_PYTHON: pythonWithoutMLX, LOCALMLX_FALLBACK_TO_OPENAI: "true", LOCALMLX_MODELS_DIR: join(root, "no-models") });
    for (const name of ["local_chat", "local_generate", "local_code_assist", "local_summarize", "intelligent_route"]) {
      assert.match(report.outputs[name]!, /^remote says hi\n\n\[served by remote model remote-model: /, `${name}: ${report.outputs[name]}`);
    }
    assert.match(report.outputs.local_chat!, /local could not serve: the localmlx sidecar could not start/);
    const batch = JSON.parse(report.outputs.batch_process!) as Array<{ output: string; servedBy: string }>;
    assert.deepEqual(batch.map((r) => [r.output, r.servedBy]), [["remote says hi", "remote"], ["remote says hi", "remote"]]);
    // Model management has no remote: a clear message.
    for (const name of ["list_local_models", "download_model", "switch_model", "model_status"]) {
      assert.match(report.outputs[name]!, new RegExp(`^${name} could not complete: Local MLX models are not available`));
    }
    const requests = report.remoteRequests!;
    assert.ok(requests.length >= 6);
    assert.ok(requests.every((r) => r.path === "/v1/chat/completions" && r.auth === "Bearer sk-test" && r.body?.model === "gpt-4o-mini"));
    // Never silent: one warning in Wooster's log per request that left the machine, with its reason.
    const warnings = report.logs!.filter((line) => line.startsWith("[WARN] [localMLX] localmlx fallback: sending POST"));
    assert.equal(warnings.length, requests.length, report.logs!.join("\n"));
    for (const line of warnings) {
      assert.match(line, /sending POST http:\/\/127\.0\.0\.1:\d+\/v1\/chat\/completions \(model gpt-4o-mini\) off this machine: (local could not serve \(sidecar_unavailable\)|the local sidecar failed and is cooling down|intelligent_route)/);
    }
  });

  test("LOCALMLX_FALLBACK_TO_OPENAI=false: nothing reaches the remote, though a key and a server are set and local cannot serve", T, async () => {
    const report = await host("fallback", { LOCALMLX_PYTHON: pythonWithoutMLX, LOCALMLX_FALLBACK_TO_OPENAI: "false", LOCALMLX_MODELS_DIR: join(root, "no-models") });
    assert.deepEqual(report.remoteRequests, []);
    for (const name of ["local_chat", "local_generate", "intelligent_route", "local_summarize"]) {
      assert.match(report.outputs[name]!, /could not complete: Local MLX models are not available/, `${name}: ${report.outputs[name]}`);
    }
  });

  test("LOCALMLX_AUTO_START_SERVER: the OpenAI-compatible endpoint runs on the plugin's sidecar, and goes with Wooster", T, async () => {
    // Wooster's config has all three chat tiers (its defaults are :8080, :8081, :8083): each gets a free port here.
    const [router, fast, thinking] = [await freePort(), await freePort(), await freePort()];
    const report = await host("server", {
      LOCALMLX_AUTO_START_SERVER: "true",
      LOCALMLX_SERVER_URL: "http://127.0.0.1:0",
      LOCALMLX_SERVE_TIERS: "true",
      ROUTING_ROUTER_URL: `http://127.0.0.1:${router}`,
      ROUTING_FAST_URL: `http://127.0.0.1:${fast}`,
      ROUTING_THINKING_URL: `http://127.0.0.1:${thinking}`,
      ROUTING_ROUTER_MODEL: "demo",
      ROUTING_FAST_MODEL: "demo",
      ROUTING_THINKING_MODEL: "demo",
    });
    assert.equal(report.tierStatus, 200, "Wooster's fast tier URL is served, with the tier's model");
    assert.equal(report.tierServedBy, "local");
    assert.match(report.url!, /^http:\/\/127\.0\.0\.1:\d+\/v1$/);
    assert.equal(report.httpStatus, 200);
    assert.equal(report.httpObject, "chat.completion");
    assert.equal(report.pidAtInit, report.pid, "one sidecar for the endpoint and the tools");
    assert.deepEqual(report.children, [report.pid]);
    assert.doesNotMatch(report.outputs.local_chat!, /could not complete/);
    await waitFor(() => processGone(report.pid!), 10_000, "the sidecar to end after Wooster exited");
  });

  test("at start-up it warns, in Wooster's log with each fix, what keeps Wooster from staying local: settings at once, endpoints in the background", T, async () => {
    // Real endpoints: localmlx (the demo model on the fast tier, an embedding model on the
    // embeddings port), a loopback OpenAI-compatible server that is not localmlx, and a closed port.
    const embeddingModel = buildFamilyModel("qwen3-embedding");
    const endpoint: OpenAIServer = await startOpenAIServer({
      listen: [
        { port: 0, host: "127.0.0.1", aliases: { "*": "demo" } },
        { port: 0, host: "127.0.0.1", aliases: { "*": embeddingModel } },
      ],
      localmlx: { env: { LOCALMLX_MODELS_DIR: modelsDir }, python },
      fallback: false,
    });
    const other = createServer((_req, res) => res.writeHead(200, { "content-type": "application/json" }).end('{"object":"list","data":[{"id":"other"}]}'));
    await new Promise<void>((resolveListen) => other.listen(0, "127.0.0.1", resolveListen));
    try {
      const [fast, embeddings] = endpoint.addresses.map((a) => `http://127.0.0.1:${a.port}`);
      const report = await host("readiness", {
        // ROUTING_LOCAL_ENABLED unset: the recipe. LOCALMLX_AUTO_START_SERVER: its in-process mode.
        LOCALMLX_AUTO_START_SERVER: "true",
        LOCALMLX_SERVER_URL: "http://127.0.0.1:0",
        ROUTING_ROUTER_URL: `http://127.0.0.1:${(other.address() as AddressInfo).port}`,
        ROUTING_FAST_URL: fast!,
        ROUTING_THINKING_URL: `http://127.0.0.1:${closedPort}`,
        MLX_EMBEDDINGS_ENABLED: "true",
        MLX_EMBEDDINGS_URL: `${embeddings}/v1`, // MLX_EMBEDDINGS_DIMENSIONS unset: Wooster's 4096
      });
      const logs = report.logs!;
      const loaded = logs.findIndex((l) => l.includes("fixture: loadPlugins returned"));
      const warning = (id: string) => logs.findIndex((l) => l.startsWith("[WARN] [localMLX] ") && l.includes(`(${id}): `));
      // The settings: logged while Wooster loads the plugin.
      for (const id of ["routing", "auto-start-server"]) assert.ok(warning(id) >= 0 && warning(id) < loaded, `${id} before loadPlugins returned:\n${logs.join("\n")}`);
      assert.match(logs[warning("routing")]!, /not local \(routing\): Wooster's agent does not try local models: .*ROUTING_LOCAL_ENABLED=true.* Fix: set ROUTING_LOCAL_ENABLED=true\. ?$/); // Wooster's log formats the empty metadata as a space
      assert.match(logs[warning("auto-start-server")]!, /check \(auto-start-server\): .*after Wooster has checked ROUTING_LOCAL_SERVER_URL.* Fix: .*localmlx-client serve/);
      // The endpoints: after Wooster's start went on, each problem with its fix.
      for (const id of ["endpoint:router", "endpoint:thinking", "embedding-model"]) assert.ok(warning(id) > loaded, `${id} after loadPlugins returned:\n${logs.join("\n")}`);
      assert.match(logs[warning("endpoint:router")]!, /check \(endpoint:router\): .* answers, but is not localmlx/);
      assert.match(logs[warning("endpoint:thinking")]!, /not local \(endpoint:thinking\): nothing answers at .*ECONNREFUSED.* Fix: start the localmlx endpoint/);
      assert.match(logs[warning("embedding-model")]!, /not local \(embedding-model\): .* gives \d+-dimensional vectors, and Wooster asks for 4096 .* Fix: set MLX_EMBEDDINGS_DIMENSIONS=\d+/);
      assert.equal(warning("endpoint:fast"), -1, "the fast tier is localmlx: nothing to say");
      const fastFinding = report.endpointFindings!.find((f) => f.id === "endpoint:fast");
      assert.equal(fastFinding?.level, "ok", JSON.stringify(fastFinding));
      assert.ok(logs.some((l) => /\[WARN\] \[localMLX\] Wooster is not fully local .*wooster-doctor/.test(l)));
      assert.deepEqual(new Set(report.findings!.map((f) => f.id)).has("endpoint:fast"), true, "the findings are kept on the plugin");
    } finally {
      other.close();
      await endpoint.close();
    }
  });

  test("type-checks against Wooster's own WoosterPlugin, AppConfig and CoreServices (a copy with the old index signature does not)", T, async () => {
    // before() compiled src/pluginTypes.ts with Wooster's tsconfig: the plugin is a WoosterPlugin.
    assert.ok(existsSync(join(wooster, "dist", "pluginTypes.js")));
    // The check can fail: the plugin's AppConfig as it was (an index signature, which Wooster's
    // interfaces lack) is not assignable from Wooster's.
    const copy = join(root, "wooster-old-types");
    cpSync(wooster, copy, { recursive: true, dereference: false, filter: (from) => !from.includes(`${join(wooster, "dist")}`) });
    const types = join(copy, "src", "plugins", "localMLX", "types.ts");
    writeFileSync(types, readFileSync(types, "utf8").replace(/(\n  plugins\?: \{ \[key: string\]: unknown \};\n)\}/, "$1  [key: string]: unknown;\n}"));
    await assert.rejects(execFileAsync(process.execPath, [tsc, "-p", copy, "--noEmit"], { cwd: copy }), (error: { stdout: string }) => {
      assert.match(error.stdout, /pluginTypes\.ts.*(Index signature for type 'string' is missing in type 'AppConfig'|is not assignable to type 'WoosterPlugin')/s);
      return true;
    });
  });

  test("PLUGIN_LOCALMLX_ENABLED=false skips it; TOOLS_LOCALMLX_ENABLED=false keeps the service, offers no tools", T, async () => {
    const disabled = await host("load-only", { PLUGIN_LOCALMLX_ENABLED: "false" });
    assert.deepEqual(disabled.plugins, []);
    assert.equal(disabled.serviceRegistered, false);
    const noTools = await host("load-only", { TOOLS_LOCALMLX_ENABLED: "false" });
    assert.deepEqual(noTools.plugins, ["localMLX"]);
    assert.deepEqual(noTools.tools, []);
    assert.equal(noTools.serviceRegistered, true);
    assert.deepEqual(noTools.children, []);
  });
});

describe("the Wooster plugin's settings", () => {
  test("defaults, and LOCALMLX_* values the sidecar would reject are translated for it", () => {
    const defaults = readSettings(undefined, {});
    assert.equal(defaults.toolsEnabled, true);
    assert.equal(defaults.fallbackToOpenAI, false);
    assert.equal(defaults.autoStartServer, false);
    assert.equal(defaults.maxTokens, undefined, "the sidecar's default applies (LOCALMLX_MAX_TOKENS has one source)");
    assert.deepEqual(defaults.preloadModels, []);
    assert.deepEqual(defaults.sidecarEnv, { LOCALMLX_PRELOAD_MODELS: "" });

    const s = readSettings(undefined, {
      LOCALMLX_DEFAULT_MODEL: "mlx-community/Qwen2.5-3B-Instruct-4bit",
      LOCALMLX_OFFLOAD_INACTIVE: "true",
      LOCALMLX_PRELOAD_MODELS: "true",
      LOCALMLX_TEMPERATURE: "0.2",
      LOCALMLX_QUANTIZATION: "4bit",
      LOCALMLX_AUTO_DOWNLOAD: "yes",
      TOOLS_LOCALMLX_ENABLED: "false",
      OTHER: "x",
    });
    assert.equal(s.toolsEnabled, false);
    assert.equal(s.autoDownload, true);
    assert.equal(s.temperature, 0.2);
    assert.deepEqual(s.preloadModels, ["mlx-community/Qwen2.5-3B-Instruct-4bit"]);
    assert.equal(s.sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE, "5m");
    assert.equal(s.sidecarEnv.LOCALMLX_PRELOAD_MODELS, "", "the plugin preloads, in the background");
    assert.throws(() => readSettings(undefined, { LOCALMLX_MAX_TOKENS: "not a number" }), /bad LOCALMLX_MAX_TOKENS="not a number"/, "an unparsable value is an error naming it");
    assert.equal(s.sidecarEnv.LOCALMLX_QUANTIZATION, "4bit");
    assert.equal(s.sidecarEnv.OTHER, undefined);
    assert.equal(readSettings(undefined, { LOCALMLX_OFFLOAD_INACTIVE: "false" }).sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE, "-1");
    assert.equal(readSettings(undefined, { LOCALMLX_OFFLOAD_INACTIVE: "10m" }).sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE, "10m");
  });

  test("Wooster's config.plugins.localMLX object is read, and the environment wins over it", () => {
    const config = { plugins: { localMLX: { defaultModel: "demo", maxTokens: 64, fallbackToOpenai: true } } };
    const s = readSettings(config, { LOCALMLX_MAX_TOKENS: "32" });
    assert.equal(s.defaultModel, "demo");
    assert.equal(s.maxTokens, 32);
    assert.equal(s.fallbackToOpenAI, true);
    assert.equal(s.sidecarEnv.LOCALMLX_DEFAULT_MODEL, "demo");
  });
});

/**
 * The client used from an app that is not this repository: `npm pack`, installed into a temporary
 * project outside the checkout, the sidecar put into a private virtualenv by
 * `localmlx-client setup` (pip-installing this checkout), then a chat against the demo model, found
 * with no LOCALMLX_PYTHON, from an app whose cwd holds a decoy `sidecar/` package.
 *
 * Needs the built package (`npm run build`; `npm test` builds first) and pip able to build the
 * project (hatchling from the package index). It takes about 20 s.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { modelsDir, packageRoot, python, repositoryRoot } from "./helpers";

const run = promisify(execFile);
const T = { timeout: 120_000 };

const CONSUMER = `"use strict";
const { LocalMLX } = require("@localmlx/client");
(async () => {
  try {
    const mlx = await LocalMLX.start({ model: "demo" });
    try {
      let text = "";
      const prediction = mlx.chat({ messages: [{ role: "user", content: "hi" }], maxTokens: 6, temperature: 0 });
      for await (const chunk of prediction) text += chunk.text;
      const result = await prediction.result;
      console.log(JSON.stringify({ ok: true, source: mlx.sidecar.source, command: mlx.sidecar.command,
        tokens: result.usage.completionTokens, whole: text === result.text }));
    } finally {
      await mlx.close();
    }
  } catch (error) {
    console.log(JSON.stringify({ ok: false, name: error.name, message: error.message, tried: error.details && error.details.tried }));
  }
})();
`;

const TS_CONSUMER = `import { AbortError, LocalMLX, SidecarStartError, type SidecarAttempt } from "@localmlx/client";
export async function main(): Promise<string> {
  await using mlx = await LocalMLX.start({ model: "demo" });
  try {
    await mlx.status({ signal: AbortSignal.timeout(1000) });
  } catch (error) {
    if (error instanceof AbortError) return String(error.reason);
    if (error instanceof SidecarStartError) return (error.details.tried ?? []).map((t: SidecarAttempt) => t.outcome).join();
  }
  return mlx.sidecar?.source ?? "";
}
`;

type Outcome =
  | { ok: true; source: string; command: string; tokens: number; whole: boolean }
  | { ok: false; name: string; message: string; tried?: Array<{ label: string; outcome: string }> };

describe("the packed client in an app outside the repository", { timeout: 180_000 }, () => {
  const root = mkdtempSync(join(tmpdir(), "localmlx-outside-"));
  const app = join(root, "app");
  const home = join(root, "home");
  const emptyHome = join(root, "empty-home");
  const venv = join(home, ".local", "share", "localmlx", "venv");
  const basePath = [dirname(process.execPath), "/usr/bin", "/bin"].join(":");
  after(() => rmSync(root, { recursive: true, force: true }));

  /** The app's environment: nothing of this checkout, no LOCALMLX_PYTHON. */
  function appEnv(overrides: Record<string, string>): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = { ...process.env, LOCALMLX_MODELS_DIR: modelsDir, PATH: basePath, ...overrides };
    for (const name of ["LOCALMLX_PYTHON", "LOCALMLX_VENV", "XDG_DATA_HOME", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"]) delete env[name];
    return env;
  }

  async function runApp(env: NodeJS.ProcessEnv): Promise<Outcome> {
    const { stdout } = await run(process.execPath, ["main.cjs"], { cwd: app, env, timeout: 60_000 });
    return JSON.parse(stdout) as Outcome;
  }

  before(async () => {
    // npm pack (dist as built) and npm install of the tarball, as an app would.
    const packed = await run("npm", ["pack", "--ignore-scripts", "--json", "--pack-destination", root], { cwd: packageRoot });
    const [{ filename }] = JSON.parse(packed.stdout) as Array<{ filename: string }>;
    mkdirSync(join(app, "sidecar"), { recursive: true });
    writeFileSync(join(app, "package.json"), JSON.stringify({ name: "outside-app", private: true }));
    // --prefer-offline: the cache has the tarballs `npm ci` fetched, maybe not their registry metadata.
    await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--ignore-scripts", join(root, filename!)], { cwd: app });
    writeFileSync(join(app, "main.cjs"), CONSUMER);
    // The host app's own `sidecar` package, in its cwd: it must never run.
    writeFileSync(join(app, "sidecar", "__init__.py"), "");
    writeFileSync(join(app, "sidecar", "__main__.py"), "import sys\nsys.stderr.write('HIJACKED\\n')\nsys.exit(7)\n");

    // localmlx-client setup: the private virtualenv, pip-installing this checkout without its
    // dependencies (no downloads of MLX): the project's environment lends them through a .pth in a
    // virtualenv made beforehand, which setup reuses, so its own import check sees them.
    const purelib = async (py: string) =>
      (await run(py, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])).stdout.trim();
    await run(python, ["-m", "venv", venv]);
    writeFileSync(join(await purelib(join(venv, "bin", "python")), "localmlx-test-deps.pth"), `${await purelib(python)}\n`);
    const bin = join(app, "node_modules", "@localmlx", "client", "bin", "localmlx-client.cjs");
    await run(process.execPath, [bin, "setup", "--venv", venv, "--python", python, "--from", repositoryRoot, "--", "--no-deps", "--quiet"], {
      cwd: app,
      env: appEnv({}),
    });
  });

  test("the package declares @types/node for its declarations, and `setup` installed this checkout's sidecar", async () => {
    const pkg = JSON.parse(readFileSync(join(app, "node_modules", "@localmlx", "client", "package.json"), "utf8")) as {
      peerDependencies: Record<string, string>;
      peerDependenciesMeta: Record<string, { optional?: boolean }>;
    };
    assert.ok(pkg.peerDependencies["@types/node"]);
    const { stdout } = await run(join(venv, "bin", "python"), ["-P", "-c", "import sidecar; print(sidecar.__file__)"], { cwd: app });
    assert.ok(stdout.trim().startsWith(venv), `sidecar imported from ${stdout.trim()}, not the private virtualenv`);
  });

  test("found in the private virtualenv: a chat against the demo model", T, async () => {
    const outcome = await runApp(appEnv({ HOME: home }));
    assert.deepEqual(outcome, { ok: true, source: "private-venv", command: join(venv, "bin", "python"), tokens: 6, whole: true });
  });

  test("found as the `localmlx` entry point on PATH (a pip install into the app's environment)", T, async () => {
    const outcome = await runApp(appEnv({ HOME: emptyHome, PATH: `${join(venv, "bin")}:${basePath}` }));
    assert.deepEqual(outcome, { ok: true, source: "PATH", command: join(venv, "bin", "localmlx"), tokens: 6, whole: true });
  });

  test("found nowhere: SidecarStartError naming each thing tried, and the decoy never ran", T, async () => {
    const outcome = await runApp(appEnv({ HOME: emptyHome }));
    assert.equal(outcome.ok, false);
    if (outcome.ok) return;
    assert.equal(outcome.name, "SidecarStartError");
    assert.match(outcome.message, /npx @localmlx\/client setup/);
    const tried = outcome.tried!.map((t) => `${t.label}: ${t.outcome}`);
    assert.equal(tried[0], "the `python` option: not given");
    assert.equal(tried[1], "LOCALMLX_PYTHON: not set");
    assert.equal(tried[2], "the `localmlx` entry point on PATH: not found");
    assert.match(tried[3]!, /^the private virtualenv .*empty-home.*: not there/);
    assert.match(tried[4]!, /^the checkout's \.venv: this package is not inside a localmlx checkout/);
    assert.match(tried[5]!, /^python3 on PATH: /);
    for (const line of tried) assert.ok(outcome.message.includes(line.split(":")[0]!), `the message names ${line}`);
    assert.doesNotMatch(outcome.message, /HIJACKED/);
  });

  test("TypeScript: the published declarations type-check `await using` and AbortError with @types/node", T, async () => {
    const project = join(root, "ts-app");
    mkdirSync(join(project, "node_modules", "@localmlx"), { recursive: true });
    symlinkSync(join(app, "node_modules", "@localmlx", "client"), join(project, "node_modules", "@localmlx", "client"), "dir");
    symlinkSync(join(packageRoot, "node_modules", "@types"), join(project, "node_modules", "@types"), "dir");
    writeFileSync(join(project, "consumer.ts"), TS_CONSUMER);
    writeFileSync(
      join(project, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: { module: "nodenext", moduleResolution: "nodenext", target: "ES2022", strict: true, noEmit: true, skipLibCheck: false, types: ["node"] },
        files: ["consumer.ts"],
      }),
    );
    const tsc = join(packageRoot, "node_modules", "typescript", "bin", "tsc");
    try {
      await run(process.execPath, [tsc, "-p", project], { cwd: project });
    } catch (error) {
      assert.fail(`tsc failed:\n${(error as { stdout: string }).stdout}`);
    }
  });
});

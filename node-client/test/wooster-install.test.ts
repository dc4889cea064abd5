/**
 * `localmlx-client wooster-install` with each package manager, for real (pnpm and yarn classic
 * from this package's devDependencies, npm from the system), in temp Wooster-shaped projects:
 * the install runs with nothing to ask, and the installer checks its own result, failing loudly
 * (exit 1, what to run) when the package does not resolve from the plugin folder, even after a
 * package manager that exits 0 having installed nothing.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { fixtures, packageRoot } from "./helpers";

const execFileAsync = promisify(execFile);
const installer = join(packageRoot, "bin", "localmlx-client.cjs");
const bin = join(packageRoot, "node_modules", ".bin");
const T = { timeout: 120_000 };

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

describe("wooster-install with pnpm, npm and yarn", () => {
  const root = mkdtempSync(join(tmpdir(), "localmlx-install-"));
  /** What a user's shell has: pnpm and yarn on PATH (here from node_modules/.bin), npm beside node; caches in the temp dir. */
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PATH: [bin, ...(process.env.PATH ?? "").split(delimiter)].join(delimiter),
    npm_config_store_dir: join(root, "pnpm-store"),
    YARN_CACHE_FOLDER: join(root, "yarn-cache"),
  };
  let tarball = "";
  let dotenvTarball = "";

  let projects = 0;
  /** A Wooster-shaped checkout (Wooster's plugin loader and types) with no dependencies of its own, and `lockfile` if given. */
  function project(lockfile?: [string, string]): string {
    const dir = join(root, `wooster-${++projects}`);
    cpSync(join(fixtures, "wooster-host"), dir, { recursive: true });
    writeFileSync(join(dir, "package.json"), `${JSON.stringify({ name: "wooster", version: "1.0.0", private: true }, null, 2)}\n`);
    if (lockfile) writeFileSync(join(dir, lockfile[0]), lockfile[1]);
    return dir;
  }

  async function install(dir: string, args: string[] = [], extraEnv: NodeJS.ProcessEnv = {}): Promise<Run> {
    try {
      const { stdout, stderr } = await execFileAsync(process.execPath, [installer, "wooster-install", dir, ...args], { env: { ...env, ...extraEnv }, timeout: 100_000 });
      return { code: 0, stdout, stderr };
    } catch (error) {
      const e = error as Run;
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  }

  /** Where Wooster's import of @localmlx/client lands, from the plugin folder (asked of a plain node: this process's tsx maps the name to src/). */
  async function resolved(dir: string): Promise<string> {
    const from = JSON.stringify(join(dir, "src", "plugins", "localMLX", "index.js"));
    const { stdout } = await execFileAsync(process.execPath, ["-p", `require("node:module").createRequire(${from}).resolve("@localmlx/client")`], { env });
    return realpathSync(stdout.trim());
  }

  before(async () => {
    // The package as a registry would serve it (dist is built by the test run's pretest/build).
    const { stdout } = await execFileAsync("npm", ["pack", "--ignore-scripts", "--silent", "--pack-destination", root], { cwd: packageRoot, env });
    tarball = join(root, stdout.trim().split("\n").pop()!);
    const packed = await execFileAsync("npm", ["pack", join(packageRoot, "node_modules", "dotenv"), "--silent", "--pack-destination", root], { env });
    dotenvTarball = join(root, packed.stdout.trim().split("\n").pop()!);
  });
  after(() => rmSync(root, { recursive: true, force: true }));

  test("pnpm: node_modules from another store makes pnpm ask on a non-terminal; the installer's run purges without asking and the package resolves", T, async () => {
    const dir = project(["pnpm-lock.yaml", "lockfileVersion: '9.0'\n"]);
    // A node_modules pnpm laid out with another store (a dependency from a local tarball, no registry)…
    writeFileSync(join(dir, "package.json"), `${JSON.stringify({ name: "wooster", version: "1.0.0", private: true, dependencies: { dotenv: `file:${dotenvTarball}` } }, null, 2)}\n`);
    await execFileAsync(join(bin, "pnpm"), ["install", "--store-dir", join(root, "other-store")], { cwd: dir, env });
    // …then the plugin's dependency added: a plain `pnpm install` on a non-terminal asks, and gives up.
    assert.equal((await install(dir, ["--no-install"])).code, 0);
    await assert.rejects(execFileAsync(join(bin, "pnpm"), ["install"], { cwd: dir, env: { ...env, CI: "" } }), (error: Run) => {
      assert.match(error.stdout + error.stderr, /ABORTED_REMOVE_MODULES_DIR_NO_TTY|Proceed\?/);
      return true;
    });
    assert.equal(existsSync(join(dir, "node_modules", "@localmlx", "client")), false);

    const run = await install(dir, [], { CI: "" });
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /already installed and up to date/, "nothing to change: it installs because the package does not resolve");
    assert.match(run.stdout, /running CI=true pnpm install --config\.confirmModulesPurge=false --no-frozen-lockfile in /);
    assert.match(run.stdout, /@localmlx\/client resolves from src\/plugins\/localMLX\./);
    assert.match(JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).dependencies["@localmlx/client"], /^link:/);
    assert.equal(await resolved(dir), realpathSync(join(packageRoot, "dist", "index.js")), "linked to this checkout");
    assert.match(readFileSync(join(dir, "pnpm-lock.yaml"), "utf8"), /'@localmlx\/client':\n\s+specifier: link:/);
  });

  test("npm: the package from a tarball, its dependencies with it; a second run has nothing to do", T, async () => {
    const dir = project();
    const run = await install(dir, ["--spec", `file:${tarball}`]);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /running npm install --no-audit --no-fund in /);
    const main = await resolved(dir);
    assert.equal(main, realpathSync(join(dir, "node_modules", "@localmlx", "client", "dist", "index.js")), "an installed copy, not a link");
    assert.ok(existsSync(join(dir, "node_modules", "dotenv", "package.json")), "its dependency came with it");
    const again = await install(dir, ["--spec", `file:${tarball}`]);
    assert.equal(again.code, 0);
    assert.match(again.stdout, /already installed and up to date/);
    assert.doesNotMatch(again.stdout, /running npm/);
  });

  test("yarn (classic): --non-interactive, link: to this checkout", T, async () => {
    const dir = project(["yarn.lock", "# yarn lockfile v1\n"]);
    const run = await install(dir);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /running YARN_ENABLE_IMMUTABLE_INSTALLS=false yarn install --non-interactive in /);
    assert.match(JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).dependencies["@localmlx/client"], /^link:/);
    assert.equal(await resolved(dir), realpathSync(join(packageRoot, "dist", "index.js")));
  });

  test("a package manager that exits 0 having installed nothing: exit 1, saying so and what to run", T, async () => {
    const dir = project();
    writeFileSync(join(dir, ".npmrc"), "dry-run=true\n"); // npm "installs" and changes nothing
    const run = await install(dir, ["--spec", `file:${tarball}`]);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.match(run.stderr, /npm install finished \(exit 0\), but @localmlx\/client does not resolve from .*src\/plugins\/localMLX: Wooster cannot load the plugin\./);
    assert.match(run.stderr, /Run it yourself, then check:\n {2}cd .* && npm install --no-audit --no-fund\n {2}npx @localmlx\/client wooster-doctor /);
    assert.equal(existsSync(join(dir, "node_modules", "@localmlx", "client")), false);
  });

  test("a checkout of the package that is not built: exit 1, saying to build it", T, async () => {
    const unbuilt = join(root, "unbuilt-checkout");
    mkdirSync(unbuilt);
    const { scripts: _scripts, ...pkg } = JSON.parse(readFileSync(join(packageRoot, "package.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(join(unbuilt, "package.json"), JSON.stringify(pkg)); // its package.json, no dist/ (and no prepare to build one)
    const dir = project();
    const run = await install(dir, ["--spec", `file:${unbuilt}`]);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.match(run.stderr, /but @localmlx\/client is installed \(.*unbuilt-checkout\) but its entry point is missing .*`npm run build` in that folder/);
  });

  test("a package manager that is not installed, or fails: exit 1 with the command to run", T, async () => {
    const dir = project(["pnpm-lock.yaml", "lockfileVersion: '9.0'\n"]);
    const missing = await install(dir, [], { PATH: (process.env.PATH ?? "").split(delimiter).filter((p) => !existsSync(join(p, "pnpm"))).join(delimiter) });
    assert.equal(missing.code, 1, missing.stdout + missing.stderr);
    assert.match(missing.stderr, /could not run pnpm \(ENOENT\)\nRun it yourself, then check:\n {2}cd .* && CI=true pnpm install --config\.confirmModulesPurge=false --no-frozen-lockfile/);
    const broken = project();
    const failing = await install(broken, ["--spec", "file:/nonexistent/localmlx-client.tgz"]);
    assert.equal(failing.code, 1);
    assert.match(failing.stderr, /npm install failed \(exit \d+\)/);
  });

  test("--no-install names the non-interactive command to run", async () => {
    const dir = project(["pnpm-lock.yaml", "lockfileVersion: '9.0'\n"]);
    const run = await install(dir, ["--no-install"]);
    assert.equal(run.code, 0);
    assert.match(run.stdout, /next: run `CI=true pnpm install --config\.confirmModulesPurge=false --no-frozen-lockfile` in /);
  });
});

/**
 * `install-service` / `uninstall-service` through the real bin, with HOME a temporary directory:
 * the launchd plist (`--platform darwin`, so Linux CI checks it too) and the systemd user unit it
 * writes, and the loader commands it runs. `launchctl` and `systemctl` are stand-ins on PATH that
 * record their arguments, so nothing is loaded into this machine's launchd or systemd.
 */
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { defaultServiceConfig, launchdPlist, parseServiceConfig, serviceEnvironment, systemdUnit } from "../src/index";
import { bin } from "./service-helpers";

const execFileAsync = promisify(execFile);

/** A HOME, and a PATH whose launchctl/systemctl append their argv (one line) to calls.log and exit `status`. */
function sandbox(status = 0): { home: string; pathDir: string; calls: () => string[]; env: NodeJS.ProcessEnv } {
  const home = mkdtempSync(join(tmpdir(), "localmlx-home-"));
  const pathDir = join(home, "fake-bin");
  mkdirSync(pathDir);
  const log = join(home, "calls.log");
  for (const tool of ["launchctl", "systemctl"]) {
    const file = join(pathDir, tool);
    writeFileSync(file, `#!/bin/sh\necho "${tool} $*" >> "${log}"\nexit ${status}\n`);
    chmodSync(file, 0o755);
  }
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!/^(LOCALMLX_|OPENAI_|HF_|XDG_)/.test(key)) env[key] = value;
  return {
    home,
    pathDir,
    calls: () => (existsSync(log) ? readFileSync(log, "utf8").trim().split("\n").filter(Boolean) : []),
    env: {
      ...env,
      HOME: home,
      PATH: `${pathDir}:${process.env.PATH}`,
      LOCALMLX_PYTHON: "/opt/localmlx/venv/bin/python",
      LOCALMLX_MEMORY_BUDGET: "60%",
      OPENAI_API_KEY: "sk-secret-never-written",
      HF_TOKEN: "hf_secret_never_written",
      HF_HOME: "/data/hf",
    },
  };
}

async function run(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileAsync(process.execPath, [bin, ...args], { env });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

const realBin = realpathSync(bin);
const uid = process.getuid!();

describe("install-service", () => {
  test("macOS: a launchd agent with absolute paths, the environment minus secrets, a log file; bootstrapped into gui/<uid>", async () => {
    const box = sandbox();
    const result = await run(["install-service", "--platform", "darwin"], box.env);
    assert.equal(result.code, 0, result.stderr);
    const plistPath = join(box.home, "Library", "LaunchAgents", "localmlx.serve.plist");
    const configPath = join(box.home, "Library", "Application Support", "localmlx", "serve.json");
    const plist = readFileSync(plistPath, "utf8");
    assert.equal(
      plist,
      launchdPlist({
        programArguments: [process.execPath, realBin, "serve", "--config", configPath],
        env: serviceEnvironment(box.env).env,
        logFile: join(box.home, "Library", "Logs", "localmlx", "serve.log"),
        exitTimeoutS: 45,
      }),
    );
    assert.match(plist, /<key>Label<\/key>\n\t<string>localmlx\.serve<\/string>/);
    assert.ok(plist.includes(`<string>${process.execPath}</string>\n\t\t<string>${realBin}</string>\n\t\t<string>serve</string>\n\t\t<string>--config</string>\n\t\t<string>${configPath}</string>`));
    assert.match(plist, /<key>LOCALMLX_PYTHON<\/key>\n\t\t<string>\/opt\/localmlx\/venv\/bin\/python<\/string>/);
    assert.match(plist, /<key>LOCALMLX_MEMORY_BUDGET<\/key>\n\t\t<string>60%<\/string>/);
    assert.match(plist, /<key>HF_HOME<\/key>/);
    assert.match(plist, /<key>PATH<\/key>/);
    assert.doesNotMatch(plist, /secret|OPENAI_API_KEY|HF_TOKEN/);
    assert.match(plist, /<key>RunAtLoad<\/key>\n\t<true\/>/);
    assert.match(plist, /<key>KeepAlive<\/key>\n\t<dict>\n\t\t<key>SuccessfulExit<\/key>\n\t\t<false\/>/);
    assert.match(plist, new RegExp(`<key>StandardErrorPath</key>\\n\\t<string>${box.home}/Library/Logs/localmlx/serve\\.log</string>`));
    if (spawnSync("plutil", ["-help"]).status === 0) assert.equal(spawnSync("plutil", ["-lint", plistPath]).status, 0);
    assert.ok(existsSync(join(box.home, "Library", "Logs", "localmlx")), "the log's folder exists");
    // The config it points at was written, with the defaults, and parses.
    assert.deepEqual(parseServiceConfig(JSON.parse(readFileSync(configPath, "utf8"))), defaultServiceConfig());
    assert.deepEqual(box.calls(), [`launchctl bootout gui/${uid}/localmlx.serve`, `launchctl bootstrap gui/${uid} ${plistPath}`]);
    assert.match(result.stdout, /not written into the unit \(secrets\): HF_TOKEN, OPENAI_API_KEY/);

    // Uninstall: bootout, and the plist is gone (the config stays).
    const removed = await run(["uninstall-service", "--platform", "darwin"], box.env);
    assert.equal(removed.code, 0, removed.stderr);
    assert.equal(existsSync(plistPath), false);
    assert.ok(existsSync(configPath));
    assert.deepEqual(box.calls().slice(2), [`launchctl bootout gui/${uid}/localmlx.serve`]);
  });

  test("Linux: a systemd user unit (ExecStart with absolute paths, KillMode=mixed, reload by SIGHUP); daemon-reload, enable, restart", async () => {
    const box = sandbox();
    const config = join(box.home, "my config %h $HOME.json");
    writeFileSync(config, JSON.stringify({ tiers: { fast: { port: 8081, model: "demo" } } }));
    const result = await run(["install-service", "--platform", "linux", "--config", config], box.env);
    assert.equal(result.code, 0, result.stderr);
    const unitPath = join(box.home, ".config", "systemd", "user", "localmlx.service");
    const unit = readFileSync(unitPath, "utf8");
    assert.equal(unit, systemdUnit({ programArguments: [process.execPath, realBin, "serve", "--config", config], env: serviceEnvironment(box.env).env, stopTimeoutS: 45 }));
    const execStart = unit.split("\n").find((line) => line.startsWith("ExecStart="))!;
    // Quoted words; `%` and `$` doubled so systemd expands neither.
    assert.equal(execStart, `ExecStart="${process.execPath}" "${realBin}" "serve" "--config" "${join(box.home, "my config %%h $$HOME.json")}"`);
    assert.ok(unit.includes('Environment="LOCALMLX_PYTHON=/opt/localmlx/venv/bin/python"'));
    assert.ok(unit.includes('Environment="LOCALMLX_MEMORY_BUDGET=60%%"'));
    assert.doesNotMatch(unit, /secret|OPENAI_API_KEY|HF_TOKEN/);
    for (const line of ["ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "KillMode=mixed", "TimeoutStopSec=45", "WantedBy=default.target"]) {
      assert.ok(unit.split("\n").includes(line), line);
    }
    assert.equal(JSON.parse(readFileSync(config, "utf8")).tiers.fast.port, 8081, "an existing config is left as it is");
    assert.deepEqual(box.calls(), ["systemctl --user daemon-reload", "systemctl --user enable localmlx.service", "systemctl --user restart localmlx.service"]);
    if (spawnSync("systemd-analyze", ["--version"]).status === 0) {
      const verify = spawnSync("systemd-analyze", ["verify", "--user", unitPath], { encoding: "utf8", env: box.env });
      assert.doesNotMatch(verify.stderr, /localmlx\.service:\d+:/, verify.stderr);
    }

    const removed = await run(["uninstall-service", "--platform", "linux"], box.env);
    assert.equal(removed.code, 0, removed.stderr);
    assert.equal(existsSync(unitPath), false);
    assert.deepEqual(box.calls().slice(3), ["systemctl --user disable --now localmlx.service", "systemctl --user daemon-reload"]);
  });

  test("--dry-run writes and runs nothing; --no-load writes and runs nothing; a failing loader is an error", async () => {
    const box = sandbox();
    const dry = await run(["install-service", "--platform", "linux", "--dry-run"], box.env);
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /would write .*\/\.config\/localmlx\/serve\.json:\n\{/);
    assert.match(dry.stdout, /would write .*\/\.config\/systemd\/user\/localmlx\.service:\n\[Unit\]/);
    assert.match(dry.stdout, /would run systemctl --user daemon-reload\nwould run systemctl --user enable localmlx\.service\nwould run systemctl --user restart localmlx\.service/);
    assert.equal(existsSync(join(box.home, ".config")), false);
    assert.deepEqual(box.calls(), []);

    const written = await run(["install-service", "--platform", "darwin", "--no-load"], box.env);
    assert.equal(written.code, 0, written.stderr);
    assert.ok(existsSync(join(box.home, "Library", "LaunchAgents", "localmlx.serve.plist")));
    assert.match(written.stdout, new RegExp(`not loaded \\(--no-load\\); load it with: launchctl bootstrap gui/${uid} `));
    assert.deepEqual(box.calls(), []);

    const failing = sandbox(1);
    const failed = await run(["install-service", "--platform", "linux"], failing.env);
    assert.equal(failed.code, 1);
    assert.match(failed.stderr, /systemctl --user daemon-reload failed \(exit 1\)/);

    const bad = await run(["install-service", "--platform", "win32"], box.env);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /knows macOS \(launchd\) and Linux \(systemd\), not win32/);
    const usage = await run(["install-service", "--bogus"], box.env);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /Usage: localmlx-client install-service/);
  });
});

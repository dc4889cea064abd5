// `npm test`: node's test runner over test/*.test.ts (through tsx), against the real sidecar.
// One temporary LOCALMLX_MODELS_DIR for the whole run, with the embedded demo model built into
// it once up front (so test files running side by side never race to build it); removed after.
"use strict";
const { spawnSync } = require("node:child_process");
const { mkdtempSync, readdirSync, rmSync } = require("node:fs");
const { tmpdir } = require("node:os");
const { join, resolve } = require("node:path");

const root = resolve(__dirname, "..");
const { resolvePython } = require(join(root, "dist", "index.js"));

const modelsDir = mkdtempSync(join(tmpdir(), "localmlx-node-tests-"));
const env = { ...process.env, LOCALMLX_MODELS_DIR: modelsDir };
try {
  const python = resolvePython();
  const built = spawnSync(python, ["-m", "sidecar", "demo-model"], {
    cwd: resolve(root, ".."),
    env,
    stdio: ["ignore", "ignore", "inherit"],
  });
  if (built.status !== 0) {
    console.error(`could not build the demo model with ${python} (exit ${built.status})`);
    process.exitCode = 1;
  } else {
    const files = process.argv.length > 2
      ? process.argv.slice(2)
      : readdirSync(join(root, "test")).filter((name) => name.endsWith(".test.ts")).sort().map((name) => join("test", name));
    const run = spawnSync(
      process.execPath,
      ["--import", "tsx", "--test", "--test-concurrency=2", "--test-timeout=120000", ...files],
      { cwd: root, env, stdio: "inherit" },
    );
    process.exitCode = run.status ?? 1;
  }
} finally {
  rmSync(modelsDir, { recursive: true, force: true });
}

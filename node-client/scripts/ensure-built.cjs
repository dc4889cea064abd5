// Builds dist/ when it is missing or older than src/ (for `npm run demo` and `npm run bench`).
"use strict";
const { execSync } = require("node:child_process");
const { existsSync, readdirSync, statSync } = require("node:fs");
const { join } = require("node:path");

const root = join(__dirname, "..");
const newest = (dir) =>
  Math.max(0, ...readdirSync(dir).map((name) => statSync(join(dir, name)).mtimeMs));
const stamp = join(root, "dist", "index.mjs");
if (!existsSync(stamp) || statSync(stamp).mtimeMs < newest(join(root, "src"))) {
  execSync("npm run --silent build", { cwd: root, stdio: "inherit" });
}

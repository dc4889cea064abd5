// Writes the ESM entry points next to the CommonJS build: dist/index.mjs re-exports
// dist/index.js, so `import` and `require` share one copy of the code (and of every error
// class, so `instanceof` holds across both), and dist/index.d.mts re-exports its types.
"use strict";
const { writeFileSync } = require("node:fs");
const { join } = require("node:path");

const dist = join(__dirname, "..", "dist");
const names = Object.keys(require(join(dist, "index.js")))
  .filter((name) => name !== "__esModule" && name !== "default")
  .sort();

writeFileSync(
  join(dist, "index.mjs"),
  [
    "// ESM entry: the CommonJS build, re-exported (one copy of the code for both module systems).",
    'import cjs from "./index.js";',
    "",
    "export const {",
    ...names.map((name) => `  ${name},`),
    "} = cjs;",
    "",
  ].join("\n"),
);
writeFileSync(join(dist, "index.d.mts"), 'export * from "./index.js";\n');

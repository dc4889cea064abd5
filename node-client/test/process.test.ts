import { test } from "node:test";
import assert from "node:assert/strict";
import { isAbsolute, resolve } from "node:path";
import { resolvePython } from "../src/process";

test("a relative Python path is taken from the host's cwd, not the sidecar's", () => {
  assert.equal(resolvePython("../.venv/bin/python"), resolve("../.venv/bin/python"));
  assert.equal(resolvePython(undefined, { LOCALMLX_PYTHON: "venv/bin/python" }), resolve("venv/bin/python"));
  assert.ok(isAbsolute(resolvePython(undefined, { LOCALMLX_PYTHON: "./py" })));
});

test("a bare command name is left for PATH lookup; the option beats the environment", () => {
  assert.equal(resolvePython("python3.12", { LOCALMLX_PYTHON: "/opt/py" }), "python3.12");
  assert.equal(resolvePython(undefined, { LOCALMLX_PYTHON: "python3" }), "python3");
});

/** The built package as consumers see it: CommonJS require, ESM import, and TypeScript (node10 + commonjs). */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { promisify } from "node:util";
import { ErrorCodes } from "../src/index";
import { fixtures, modelsDir, packageRoot } from "./helpers";

const run = promisify(execFile);
const env = { ...process.env, LOCALMLX_MODELS_DIR: modelsDir };
const T = { timeout: 60_000 };

describe("the built package", () => {
  test("package.json points main/types at the CommonJS build, exports both", async () => {
    const pkg = (await import(join(packageRoot, "package.json"))) as { default: Record<string, unknown> };
    const json = pkg.default as { main: string; types: string; exports: Record<string, Record<string, Record<string, string>>> };
    assert.equal(json.main, "./dist/index.js");
    assert.equal(json.types, "./dist/index.d.ts");
    assert.equal(json.exports["."]!.require!.default, "./dist/index.js");
    assert.equal(json.exports["."]!.import!.default, "./dist/index.mjs");
  });

  test("require() from CommonJS streams a chat", T, async () => {
    const { stdout } = await run(process.execPath, [join(fixtures, "consumer.cjs")], { cwd: packageRoot, env });
    const notFound = ErrorCodes.ModelNotFound;
    assert.deepEqual(JSON.parse(stdout), { ok: true, tokens: 6, code: notFound, expected: notFound });
  });

  test("import from an ES module works and shares the CommonJS classes", T, async () => {
    const { stdout } = await run(process.execPath, [join(fixtures, "consumer.mjs")], { cwd: packageRoot, env });
    assert.deepEqual(JSON.parse(stdout), { tokens: 5, sameClass: true });
  });

  describe("TypeScript consumers type-check against the declarations", () => {
    const dir = mkdtempSync(join(tmpdir(), "localmlx-ts-consumer-"));
    after(() => rmSync(dir, { recursive: true, force: true }));
    mkdirSync(join(dir, "node_modules", "@localmlx"), { recursive: true });
    symlinkSync(packageRoot, join(dir, "node_modules", "@localmlx", "client"), "dir");
    symlinkSync(join(packageRoot, "node_modules", "@types"), join(dir, "node_modules", "@types"), "dir");
    const source = [
      'import { LocalMLX, RpcError, ErrorCode, type ChatParams, type PredictionResult, type Methods } from "@localmlx/client";',
      "export async function main(): Promise<PredictionResult> {",
      '  const mlx = await LocalMLX.start({ model: "demo", logger: console });',
      '  const params: Omit<ChatParams, "stream"> = { messages: [{ role: "user", content: "hi" }], maxTokens: 5 };',
      "  for await (const chunk of mlx.chat(params)) process.stdout.write(chunk.text);",
      '  const status: Methods["server/status"]["result"] = await mlx.status();',
      "  void status.memory.activeBytes;",
      "  try { await mlx.models.load('x'); } catch (e) { if (e instanceof RpcError && e.code === ErrorCode.ModelNotFound) void e.data; }",
      "  // @ts-expect-error: a wrong param name does not type-check",
      '  mlx.chat({ messages: [], max_tokens: 5 });',
      "  const result = await mlx.chat(params).result;",
      "  await mlx.close();",
      "  { await using scoped = await LocalMLX.start(); void scoped.pid; }",
      "  return result;",
      "}",
      "",
    ].join("\n");
    const tsc = join(packageRoot, "node_modules", "typescript", "bin", "tsc");

    for (const [name, options, pkgType] of [
      ["CommonJS with node10 resolution (Wooster)", { module: "commonjs", moduleResolution: "node10" }, "commonjs"],
      ["ESM with nodenext resolution", { module: "nodenext", moduleResolution: "nodenext" }, "module"],
    ] as const) {
      test(name, T, async () => {
        const project = join(dir, pkgType);
        mkdirSync(project, { recursive: true });
        writeFileSync(join(project, "package.json"), JSON.stringify({ type: pkgType }));
        writeFileSync(join(project, "consumer.ts"), source);
        writeFileSync(
          join(project, "tsconfig.json"),
          JSON.stringify({
            compilerOptions: { ...options, target: "ES2022", strict: true, noEmit: true, skipLibCheck: false, types: ["node"] },
            files: ["consumer.ts"],
          }),
        );
        try {
          await run(process.execPath, [tsc, "-p", project], { cwd: project });
        } catch (error) {
          assert.fail(`tsc failed:\n${(error as { stdout: string }).stdout}`);
        }
      });
    }
  });
});

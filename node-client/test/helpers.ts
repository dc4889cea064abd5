import { spawnSync } from "node:child_process";
import { createServer, type AddressInfo } from "node:net";
import { cpSync, existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { LocalMLX, resolvePython, type LocalMLXOptions, type Message } from "../src/index";

export const packageRoot = resolve(__dirname, "..");
export const repositoryRoot = resolve(packageRoot, "..");
export const fixtures = join(__dirname, "fixtures");
export const python = resolvePython();

/** The run's models dir (set by scripts/run-tests.cjs), or a temporary one for a lone test file. */
export const modelsDir: string = (() => {
  if (process.env.LOCALMLX_MODELS_DIR) return process.env.LOCALMLX_MODELS_DIR;
  const dir = mkdtempSync(join(tmpdir(), "localmlx-node-test-"));
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  process.env.LOCALMLX_MODELS_DIR = dir;
  return dir;
})();

export const messages: Message[] = [{ role: "user", content: "Tell me about the sea and the mountains." }];

/** A client on the demo model, in the test run's models dir. */
export function startClient(options: LocalMLXOptions = {}): Promise<LocalMLX> {
  return LocalMLX.start({
    model: "demo",
    ...options,
    env: { LOCALMLX_MODELS_DIR: modelsDir, ...options.env },
  });
}

export async function waitFor(condition: () => boolean, timeoutMs: number, what = "condition"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolveWait) => setTimeout(resolveWait, 20));
  }
}

/** True once `pid` no longer runs (gone, or a zombie waiting to be reaped). */
export function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return true;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return process.platform === "linux";
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolveSleep) => setTimeout(resolveSleep, ms));
}

/**
 * A tiny checkpoint of a real model family, built offline by `tests/families.py` into the run's
 * models dir (cached by content): "qwen3" (Qwen3's real template, tool calls and thinking) or
 * "qwen3-embedding" (a Qwen3-Embedding). Returns the model's name for `model`.
 */
export function buildFamilyModel(family: "qwen3" | "qwen3-embedding"): string {
  const code =
    family === "qwen3"
      ? "from tests.families import build, FAMILIES_BY_NAME as F; print(build(D, F['qwen3'], 'bf16'))"
      : "from tests.families import build_embedding_model; print(build_embedding_model(D))";
  const built = spawnSync(python, ["-c", `import sys; from pathlib import Path; D = Path(sys.argv[1]); ${code}`, modelsDir], {
    cwd: repositoryRoot,
    encoding: "utf8",
  });
  if (built.status !== 0) throw new Error(`could not build ${family}: ${built.stderr}`);
  return basename(built.stdout.trim());
}

/**
 * The qwen3 checkpoint with a thinking model's template: the generation prompt opens the
 * reasoning block (`<think>\n`, as Qwen3-Thinking-2507's does) unless `enable_thinking` is false.
 */
export function buildThinkingModel(): string {
  const source = join(modelsDir, buildFamilyModel("qwen3"));
  const name = "qwen3-thinking-bf16";
  const dest = join(modelsDir, name);
  if (existsSync(join(dest, "config.json"))) return name;
  const tmp = mkdtempSync(join(modelsDir, `.${name}-`));
  cpSync(source, tmp, { recursive: true });
  const configPath = join(tmp, "tokenizer_config.json");
  const config = JSON.parse(readFileSync(configPath, "utf8")) as { chat_template: string };
  const closed = "{{- '<think>\\n\\n</think>\\n\\n' }}\n";
  if (!config.chat_template.includes(closed)) throw new Error("the qwen3 template changed: no empty think block to patch");
  config.chat_template = config.chat_template.replace(closed, `${closed}    {%- else %}\n        {{- '<think>\\n' }}\n`);
  writeFileSync(configPath, JSON.stringify(config, null, 2));
  try {
    renameSync(tmp, dest);
  } catch {
    rmSync(tmp, { recursive: true, force: true }); // another test file built it first
  }
  return name;
}

/**
 * The demo model's recipe with a 2048-position context (the demo itself has 32768), built into the
 * run's models dir: for tests that need a prompt past the context without prefilling 32k tokens.
 */
export function buildShortContextDemo(): string {
  const name = "demo-context-2048";
  const code =
    "import sys, dataclasses; from pathlib import Path; from sidecar.demo_model import DEMO_SHAPE, build_demo_model; " +
    "build_demo_model(Path(sys.argv[1]), dataclasses.replace(DEMO_SHAPE, max_positions=2048))";
  const built = spawnSync(python, ["-c", code, join(modelsDir, name)], { cwd: repositoryRoot, encoding: "utf8" });
  if (built.status !== 0) throw new Error(`could not build ${name}: ${built.stderr}`);
  return name;
}

/** A loopback port free a moment ago (the OS's pick): for servers a test must name the port of in advance, and for "nothing listens here". */
export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolvePort(port));
    });
  });
}

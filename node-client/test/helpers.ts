import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
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

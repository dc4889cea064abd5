/**
 * Runs `localmlx-client serve` as a user would (the real bin, the built dist, the real sidecar)
 * and reads its structured log: each stderr line, and the JSON records among them.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { modelsDir, packageRoot, python } from "./helpers";

export const bin = join(packageRoot, "bin", "localmlx-client.cjs");

export type LogRecord = Record<string, unknown> & { time: string; level: string; msg: string };

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createNetServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

/** A temporary directory with `serve.json` holding `config`; rewrite it with `write()`. */
export function configFile(config: unknown): { path: string; dir: string; write(next: unknown): void } {
  const dir = mkdtempSync(join(tmpdir(), "localmlx-serve-"));
  const path = join(dir, "serve.json");
  const write = (next: unknown): void => writeFileSync(path, typeof next === "string" ? next : JSON.stringify(next, null, 2));
  write(config);
  return { path, dir, write };
}

/** The environment of a service process: only what each test sets steers it (no inherited LOCALMLX_*, OPENAI_*). */
export function serviceEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!/^(LOCALMLX_|OPENAI_|HF_)/.test(key)) env[key] = value;
  return { ...env, LOCALMLX_PYTHON: python, LOCALMLX_MODELS_DIR: modelsDir, HF_HUB_OFFLINE: "1", ...extra };
}

export class ServiceProcess {
  readonly child: ChildProcess;
  readonly lines: string[] = [];
  stdout = "";
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly waiters = new Set<() => void>();

  constructor(args: string[], env: NodeJS.ProcessEnv = serviceEnv()) {
    this.child = spawn(process.execPath, [bin, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let partial = "";
    this.child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
      partial += chunk;
      const parts = partial.split("\n");
      partial = parts.pop()!;
      this.lines.push(...parts);
      for (const wake of this.waiters) wake();
    });
    this.child.stdout!.setEncoding("utf8").on("data", (chunk: string) => (this.stdout += chunk));
    this.exited = new Promise((resolve) =>
      this.child.once("exit", (code, signal) => {
        for (const wake of this.waiters) wake();
        resolve({ code, signal });
      }),
    );
  }

  /** `serve --config <file>` with `--log-format json`. */
  static serve(config: string, env?: NodeJS.ProcessEnv, extra: string[] = []): ServiceProcess {
    return new ServiceProcess(["serve", "--config", config, "--log-format", "json", ...extra], env);
  }

  /** The JSON records so far (parsed anew on each read). */
  get records(): LogRecord[] {
    return this.lines.flatMap((line) => {
      try {
        return [JSON.parse(line) as LogRecord];
      } catch {
        return [];
      }
    });
  }

  /** The first record (from `from` on) matching `match`, waiting for it (on the log, not on a clock) up to `timeoutMs`. */
  async waitFor(match: (record: LogRecord) => boolean, what: string, timeoutMs = 60_000, from = 0): Promise<LogRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.records.slice(from).find(match);
      if (found) return found;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`the service exited before ${what}:\n${this.lines.join("\n")}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}:\n${this.lines.join("\n")}`);
      await new Promise<void>((resolve) => {
        const done = (): void => {
          clearTimeout(timer);
          this.waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.waiters.add(done);
      });
    }
  }

  /** Waits for the "serving" record (the service listens on every tier). */
  ready(timeoutMs = 60_000): Promise<LogRecord> {
    return this.waitFor((r) => r.msg === "serving", "the service to listen", timeoutMs);
  }

  /** Child processes of the service (Linux: /proc). */
  children(): number[] {
    const out: number[] = [];
    for (const entry of readdirSync("/proc")) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
        if (Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === this.child.pid) out.push(Number(entry));
      } catch {
        // gone
      }
    }
    return out;
  }

  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return this.exited;
  }
}

/**
 * A stand-in for a remote OpenAI-compatible server on loopback that counts what reaches it and
 * answers every chat with one canned completion (and embeddings with one vector).
 */
export async function countingRemote(): Promise<{ url: string; requests: Array<{ method: string; path: string }>; close(): Promise<void>; server: Server }> {
  const requests: Array<{ method: string; path: string }> = [];
  const server = createServer((req, res) => {
    requests.push({ method: req.method ?? "", path: req.url ?? "" });
    req.resume();
    req.on("end", () => {
      res.setHeader("content-type", "application/json");
      if (req.url?.endsWith("/embeddings")) {
        res.end(JSON.stringify({ object: "list", model: "remote", data: [{ object: "embedding", index: 0, embedding: [1, 0] }], usage: { prompt_tokens: 1, total_tokens: 1 } }));
      } else if (req.url?.endsWith("/models")) {
        res.end(JSON.stringify({ object: "list", data: [{ id: "remote-model", object: "model", created: 0, owned_by: "remote" }] }));
      } else {
        res.end(JSON.stringify({ id: "r", object: "chat.completion", created: 0, model: "remote-model", choices: [{ index: 0, message: { role: "assistant", content: "remote" }, finish_reason: "stop" }], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } }));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    server,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

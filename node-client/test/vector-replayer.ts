/**
 * Replays one conformance vector (protocol/vectors/README.md) against a freshly spawned sidecar,
 * on raw stdio: no client in between, so the vector checks the sidecar and nothing else.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { isOversized, LineSplitter, parseLine } from "../src/framing";
import { PROTOCOL_VERSION } from "../src/protocol";
import { modelsDir, python, repositoryRoot } from "./helpers";

export interface Vector {
  name: string;
  description?: string;
  env?: Record<string, string>;
  initialize?: boolean;
  steps: Step[];
}

export type Step =
  | { send: unknown }
  | { sendRaw: string }
  | { sendHex: string }
  | { sendRepeat: { prefix: string; unit: string; count: number; suffix: string } }
  | { expect: unknown }
  | { expectStream: { id: unknown; minChunks?: number } };

const TYPE_PATTERNS: Record<string, (value: unknown) => boolean> = {
  $any: () => true,
  $string: (value) => typeof value === "string",
  $number: (value) => typeof value === "number",
  $integer: (value) => Number.isInteger(value),
  $object: (value) => typeof value === "object" && value !== null && !Array.isArray(value),
  $array: (value) => Array.isArray(value),
  $null: (value) => value === null,
};

/**
 * Does `value` match `pattern`? Objects: every pattern key present with a matching value (extra
 * keys allowed). Arrays: same length, elements matched one to one (batch responses may come in
 * any order, as the Python replayer allows). "$string" and friends match by type. Anything else:
 * equal, with the same JSON type.
 */
export function matches(pattern: unknown, value: unknown): boolean {
  if (typeof pattern === "string" && pattern in TYPE_PATTERNS) return TYPE_PATTERNS[pattern]!(value);
  if (Array.isArray(pattern)) {
    return Array.isArray(value) && value.length === pattern.length && assignOneToOne(pattern, value);
  }
  if (typeof pattern === "object" && pattern !== null) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
    const record = value as Record<string, unknown>;
    return Object.entries(pattern).every(([key, item]) => key in record && matches(item, record[key]));
  }
  return typeof pattern === typeof value && pattern === value;
}

function assignOneToOne(patterns: unknown[], values: unknown[]): boolean {
  const used = new Set<number>();
  const assign = (i: number): boolean => {
    if (i === patterns.length) return true;
    for (let j = 0; j < values.length; j++) {
      if (used.has(j) || !matches(patterns[i], values[j])) continue;
      used.add(j);
      if (assign(i + 1)) return true;
      used.delete(j);
    }
    return false;
  };
  return assign(0);
}

/** UTF-8 that keeps lone surrogates as their 3-byte form (Python's "surrogatepass"). */
export function utf8SurrogatePass(text: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    let code = text.charCodeAt(i);
    const next = text.charCodeAt(i + 1);
    if (code >= 0xd800 && code <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) {
      code = 0x10000 + ((code - 0xd800) << 10) + (next - 0xdc00);
      i++;
    }
    if (code < 0x80) bytes.push(code);
    else if (code < 0x800) bytes.push(0xc0 | (code >> 6), 0x80 | (code & 63));
    else if (code < 0x10000) bytes.push(0xe0 | (code >> 12), 0x80 | ((code >> 6) & 63), 0x80 | (code & 63));
    else bytes.push(0xf0 | (code >> 18), 0x80 | ((code >> 12) & 63), 0x80 | ((code >> 6) & 63), 0x80 | (code & 63));
  }
  return Buffer.from(bytes);
}

function isResponse(message: unknown): boolean {
  if (Array.isArray(message)) return true;
  return typeof message === "object" && message !== null && "id" in message && !("method" in message);
}

interface Received {
  message: unknown;
  matched: boolean;
}

export class Replayer {
  private readonly child: ChildProcess;
  private readonly received: Received[] = [];
  private readonly junk: string[] = [];
  private readonly streams: Array<{ id: unknown; responseIndex: number }> = [];
  private wake: () => void = () => undefined;
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exited: Promise<void>;
  stderr = "";

  constructor(
    vector: Vector,
    private readonly expectTimeoutMs = 60_000,
  ) {
    this.child = spawn(python, ["-m", "sidecar", "serve"], {
      cwd: repositoryRoot,
      env: { ...process.env, LOCALMLX_MODELS_DIR: modelsDir, ...vector.env },
      stdio: ["pipe", "pipe", "pipe"],
    });
    const lines = new LineSplitter(1 << 30);
    const take = (frames: ReturnType<LineSplitter["push"]>): void => {
      for (const frame of frames) {
        if (isOversized(frame)) continue;
        try {
          this.received.push({ message: parseLine(frame), matched: false });
        } catch {
          this.junk.push(frame.toString("utf8"));
        }
      }
      this.wake();
    };
    this.child.stdout!.on("data", (chunk: Buffer) => take(lines.push(chunk)));
    this.child.stdout!.on("end", () => take(lines.end()));
    this.child.stderr!.on("data", (chunk: Buffer) => {
      this.stderr = (this.stderr + chunk.toString("utf8")).slice(-8192);
    });
    this.child.stdin!.on("error", () => undefined);
    this.exited = new Promise((resolve) => {
      this.child.once("exit", (code, signal) => {
        this.exit = { code, signal };
        this.wake();
        resolve();
      });
    });
  }

  async run(vector: Vector): Promise<void> {
    try {
      if (vector.initialize ?? true) {
        this.send({
          jsonrpc: "2.0",
          id: "vector-init",
          method: "initialize",
          params: { protocolVersion: PROTOCOL_VERSION, clientInfo: { name: "vectors" } },
        });
        await this.expect({ jsonrpc: "2.0", id: "vector-init", result: "$object" });
      }
      for (const step of vector.steps) await this.step(step);
      this.send({ jsonrpc: "2.0", id: "vector-end", method: "ping" });
      await this.expect({ jsonrpc: "2.0", id: "vector-end", result: {} });
      const extra = this.received.filter((item) => !item.matched && isResponse(item.message)).map((item) => item.message);
      assert.deepEqual(extra, [], "the sidecar wrote responses that no expect matched");
      assert.deepEqual(this.junk, [], "the sidecar wrote lines that are not JSON");
      for (const { id, responseIndex } of this.streams) {
        const late = this.chunkIndexes(id).filter((index) => index > responseIndex);
        assert.deepEqual(late, [], `generate/chunk for ${JSON.stringify(id)} arrived after its response`);
      }
      this.child.stdin!.end();
      const deadline = new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), 10_000).unref());
      assert.notEqual(await Promise.race([this.exited, deadline]), "timeout", "the sidecar did not exit within 10 s of EOF");
      assert.deepEqual(this.exit, { code: 0, signal: null }, "the sidecar must exit with code 0 after EOF");
    } finally {
      if (!this.exit) this.child.kill("SIGKILL");
      await this.exited;
    }
  }

  private async step(step: Step): Promise<void> {
    if ("send" in step) this.send(step.send);
    else if ("sendRaw" in step) this.write(Buffer.concat([utf8SurrogatePass(step.sendRaw), Buffer.from("\n")]));
    else if ("sendHex" in step) this.write(Buffer.from(step.sendHex, "hex"));
    else if ("sendRepeat" in step) {
      const { prefix, unit, count, suffix } = step.sendRepeat;
      this.write(Buffer.from(`${prefix}${unit.repeat(count)}${suffix}\n`, "utf8"));
    } else if ("expect" in step) await this.expect(step.expect);
    else if ("expectStream" in step) await this.expectStream(step.expectStream);
    else throw new Error(`unknown step ${JSON.stringify(step)}`);
  }

  private send(message: unknown): void {
    this.write(Buffer.from(`${JSON.stringify(message)}\n`, "utf8"));
  }

  private write(bytes: Buffer): void {
    this.child.stdin!.write(bytes);
  }

  /** Waits for an unmatched message that matches `pattern`; marks it (unless `mark` is false). */
  private async expect(pattern: unknown, mark = true): Promise<number> {
    const deadline = Date.now() + this.expectTimeoutMs;
    for (;;) {
      const index = this.received.findIndex((item) => !item.matched && matches(pattern, item.message));
      if (index >= 0) {
        if (mark) this.received[index]!.matched = true;
        return index;
      }
      const left = deadline - Date.now();
      if (left <= 0 || this.exit) {
        const recent = this.received.slice(-10).map((item) => JSON.stringify(item.message).slice(0, 300));
        throw new assert.AssertionError({
          message:
            `no message matched ${JSON.stringify(pattern)}` +
            `${this.exit ? ` (the sidecar exited: ${JSON.stringify(this.exit)})` : ""}; last received:\n${recent.join("\n")}` +
            `\nstderr:\n${this.stderr.slice(-2000)}`,
        });
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  private chunkIndexes(id: unknown): number[] {
    const indexes: number[] = [];
    this.received.forEach((item, index) => {
      const message = item.message as { method?: unknown; params?: { requestId?: unknown } };
      if (message?.method === "generate/chunk" && matches(id, message.params?.requestId)) indexes.push(index);
    });
    return indexes;
  }

  private async expectStream({ id, minChunks = 1 }: { id: unknown; minChunks?: number }): Promise<void> {
    const responseIndex = await this.expect({ jsonrpc: "2.0", id }, false);
    const indexes = this.chunkIndexes(id);
    const seqs = indexes.map((index) => (this.received[index]!.message as { params: { seq: unknown } }).params.seq);
    assert.ok(indexes.length >= minChunks, `only ${indexes.length} chunks for ${JSON.stringify(id)}, expected ${minChunks}`);
    assert.deepEqual(seqs, [...seqs.keys()], `chunk seqs for ${JSON.stringify(id)} must be 0, 1, 2, … without gaps`);
    assert.ok(indexes.every((index) => index < responseIndex), "every chunk must arrive before the response");
    for (const index of indexes) this.received[index]!.matched = true;
    this.streams.push({ id, responseIndex });
  }
}

export async function replay(vector: Vector, expectTimeoutMs?: number): Promise<void> {
  await new Replayer(vector, expectTimeoutMs).run(vector);
}

/**
 * `npm run bench:hostile`: the OpenAI endpoint under hostile load, in one run against the real
 * sidecar.
 *
 * 1. Memory: the RSS of the Node process and of the sidecar (`server/status` `rssBytes`: MLX,
 *    tokenizer and caches included) before and after a fuzz-like run of refused requests (bad
 *    targets and headers, 10,000-deep bodies, bodies past the limit), then a burst of maximal
 *    refused requests that reach the sidecar (prompts far past the context: a 15 MiB chat
 *    message, an 8 MiB completion prompt), and again after a pause.
 * 2. Rate: refused requests per second the endpoint answers on its own (401, 400 for nesting,
 *    404), with and without a streamed chat running, and the chat's tokens/s with and without
 *    that flood, side by side.
 *
 *   npm run bench:hostile -- --rounds 3 --concurrency 8 --max-tokens 200 --seconds 5 --model demo
 */
import { Agent, request } from "node:http";
import { connect } from "node:net";
import { parseArgs } from "node:util";
import { LocalMLX, startOpenAIServer } from "@localmlx/client";

const { values: args } = parseArgs({
  options: {
    rounds: { type: "string", default: "3" },
    concurrency: { type: "string", default: "8" },
    "max-tokens": { type: "string", default: "200" },
    seconds: { type: "string", default: "5" },
    model: { type: "string", default: "demo" },
  },
});
const ROUNDS = Number(args.rounds);
const CONCURRENCY = Number(args.concurrency);
const MAX_TOKENS = Number(args["max-tokens"]);
const SECONDS = Number(args.seconds);
const KEY = "bench-key";
const MiB = 1024 * 1024;

const mib = (bytes: number): string => `${(bytes / MiB).toFixed(0)} MiB`;

/** One request on a raw socket (bytes no HTTP client sends); resolves with the status (0: no answer). */
function raw(port: number, bytes: Buffer | string): Promise<number> {
  return new Promise((resolve) => {
    // Written, not ended: node's server drops a request whose client half-closes before the answer.
    const socket = connect(port, "127.0.0.1", () => socket.write(bytes));
    let head = "";
    const done = (): void => {
      socket.destroy();
      resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0));
    };
    socket.on("data", (chunk: Buffer) => {
      head += chunk.toString("latin1", 0, Math.min(chunk.length, 64));
      if (/^HTTP\/1\.1 \d{3}/.test(head)) done();
    });
    socket.on("error", () => undefined);
    socket.on("close", done);
  });
}

function post(path: string, body: string, key = KEY): string {
  return (
    `POST ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer ${key}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
  );
}

const deep = (depth: number): string => "[".repeat(depth) + "]".repeat(depth);

/** What the fuzz-like run sends: one of each kind of refusal, many times. */
function hostileRound(): Array<Buffer | string> {
  return [
    "GET http://[/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET //[ HTTP/1.1\r\nHost: x\r\n\r\n",
    `GET /v1/models/%ff%fe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nConnection: close\r\n\r\n`,
    "HELLO\r\n\r\n",
    `GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(32 * 1024)}\r\n\r\n`,
    post("/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":${deep(10_000)}}}]}`),
    post("/v1/chat/completions", `{"model":"demo","messages":${deep(1_000_000)}}`),
    post("/v1/chat/completions", JSON.stringify({ model: "x\nFORGED", messages: [{ role: "user", content: "hi" }] })),
    post("/v1/chat/completions", JSON.stringify({ model: "~root/.ssh", messages: [{ role: "user", content: "hi" }] })),
    post("/v1/chat/completions", "{not json"),
    post("/v1/chat/completions", JSON.stringify({ model: "demo", messages: [{ role: "user", content: "x".repeat(17 * MiB) }] })), // 413
  ];
}

/** Prompts far past the demo's context: refused by the sidecar, which should not keep their memory. */
function maximalRound(): string[] {
  return [
    post("/v1/chat/completions", JSON.stringify({ model: "demo", messages: [{ role: "user", content: "sea mountain river ".repeat((15 * MiB) / 19) }], max_tokens: 1 })),
    post("/v1/completions", JSON.stringify({ model: "demo", prompt: "sea mountain river ".repeat((8 * MiB) / 19), max_tokens: 1 })),
  ];
}

/** Refusals the endpoint answers without the sidecar, as fast as `CONCURRENCY` keep-alive clients send them, until `stop`. */
async function flood(port: number, stop: { done: boolean }): Promise<{ count: number; seconds: number; statuses: Map<number, number> }> {
  const agent = new Agent({ keepAlive: true, maxSockets: CONCURRENCY });
  const bodies = [
    { key: "wrong", body: "{}" },
    { key: KEY, body: `{"model":"demo","messages":${deep(100)}}` },
    { key: KEY, body: "{not json" },
  ];
  const statuses = new Map<number, number>();
  let count = 0;
  const started = performance.now();
  const one = (i: number): Promise<void> =>
    new Promise((resolve) => {
      const { key, body } = bodies[i % bodies.length]!;
      const path = i % 4 === 3 ? "/v1/nowhere" : "/v1/chat/completions";
      const req = request({ host: "127.0.0.1", port, path, method: "POST", agent, headers: { authorization: `Bearer ${key}`, "content-type": "application/json" } }, (res) => {
        statuses.set(res.statusCode ?? 0, (statuses.get(res.statusCode ?? 0) ?? 0) + 1);
        res.resume();
        res.on("end", resolve);
      });
      req.on("error", () => resolve());
      req.end(body);
    });
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async (_, worker) => {
      for (let i = worker; !stop.done; i += CONCURRENCY) {
        await one(i);
        count++;
      }
    }),
  );
  agent.destroy();
  return { count, seconds: (performance.now() - started) / 1000, statuses };
}

let chatNumber = 0;

/** One streamed chat through the endpoint: its completion tokens (from the usage chunk). */
async function streamedChat(baseUrl: string): Promise<number> {
  // Each prompt differs: the sidecar answers a repeated temperature-0 request from its cache.
  const story = ++chatNumber;
  const response = await fetch(`${baseUrl}/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" },
    body: JSON.stringify({
      model: args.model,
      messages: [{ role: "user", content: `Tell me long story number ${story} about the sea and the mountains.` }],
      max_tokens: MAX_TOKENS,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  const decoder = new TextDecoder();
  let tail = "";
  let tokens = 0;
  for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
    tail = (tail + decoder.decode(chunk, { stream: true })).slice(-400);
    const usage = /"completion_tokens":(\d+)/.exec(tail);
    if (usage) tokens = Number(usage[1]);
  }
  return tokens;
}

/** Streamed chats back to back for `seconds`: completion tokens per second of wall time (prefill included). */
async function chatsFor(baseUrl: string, seconds: number): Promise<{ chats: number; tps: number }> {
  const started = performance.now();
  let tokens = 0;
  let chats = 0;
  while (performance.now() - started < seconds * 1000) {
    tokens += await streamedChat(baseUrl);
    chats++;
  }
  return { chats, tps: tokens / ((performance.now() - started) / 1000) };
}

async function main(): Promise<void> {
  const mlx = await LocalMLX.start({ model: args.model });
  const server = await startOpenAIServer({ client: mlx, port: 0, fallback: false, apiKey: KEY });
  const port = server.addresses[0]!.port;
  // With --expose-gc (as `npm run bench:hostile` runs it), Node's garbage is collected before each reading.
  const collect = (globalThis as { gc?: () => void }).gc;
  const rss = async (): Promise<{ node: number; sidecar: number }> => {
    collect?.();
    return { node: process.memoryUsage().rss, sidecar: (await mlx.status()).memory.rssBytes };
  };
  try {
    await streamedChat(server.url); // warm-up: the model's first generation
    const before = await rss();
    const statuses = new Map<number, number>();
    const note = (status: number): void => void statuses.set(status, (statuses.get(status) ?? 0) + 1);
    for (let round = 0; round < ROUNDS; round++) for (const bytes of hostileRound()) note(await raw(port, bytes));
    const afterFuzz = await rss();
    const burstStarted = performance.now();
    const burst = new Map<number, number>();
    for (let round = 0; round < ROUNDS; round++) {
      for (const bytes of maximalRound()) {
        const status = await raw(port, bytes);
        burst.set(status, (burst.get(status) ?? 0) + 1);
      }
    }
    const burstSeconds = (performance.now() - burstStarted) / 1000;
    const afterBurst = await rss();
    await new Promise((resolve) => setTimeout(resolve, 2000));
    const settled = await rss();
    const answers = [...statuses.entries()].sort(([a], [b]) => a - b).map(([status, count]) => `${status}×${count}`).join(" ");
    console.log(`hostile run: ${ROUNDS} rounds, answers ${answers}`);
    const burstAnswers = [...burst.entries()].map(([status, count]) => `${status}×${count}`).join(" ");
    console.log(`maximal refused burst: ${ROUNDS * 2} requests (15 MiB chat, 8 MiB prompt) in ${burstSeconds.toFixed(1)} s, answers ${burstAnswers}`);
    console.log("RSS              node      sidecar");
    for (const [label, value] of [["before", before], ["after fuzz", afterFuzz], ["after burst", afterBurst], ["2 s later", settled]] as const) {
      console.log(`${label.padEnd(16)} ${mib(value.node).padStart(8)}  ${mib(value.sidecar).padStart(9)}`);
    }

    const quiet = await chatsFor(server.url, SECONDS);
    const idleStop = { done: false };
    const idleFlood = flood(port, idleStop);
    await new Promise((resolve) => setTimeout(resolve, SECONDS * 1000));
    idleStop.done = true;
    const alone = await idleFlood;
    const stop = { done: false };
    const flooding = flood(port, stop);
    const loaded = await chatsFor(server.url, SECONDS);
    stop.done = true;
    const during = await flooding;
    const rate = (f: typeof during): string => `${(f.count / f.seconds).toFixed(0)} req/s`.padStart(10);
    const tally = (f: typeof during): string => [...f.statuses].map(([status, n]) => `${status}×${n}`).join(" ");
    console.log(`refused requests, ${CONCURRENCY} keep-alive clients (401, 400 nesting, 400 JSON, 404), ${SECONDS} s each:`);
    console.log(`  alone                ${rate(alone)}  (${tally(alone)})`);
    console.log(`  while chats stream   ${rate(during)}  (${tally(during)})`);
    console.log(`streamed chats back to back (max_tokens ${MAX_TOKENS}, temperature 0), ${SECONDS} s each:`);
    console.log(`  alone                ${quiet.tps.toFixed(0).padStart(6)} tokens/s  (${quiet.chats} chats)`);
    console.log(`  under the flood      ${loaded.tps.toFixed(0).padStart(6)} tokens/s  (${loaded.chats} chats), ratio ${(loaded.tps / quiet.tps).toFixed(2)}`);
  } finally {
    await server.close();
    await mlx.close();
  }
}

void main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});

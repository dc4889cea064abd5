/**
 * Fuzzing the OpenAI endpoint with fast-check, against the real sidecar and the demo model:
 * generated request lines, targets, headers, framings and bodies (chat, completions and
 * embeddings bodies with hostile values, deep nesting, raw bytes), each sent on a raw socket.
 * Every one must be answered, within a deadline, with a status under 500 (an error in OpenAI's
 * shape); afterwards both processes' memory is bounded, the sidecar has not restarted, and a
 * normal chat works.
 *
 * Deterministic: a fixed seed, so CI runs the same cases every time (300 of them, about half a
 * minute). `LOCALMLX_SOAK=long` runs 5,000 (`npm run fuzz:endpoint`); `LOCALMLX_SOAK_SEED=n` picks
 * another reproducible set.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import fc from "fast-check";
import { startOpenAIServer, type LocalMLX, type OpenAIServer } from "../src/index";
import { startClient } from "./helpers";
import { httpRequest, rawExchange, type RawResponse } from "./raw-http";

const LONG = process.env.LOCALMLX_SOAK === "long";
const SEED = Number(process.env.LOCALMLX_SOAK_SEED ?? "") || 20_231;
const RUNS = LONG ? 5000 : 300;
/** The longest a refusal or a 1-token chat may take, slow clients' 408 included. */
const DEADLINE_MS = 20_000;
/** Growth allowed over the run (documented in RELIABILITY.md). */
const NODE_RSS_MARGIN = 256 * 1024 * 1024;
const SIDECAR_RSS_MARGIN = 256 * 1024 * 1024;

const KEY = "fuzz-key";
const MiB = 1024 * 1024;

// ---- values ---------------------------------------------------------------------------------

const hostile = fc.constantFrom(
  "", " ", "\n", "x\nFORGED 127.0.0.1 GET /admin 200", "\u0000", "\u2028", "\ud800", "~root/.ssh", "~nosuchuser/.ssh",
  "/etc/passwd", "../../etc", "%00", "demo\r\n", "nobody/no-such-model", "a".repeat(3000), "__proto__", "constructor", "🙂",
);
const text = fc.oneof(fc.string({ maxLength: 20 }), fc.string({ unit: "binary", maxLength: 20 }), hostile);
const anyJson = fc.jsonValue({ maxDepth: 3 });

/** A marker replaced by JSON nested `depth` deep when the body is written (raw text: JSON.stringify would recurse). */
const deep = fc.record({ depth: fc.integer({ min: 60, max: 20_000 }), open: fc.constantFrom("[", '{"a":') }).map(({ depth, open }) => `@@deep:${depth}:${open === "[" ? "a" : "o"}@@`);
function nested(depth: number, kind: string): string {
  return kind === "a" ? "[".repeat(depth) + "]".repeat(depth) : '{"a":'.repeat(depth - 1) + "{}" + "}".repeat(depth - 1);
}
const deepArguments = fc.integer({ min: 60, max: 3000 }).map((depth) => nested(depth, "o"));

const schema = fc.oneof(
  fc.constantFrom<unknown>(
    { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    { type: "string" }, true, false, {}, { type: "object", description: "d".repeat(70_000) }, { $ref: "#/nope" },
    { type: "string", pattern: "(a+)+$" },
  ),
  anyJson,
  deep,
);
const toolCall = fc.record({
  id: text,
  type: fc.constant("function"),
  function: fc.record({ name: text, arguments: fc.oneof(fc.json({ maxDepth: 3 }), text, deepArguments, fc.integer({ min: 1, max: 64 }).map((depth) => nested(depth, "o"))) }),
});
const message = fc.oneof(
  fc.record({ role: fc.constantFrom("user", "system", "developer"), content: fc.oneof(text, fc.array(fc.record({ type: fc.constant("text"), text }), { minLength: 1, maxLength: 2 })) }),
  fc.record({ role: fc.constant("assistant"), content: fc.oneof(text, fc.constant(null)), tool_calls: fc.array(toolCall, { minLength: 1, maxLength: 2 }) }),
  fc.record({ role: fc.constant("tool"), content: text, tool_call_id: text }),
);
const tool = fc.record({ type: fc.constant("function"), function: fc.record({ name: fc.oneof(fc.stringMatching(/^[a-z_]{1,12}$/), text), description: text, parameters: schema }) });
const badMessage = fc.oneof(
  fc.record({ role: fc.constantFrom("user", "assistant", "tool", "function", "bogus", ""), content: fc.oneof(fc.constant(null), anyJson, fc.array(fc.record({ type: fc.constantFrom("image_url", "refusal", 5), text }), { maxLength: 2 })) }),
  fc.record({ role: fc.constant("assistant"), content: text, tool_calls: fc.oneof(anyJson, fc.array(fc.record({ function: fc.record({ name: anyJson, arguments: fc.oneof(anyJson, deep) }, { requiredKeys: [] }) }, { requiredKeys: [] }))) }),
  anyJson,
);
/** Each field's hostile values: one or two replace a valid body's fields. `max_tokens` stays invalid or small. */
const hostileFields: Record<string, fc.Arbitrary<unknown>> = {
  model: fc.oneof(hostile, anyJson),
  messages: fc.oneof(fc.array(fc.oneof(message, badMessage), { minLength: 1, maxLength: 4 }), fc.constantFrom<unknown>([], "@@many-messages@@"), anyJson),
  max_tokens: fc.constantFrom<unknown>(0, -1, 1.5, "2", 1e20, [], {}, 2),
  stream: anyJson,
  stream_options: anyJson,
  temperature: fc.oneof(fc.double(), anyJson),
  top_p: fc.double(),
  seed: fc.oneof(fc.integer(), fc.double(), anyJson),
  stop: fc.oneof(text, fc.array(text, { maxLength: 20 }), anyJson),
  logit_bias: fc.oneof(fc.dictionary(fc.oneof(fc.nat().map(String), text), fc.oneof(fc.double(), anyJson), { maxKeys: 3 }), anyJson),
  n: anyJson,
  logprobs: fc.oneof(fc.boolean(), anyJson),
  tools: fc.oneof(fc.array(tool, { maxLength: 3 }), fc.array(anyJson, { maxLength: 2 }), fc.constant("@@many-tools@@"), anyJson),
  tool_choice: fc.oneof(fc.constantFrom("auto", "none", "required"), fc.record({ type: fc.constant("function"), function: fc.record({ name: text }) }), anyJson),
  response_format: fc.oneof(
    fc.record({ type: fc.constantFrom("json_object", "json_schema", "text", "xml"), json_schema: fc.record({ name: text, schema }, { requiredKeys: [] }) }, { requiredKeys: ["type"] }),
    anyJson,
  ),
  chat_template_kwargs: fc.oneof(fc.record({ enable_thinking: fc.boolean() }), anyJson),
  prompt: fc.oneof(text, fc.array(text, { maxLength: 2 }), anyJson, deep),
  input: fc.oneof(text, fc.array(text, { maxLength: 3 }), fc.array(fc.integer(), { maxLength: 3 }), anyJson),
  echo: anyJson,
  suffix: text,
  best_of: anyJson,
  dimensions: anyJson,
  encoding_format: text,
};
const mutations = fc.array(fc.oneof(...Object.entries(hostileFields).map(([key, values]) => values.map((value) => [key, value] as const))), { maxLength: 2 });
/** A valid body of each kind (with hostile but valid text, tools, schemas), then 0–2 fields made hostile. */
const validChat = fc.record({
  model: fc.constant("demo"),
  messages: fc.array(message, { minLength: 1, maxLength: 3 }),
  max_tokens: fc.constant(1),
  stream: fc.boolean(),
  temperature: fc.double({ min: 0, max: 2, noNaN: true }),
  tools: fc.array(tool, { maxLength: 2 }),
  stop: fc.array(text, { maxLength: 3 }),
}, { requiredKeys: ["model", "messages", "max_tokens"] });
const validCompletion = fc.record({ model: fc.constant("demo"), prompt: text, max_tokens: fc.constant(1), stream: fc.boolean(), echo: fc.boolean() }, { requiredKeys: ["model", "prompt", "max_tokens"] });
const validEmbeddings = fc.record({ model: fc.constant("demo"), input: fc.oneof(text, fc.array(text, { minLength: 1, maxLength: 3 })) });
const aimedBody = fc.tuple(
  fc.oneof(
    { weight: 3, arbitrary: validChat.map((value) => ["/v1/chat/completions", value] as const) },
    { weight: 1, arbitrary: validCompletion.map((value) => ["/v1/completions", value] as const) },
    { weight: 1, arbitrary: validEmbeddings.map((value) => ["/v1/embeddings", value] as const) },
  ),
  mutations,
).map(([[path, valid], changes]) => ({ path, body: { ...valid, ...Object.fromEntries(changes) } as Record<string, unknown> }));
const jsonBody = aimedBody.map(({ body }) => body);

/** JSON text, with the markers for deep nesting and long arrays written out as raw text. */
function written(value: unknown): string {
  return JSON.stringify(value)
    .replace(/"@@deep:(\d+):([ao])@@"/g, (_, depth: string, kind: string) => nested(Number(depth), kind))
    .replace(/"@@many-messages@@"/g, () => `[${Array.from({ length: 2049 }, () => '{"role":"user","content":"hi"}').join(",")}]`)
    .replace(/"@@many-tools@@"/g, () => `[${Array.from({ length: 129 }, (_, i) => `{"type":"function","function":{"name":"f${i}"}}`).join(",")}]`);
}

const body = fc.oneof(
  { weight: 10, arbitrary: jsonBody.map((value) => Buffer.from(written(value))) },
  { weight: 2, arbitrary: fc.json({ maxDepth: 4 }).map((value) => Buffer.from(value)) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 200 }).map((bytes) => Buffer.from(bytes)) },
  { weight: 1, arbitrary: fc.tuple(jsonBody, fc.nat()).map(([value, cut]) => { const json = written(value); return Buffer.from(json.slice(0, cut % (json.length + 1))); }) },
  { weight: 1, arbitrary: fc.constantFrom("empty", "deep", "prompt", "huge").map(bigBody) },
);

/** Bodies at the limits: nothing, 200,000 deep, a 3.8 MB prompt (past the demo's context), 17 MiB (past the body limit). */
function bigBody(kind: string): Buffer {
  switch (kind) {
    case "deep":
      return Buffer.from(`{"model":"demo","messages":${nested(200_000, "a")}}`);
    case "prompt":
      return Buffer.from(JSON.stringify({ model: "demo", prompt: "sea mountain river ".repeat(200_000), max_tokens: 1 }));
    case "huge":
      return Buffer.alloc(17 * MiB, 0x20);
    default:
      return Buffer.alloc(0);
  }
}

// ---- requests ---------------------------------------------------------------------------------

const route = fc.constantFrom(
  "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/demo", "/v1/health",
  "/chat/completions", "/v1/chat/completions/", "/",
);
const oddTarget = fc.constantFrom(
  "//[", "http://[/v1/models", "http://127.0.0.1/v1/chat/completions", "//v1/models", "*", "/v1/models/%", "/%E0%A4%A",
  "/%ff%fe", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/v1/models/~root%2F.ssh", "/__proto__", "/constructor",
  "/v1/hasOwnProperty", "/v1/models/constructor", "/v1/../v1/models", `/v1/models/${"a".repeat(8000)}`, "/v1/models/%00",
  "/v1/chat/completions?stream=true", "/v1/chat/completions#x", "/v1//chat/completions", "", "http://x:99999/v1/models",
);
const percentJunk = fc.array(fc.constantFrom("%", "%e", "%E0", "%ff", "%41", "%2F", "%%", "a", "/", "%0a", "%C0%AF"), { maxLength: 6 }).map((parts) => `/v1/models/${parts.join("")}`);
const target = fc.oneof(
  { weight: 8, arbitrary: route },
  { weight: 2, arbitrary: oddTarget },
  { weight: 1, arbitrary: percentJunk },
  { weight: 1, arbitrary: fc.string({ maxLength: 30 }).map((s) => `/${s}`) },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 30 }).map((s) => `/v1/models/${encodeURIComponent(s.replace(/[\ud800-\udfff]/g, ""))}`) },
);
const method = fc.oneof(
  { weight: 10, arbitrary: fc.constant("POST") },
  { weight: 3, arbitrary: fc.constant("GET") },
  { weight: 2, arbitrary: fc.constantFrom("PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "BREW", "", "G T", "POST\u0000") },
);
const version = fc.oneof({ weight: 12, arbitrary: fc.constant("HTTP/1.1") }, { weight: 1, arbitrary: fc.constantFrom("HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "", "HTTP/1.1 x", "http/1.1") });
const authorization = fc.oneof(
  { weight: 12, arbitrary: fc.constant<string | undefined>(`Bearer ${KEY}`) },
  { weight: 2, arbitrary: fc.constantFrom<string | undefined>(undefined, "Bearer", "Bearer wrong", `bearer ${KEY}`, `Bearer  ${KEY}  `, `Basic ${KEY}`, `Bearer ${"k".repeat(5000)}`) },
);
const header = fc.oneof(
  fc.constantFrom<[string, string]>(
    ["X-Big", "a".repeat(20_000)], ["Expect", "100-continue"], ["Expect", "foo"], ["Upgrade", "websocket"], ["Content-Type", "text/plain"],
    ["Host", ""], [" Bad", "x"], ["X\u0000", "y"], ["X-Ctl", "a\u0001b"], ["X-Utf8", "é"], ["Transfer-Encoding", "gzip"],
    ["Content-Encoding", "gzip"], ["Connection", "keep-alive"], ["Authorization", "Bearer other"],
  ),
  fc.tuple(fc.string({ maxLength: 10 }), fc.string({ maxLength: 20 })),
);
const framing = fc.oneof(
  { weight: 20, arbitrary: fc.constant("length") },
  { weight: 1, arbitrary: fc.constantFrom("chunked", "none", "short", "long", "bad-length", "two-lengths", "bad-chunks") },
);

interface Case {
  method: string;
  target: string;
  version: string;
  authorization: string | undefined;
  framing: string;
  headers: Array<[string, string]>;
  body: Buffer;
}

const anyCase: fc.Arbitrary<Case> = fc.record({
  method,
  target,
  version,
  authorization,
  framing,
  headers: fc.oneof({ weight: 4, arbitrary: fc.constant<Array<[string, string]>>([]) }, { weight: 1, arbitrary: fc.array(header, { minLength: 1, maxLength: 2 }) }),
  body,
});
/** A POST of a JSON body to its own route, with the key: the cases that reach the sidecar. */
const aimedCase: fc.Arbitrary<Case> = aimedBody.map(({ path, body }) => ({
  method: "POST",
  target: path,
  version: "HTTP/1.1",
  authorization: `Bearer ${KEY}`,
  framing: "length",
  headers: [],
  body: Buffer.from(written(body)),
}));
const cases = fc.oneof({ weight: 2, arbitrary: anyCase }, { weight: 1, arbitrary: aimedCase });

/** The case as bytes on the wire (latin1 for the head: each char one byte, as a raw client would send). */
function wire(c: Case): Buffer {
  const lines = [`${c.method} ${c.target}${c.version ? ` ${c.version}` : ""}`, "Host: 127.0.0.1", "Connection: close"];
  if (c.authorization !== undefined) lines.push(`Authorization: ${c.authorization}`);
  lines.push("Content-Type: application/json");
  let payload = c.body;
  switch (c.framing) {
    case "length":
      lines.push(`Content-Length: ${payload.length}`);
      break;
    case "short":
      lines.push(`Content-Length: ${Math.floor(payload.length / 2)}`);
      break;
    case "long":
      lines.push(`Content-Length: ${payload.length + 10}`);
      break;
    case "bad-length":
      lines.push("Content-Length: 1e3");
      break;
    case "two-lengths":
      lines.push(`Content-Length: ${payload.length}`, `Content-Length: ${payload.length + 1}`);
      break;
    case "chunked":
      lines.push("Transfer-Encoding: chunked");
      payload = Buffer.concat([Buffer.from(`${payload.length.toString(16)}\r\n`), payload, Buffer.from(payload.length ? "\r\n0\r\n\r\n" : "\r\n")]);
      break;
    case "bad-chunks":
      lines.push("Transfer-Encoding: chunked");
      payload = Buffer.concat([Buffer.from("zz\r\n"), payload]);
      break;
  }
  for (const [name, value] of c.headers) lines.push(`${name}: ${value}`);
  return Buffer.concat([Buffer.from(`${lines.join("\r\n")}\r\n\r\n`, "latin1"), payload]);
}

function describeCase(c: Case, response: RawResponse | undefined): string {
  return JSON.stringify({
    request: wire(c).subarray(0, 600).toString("latin1"),
    response: response ? { status: response.status, body: response.body.slice(0, 300) } : "none",
  });
}

// ---- the run ---------------------------------------------------------------------------------

describe("fuzzing the OpenAI endpoint", { timeout: LONG ? 3_600_000 : 600_000 }, () => {
  let mlx: LocalMLX;
  let server: OpenAIServer;
  const lines: string[] = [];

  before(async () => {
    mlx = await startClient();
    server = await startOpenAIServer({
      client: mlx,
      port: 0,
      fallback: false,
      apiKey: KEY,
      headersTimeoutMs: 1000,
      bodyTimeoutMs: 1500,
      keepAliveTimeoutMs: 1000,
      logger: { info: (line) => lines.push(line), warn: (line) => lines.push(line), error: (line) => lines.push(line) },
    });
  });
  after(async () => {
    await server?.close();
    await mlx?.close();
  });

  test(`${RUNS} generated hostile requests: each answered under 500 within the deadline; memory bounded; a chat works after`, async () => {
    const port = server.addresses[0]!.port;
    const sidecarPid = mlx.pid;
    const rssBefore = { node: process.memoryUsage().rss, sidecar: (await mlx.status()).memory.rssBytes };
    const statuses = new Map<number, number>();
    let slowest = { ms: 0, what: "" };
    await fc.assert(
      fc.asyncProperty(cases, async (c) => {
        const response = await rawExchange(port, wire(c), { deadlineMs: DEADLINE_MS });
        assert.ok(response, `answered: ${describeCase(c, response)}`);
        statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
        if (response.ms > slowest.ms) slowest = { ms: response.ms, what: describeCase(c, response).slice(0, 400) };
        assert.ok(response.status < 500, `no 5xx for client input: ${describeCase(c, response)}`);
        if (response.status >= 400 && c.method !== "HEAD") {
          const error = response.json?.error;
          assert.ok(error && typeof error.message === "string" && "code" in error && "param" in error, `OpenAI's error shape: ${describeCase(c, response)}`);
        }
      }),
      { seed: SEED, numRuns: RUNS, endOnFailure: !LONG },
    );
    const rssAfter = { node: process.memoryUsage().rss, sidecar: (await mlx.status()).memory.rssBytes };
    const histogram = [...statuses.entries()].sort(([a], [b]) => a - b).map(([status, count]) => `${status}×${count}`).join(" ");
    const mib = (bytes: number): string => `${(bytes / MiB).toFixed(0)} MiB`;
    console.log(
      `fuzz: ${RUNS} cases, seed ${SEED}: ${histogram}; RSS node ${mib(rssBefore.node)} → ${mib(rssAfter.node)}, ` +
        `sidecar ${mib(rssBefore.sidecar)} → ${mib(rssAfter.sidecar)}; slowest ${slowest.ms} ms: ${slowest.what}`,
    );
    assert.ok(rssAfter.node - rssBefore.node < NODE_RSS_MARGIN, `node RSS grew ${mib(rssAfter.node - rssBefore.node)}`);
    assert.ok(rssAfter.sidecar - rssBefore.sidecar < SIDECAR_RSS_MARGIN, `sidecar RSS grew ${mib(rssAfter.sidecar - rssBefore.sidecar)}`);
    assert.equal(mlx.pid, sidecarPid, "the sidecar never restarted");
    for (const line of lines) assert.doesNotMatch(line, /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/, `log lines escaped: ${JSON.stringify(line)}`);

    const chat = await rawExchange(
      port,
      httpRequest("POST", "/v1/chat/completions", JSON.stringify({ model: "demo", messages: [{ role: "user", content: "Hello" }], max_tokens: 4 }), {
        Authorization: `Bearer ${KEY}`,
      }),
    );
    assert.equal(chat?.status, 200, chat?.body);
    assert.equal((chat!.json as { usage: { completion_tokens: number } }).usage.completion_tokens, 4);
  });
});

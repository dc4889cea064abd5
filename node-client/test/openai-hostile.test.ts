/**
 * The OpenAI endpoint under hostile input, against the real sidecar and the demo model: request
 * lines, targets, headers and bodies no client library sends, over raw sockets. Each answer is
 * OpenAI's error shape with a 4xx status; nothing crashes the process or forges a log line.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { startOpenAIServer, type LocalMLX, type OpenAIRequestInfo, type OpenAIServer } from "../src/index";
import { startClient } from "./helpers";
import { httpRequest, nestedArrays, nestedObjects, rawExchange, type RawResponse } from "./raw-http";

const user = { role: "user", content: "Hi" };

/** The next `request` event of a server that matches. */
function nextRequest(server: OpenAIServer, match: (info: OpenAIRequestInfo) => boolean): Promise<OpenAIRequestInfo> {
  return new Promise((resolve) => {
    const listener = (info: OpenAIRequestInfo): void => {
      if (!match(info)) return;
      server.off("request", listener);
      resolve(info);
    };
    server.on("request", listener);
  });
}

/** An answer in OpenAI's error shape with `status` (and `code`, `param` when given). */
function assertError(response: RawResponse | undefined, status: number, expected: { code?: string; param?: string | RegExp } = {}): void {
  assert.ok(response, `an answer (${status}) rather than a closed connection`);
  assert.equal(response.status, status, `status ${response.status}: ${response.body.slice(0, 300)}`);
  assert.match(response.headers["content-type"] ?? "", /application\/json/);
  const error = response.json?.error;
  assert.ok(error, `OpenAI's error shape: ${response.body.slice(0, 300)}`);
  assert.equal(typeof error.message, "string");
  assert.equal(typeof error.type, "string");
  assert.ok("param" in error && "code" in error);
  if (expected.code !== undefined) assert.equal(error.code, expected.code);
  if (typeof expected.param === "string") assert.equal(error.param, expected.param);
  else if (expected.param) assert.match(error.param ?? "", expected.param);
}

function chatBody(extra: Record<string, unknown>): string {
  return JSON.stringify({ model: "demo", messages: [user], max_tokens: 2, ...extra });
}

/** A chat body with `inner` (raw JSON text) spliced in at `where`. */
function splice(where: "tools" | "response_format" | "arguments", inner: string): string {
  switch (where) {
    case "tools":
      return `{"model":"demo","messages":[{"role":"user","content":"Hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":${inner}}}]}`;
    case "response_format":
      return `{"model":"demo","messages":[{"role":"user","content":"Hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":${inner}}}}`;
    case "arguments":
      return `{"model":"demo","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":${inner}}}]},{"role":"tool","tool_call_id":"c","content":"ok"}]}`;
  }
}

describe("the endpoint under hostile input", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  let open: OpenAIServer;
  let keyed: OpenAIServer;
  const lines: string[] = [];
  let loggerThrows = false;
  const take = (line: string): void => {
    if (loggerThrows) throw new Error("the log stream is closed");
    lines.push(line);
  };
  const capture = { info: take, warn: take, error: take, debug: take };
  const port = (): number => open.addresses[0]!.port;

  before(async () => {
    mlx = await startClient();
    open = await startOpenAIServer({ client: mlx, port: 0, fallback: false, logger: capture, headersTimeoutMs: 1000, bodyTimeoutMs: 1500 });
    keyed = await startOpenAIServer({ client: mlx, port: 0, fallback: false, apiKey: "sekret" });
  });
  after(async () => {
    await open?.close();
    await keyed?.close();
    await mlx?.close();
  });

  test("a target that is no URL (http://[, //[) is answered, not a crash", async () => {
    assertError(await rawExchange(port(), "GET http://[/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 400, { code: "invalid_request_target" });
    assertError(await rawExchange(port(), "GET //[/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 404, { code: "unknown_url" });
    assertError(await rawExchange(port(), httpRequest("GET", "//[")), 404);
    // Without the key, the same targets are 401: authentication comes before anything else.
    const keyedPort = keyed.addresses[0]!.port;
    assertError(await rawExchange(keyedPort, httpRequest("GET", "http://[/v1/models")), 401, { code: "invalid_api_key" });
    assertError(await rawExchange(keyedPort, httpRequest("GET", "//[/v1/models")), 401, { code: "invalid_api_key" });
    assertError(await rawExchange(keyedPort, httpRequest("POST", "/v1/chat/completions", splice("tools", nestedArrays(10_000)))), 401);
    assertError(await rawExchange(keyedPort, httpRequest("POST", "/nowhere", "{not json")), 401);
    const models = await rawExchange(port(), httpRequest("GET", "/v1/models"));
    assert.equal(models?.status, 200);
  });

  test("broken percent-encoding is a 4xx, never 'URI malformed'", async () => {
    for (const target of ["/v1/models/%", "/v1/models/%E0%A4%A", "/v1/models/%ff%fe", "/v1/models/%zz"]) {
      assertError(await rawExchange(port(), httpRequest("GET", target)), 400, { code: "invalid_request_target", param: "model" });
    }
    for (const target of ["/%E0%A4%A", "/%ff%fe", "/v1/%", "/v1/chat/completions%"]) {
      assertError(await rawExchange(port(), httpRequest("GET", target)), 404, { code: "unknown_url" });
    }
  });

  test("JSON nested 10,000 deep is a 400 naming where, in each place a schema or arguments go", async () => {
    const cases: Array<[Parameters<typeof splice>[0], RegExp]> = [
      ["tools", /^tools\[0\]\.function\.parameters/],
      ["response_format", /^response_format\.json_schema\.schema/],
      ["arguments", /^messages\[1\]\.tool_calls\[0\]\.function\.arguments/],
    ];
    for (const [where, param] of cases) {
      for (const inner of [nestedObjects(10_000), nestedArrays(10_000)]) {
        const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", splice(where, inner)));
        assertError(response, 400, { code: "nesting_too_deep", param });
      }
    }
    // Arguments are a string of JSON: nested 10,000 or 1,000 deep inside it, refused the same way.
    for (const depth of [10_000, 1000, 65]) {
      const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", splice("arguments", JSON.stringify(nestedObjects(depth)))));
      assertError(response, 400, { code: "nesting_too_deep", param: "messages[1].tool_calls[0].function.arguments" });
    }
    // A 10,000-deep completion prompt body too (the whole body is scanned, whatever the path).
    assertError(await rawExchange(port(), httpRequest("POST", "/v1/completions", `{"prompt":${nestedArrays(10_000)}}`)), 400, { code: "nesting_too_deep", param: /^prompt/ });
  });

  test("arguments nested within the limit still serve a chat", async () => {
    const body = splice("arguments", JSON.stringify(nestedObjects(20)));
    const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", `${body.slice(0, -1)},"max_tokens":2}`));
    assert.equal(response?.status, 200, response?.body);
  });

  test("a model name with a newline cannot forge a log line", async () => {
    lines.length = 0;
    const forged = "x\nFORGED 127.0.0.1 GET /admin 200\r\n\u001b[2Kend\u2028";
    const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", chatBody({ model: forged })));
    assertError(response, 403, { code: "forbidden" });
    const line = lines.find((text) => text.includes("/v1/chat/completions"));
    assert.ok(line, `a log line for the request: ${JSON.stringify(lines)}`);
    assert.match(line, /model=x\\nFORGED/);
    for (const text of lines) {
      assert.doesNotMatch(text, /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/, `no raw control character: ${JSON.stringify(text)}`);
      assert.ok(!text.startsWith("FORGED"));
    }
  });

  test("a body sent at 1 byte/s is answered 408 once bodyTimeoutMs has passed", async () => {
    lines.length = 0;
    const logged = nextRequest(open, (info) => info.status === 408);
    let timer: NodeJS.Timeout | undefined;
    const response = await rawExchange(port(), "", {
      deadlineMs: 8000,
      write: (socket) => {
        socket.write("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{");
        timer = setInterval(() => socket.writable && socket.write(" "), 1000);
        socket.on("close", () => clearInterval(timer));
      },
    });
    clearInterval(timer);
    assertError(response, 408, { code: "request_timeout" });
    assert.ok(response!.ms < 6000, `answered in ${response!.ms} ms`);
    const info = await logged;
    assert.equal(info.errorCode, "request_timeout");
    assert.ok(lines.some((text) => /POST \/v1\/chat\/completions 408 .*error=request_timeout/.test(text)), `the 408 is logged: ${JSON.stringify(lines)}`);
  });

  test("headers sent slowly are answered 408 once headersTimeoutMs has passed", async () => {
    let timer: NodeJS.Timeout | undefined;
    const response = await rawExchange(port(), "", {
      deadlineMs: 8000,
      write: (socket) => {
        socket.write("GET /v1/models HTTP/1.1\r\nHost: x\r\n");
        timer = setInterval(() => socket.writable && socket.write("X-Slow: 1\r\n"), 300);
        socket.on("close", () => clearInterval(timer));
      },
    });
    clearInterval(timer);
    assertError(response, 408, { code: "request_timeout" });
  });

  test("headers over the limit are 431; a request line that is not HTTP is 400", async () => {
    assertError(await rawExchange(port(), httpRequest("GET", "/v1/models", undefined, { "X-Big": "a".repeat(32 * 1024) })), 431, { code: "headers_too_large" });
    assertError(await rawExchange(port(), "HELLO\r\n\r\n"), 400, { code: "bad_request" });
    assertError(await rawExchange(port(), "GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"), 400, { code: "bad_request" });
    assertError(await rawExchange(port(), Buffer.from([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x0d, 0x0a, 0x0d, 0x0a])), 400);
  });

  test("one route table: an unknown path is 404, a wrong method 405 with Allow", async () => {
    assertError(await rawExchange(port(), httpRequest("GET", "/v1/nowhere")), 404, { code: "unknown_url" });
    const wrong = await rawExchange(port(), httpRequest("DELETE", "/v1/chat/completions"));
    assertError(wrong, 405, { code: "method_not_allowed" });
    assert.equal(wrong!.headers.allow, "POST");
    const models = await rawExchange(port(), httpRequest("POST", "/v1/models/demo", "{}"));
    assertError(models, 405);
    assert.equal(models!.headers.allow, "GET");
    // CONNECT (a proxy tunnel) is answered too, not dropped: 405, or 401 without the key.
    assertError(await rawExchange(port(), "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"), 405);
    assertError(await rawExchange(keyed.addresses[0]!.port, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"), 401);
    const head = await rawExchange(port(), httpRequest("HEAD", "/v1/chat/completions"));
    assert.equal(head?.status, 405);
  });

  test("limits are checked before any work: each a 400 naming its param", async () => {
    const tool = (i: number, parameters: unknown = { type: "object" }) => ({ type: "function", function: { name: `f${i}`, parameters } });
    const post = (body: string) => rawExchange(port(), httpRequest("POST", "/v1/chat/completions", body));
    assertError(await post(chatBody({ messages: Array.from({ length: 2049 }, () => user) })), 400, { code: "too_many_items", param: "messages" });
    assertError(await post(chatBody({ tools: Array.from({ length: 129 }, (_, i) => tool(i)) })), 400, { code: "too_many_items", param: "tools" });
    const huge = { type: "object", description: "d".repeat(70_000) };
    assertError(await post(chatBody({ tools: [tool(0), tool(1, huge)] })), 400, { code: "schema_too_large", param: "tools[1].function.parameters" });
    assertError(await post(chatBody({ response_format: { type: "json_schema", json_schema: { name: "x", schema: huge } } })), 400, { code: "schema_too_large", param: "response_format.json_schema.schema" });
    assertError(await post(chatBody({ stop: Array.from({ length: 17 }, (_, i) => `s${i}`) })), 400, { param: "stop" });
  });

  test("a prompt far past the context is 400 context_length_exceeded", async () => {
    const prompt = "sea mountain river ".repeat(200_000); // 3.8 MB: refused by the sidecar's byte check
    const response = await rawExchange(port(), httpRequest("POST", "/v1/completions", JSON.stringify({ model: "demo", prompt, max_tokens: 2 })), { deadlineMs: 60_000 });
    assertError(response, 400, { code: "context_length_exceeded" });
  });

  test("refused model paths all get one status and one message, whether they exist or not", async () => {
    const names = ["~root/.ssh", "~nosuchuser/.ssh", "/etc/passwd", "/etc/no-such-dir/x", "../../etc"];
    const answers = [];
    for (const model of names) {
      const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", chatBody({ model })));
      assertError(response, 403);
      const error = response!.json!.error!;
      answers.push({ type: error.type, code: error.code, param: error.param, message: error.message.split(model).join("<model>") });
    }
    for (const answer of answers) assert.deepEqual(answer, answers[0], `${JSON.stringify(answers, null, 1)}`);
  });

  test("a logger that throws reaches no unhandled rejection or uncaught exception; the endpoint answers on", async () => {
    const escaped: unknown[] = [];
    const note = (reason: unknown): void => void escaped.push(reason);
    process.on("unhandledRejection", note);
    process.on("uncaughtExceptionMonitor", note);
    loggerThrows = true;
    try {
      const models = await rawExchange(port(), httpRequest("GET", "/v1/models"));
      assert.equal(models?.status, 200);
      assertError(await rawExchange(port(), "GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
      assertError(await rawExchange(port(), "NOT HTTP\r\n\r\n"), 400);
      assertError(await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", "{broken")), 400);
      await new Promise((resolve) => setTimeout(resolve, 50));
    } finally {
      loggerThrows = false;
      process.off("unhandledRejection", note);
      process.off("uncaughtExceptionMonitor", note);
    }
    assert.deepEqual(escaped, []);
  });

  test("after all of it, a normal chat works", async () => {
    const response = await rawExchange(port(), httpRequest("POST", "/v1/chat/completions", chatBody({ max_tokens: 4 })));
    assert.equal(response?.status, 200, response?.body);
    const chat = response!.json as { choices: Array<{ message: { content: string } }>; usage: { completion_tokens: number } };
    assert.equal(chat.usage.completion_tokens, 4);
  });
});

/**
 * The OpenAI-compatible endpoint against the real sidecar and the demo model, driven by the
 * official `openai` SDK (and raw HTTP where a client library hides what is checked).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { request as httpRequest } from "node:http";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { LocalMLX, startOpenAIServer, type OpenAIRequestInfo, type OpenAIServer } from "../src/index";
import { modelsDir, python, repositoryRoot, startClient } from "./helpers";

const weatherTool = {
  type: "function" as const,
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 20 } },
      required: ["city"],
      additionalProperties: false,
    },
  },
};

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

/** A tiny Qwen3-Embedding built by the Python test helpers, or undefined when they cannot build one. */
function buildEmbeddingModel(): string | undefined {
  const built = spawnSync(
    python,
    ["-c", "import sys; from pathlib import Path; from tests.families import build_embedding_model; print(build_embedding_model(Path(sys.argv[1])).name)", modelsDir],
    { cwd: repositoryRoot, encoding: "utf8" },
  );
  return built.status === 0 ? built.stdout.trim().split("\n").pop() : undefined;
}

describe("the OpenAI endpoint with the openai SDK", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  let server: OpenAIServer;
  let openai: OpenAI;

  before(async () => {
    mlx = await startClient();
    server = await startOpenAIServer({ client: mlx, port: 0, fallback: false, aliases: { "gpt-4o-mini": "demo" } });
    openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => {
    await server?.close();
    await mlx?.close();
  });

  test("binds loopback only by default, and lists models (aliases included)", async () => {
    assert.equal(server.addresses[0]!.host, "127.0.0.1");
    const ids: string[] = [];
    for await (const model of openai.models.list()) ids.push(model.id);
    assert.ok(ids.includes("demo"));
    assert.ok(ids.includes("gpt-4o-mini"));
    const one = await openai.models.retrieve("demo");
    assert.equal(one.id, "demo");
  });

  test("chat completion: text, usage, finish reason, served-by header", async () => {
    const { data, response } = await openai.chat.completions
      .create({ model: "demo", messages: [{ role: "user", content: "Hello" }], max_tokens: 12, temperature: 0, seed: 1 })
      .withResponse();
    assert.equal(response.headers.get("x-localmlx-served-by"), "local");
    assert.equal(data.object, "chat.completion");
    assert.equal(data.model, "demo");
    const choice = data.choices[0]!;
    assert.equal(choice.message.role, "assistant");
    assert.ok(typeof choice.message.content === "string" && choice.message.content.length > 0);
    assert.equal(choice.finish_reason, "length");
    assert.equal(data.usage!.completion_tokens, 12);
    assert.equal(data.usage!.total_tokens, data.usage!.prompt_tokens + 12);
    assert.equal(typeof data.usage!.prompt_tokens_details?.cached_tokens, "number");
  });

  test("an alias routes to its local model; sampling params pass through", async () => {
    const chat = await openai.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [
        { role: "developer", content: "Be brief." },
        { role: "user", content: [{ type: "text", text: "Hello" }] },
      ],
      max_completion_tokens: 6,
      temperature: 0.5,
      top_p: 0.9,
      presence_penalty: 0.5,
      frequency_penalty: 0.5,
      logit_bias: { "5": -100 },
      stop: ["\n\n"],
      seed: 7,
    });
    assert.equal(chat.model, "gpt-4o-mini");
    assert.ok(chat.usage!.completion_tokens <= 6);
  });

  test("streamed chat equals the unstreamed one, with include_usage", async () => {
    const params = { model: "demo", messages: [{ role: "user" as const, content: "Tell me about the sea." }], max_tokens: 24, temperature: 0 };
    const whole = await openai.chat.completions.create(params);
    const stream = await openai.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
    let text = "";
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        text += choice.delta.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
    }
    assert.ok(chunks >= 3);
    assert.equal(text, whole.choices[0]!.message.content);
    assert.equal(finish, "length");
    assert.equal(usage?.completion_tokens, 24);
  });

  test("stop as a string ends with finish_reason stop", async () => {
    const first = await openai.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "Hi" }], max_tokens: 20, temperature: 0 });
    const text = first.choices[0]!.message.content!;
    const stop = text.slice(4, 8);
    const stopped = await openai.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "Hi" }], max_tokens: 20, temperature: 0, stop });
    assert.equal(stopped.choices[0]!.finish_reason, "stop");
    assert.equal(stopped.choices[0]!.message.content, text.slice(0, text.indexOf(stop)));
  });

  test("legacy completions, streamed and not", async () => {
    const whole = await openai.completions.create({ model: "demo", prompt: "Once upon a time", max_tokens: 10, temperature: 0 });
    assert.equal(whole.object, "text_completion");
    assert.equal(whole.usage!.completion_tokens, 10);
    let text = "";
    for await (const chunk of await openai.completions.create({ model: "demo", prompt: "Once upon a time", max_tokens: 10, temperature: 0, stream: true })) {
      text += chunk.choices[0]?.text ?? "";
    }
    assert.equal(text, whole.choices[0]!.text);
  });

  test("response_format json_schema gives JSON valid against the schema", async () => {
    const chat = await openai.chat.completions.create({
      model: "demo",
      messages: [{ role: "user", content: "A city and a number, as JSON." }],
      max_tokens: 200,
      temperature: 0,
      response_format: {
        type: "json_schema",
        json_schema: {
          name: "answer",
          strict: true,
          schema: {
            type: "object",
            // Bounded values: a random-weight model would otherwise write digits until max_tokens.
            properties: { city: { enum: ["Paris", "Rome", "Oslo"] }, n: { type: "integer", minimum: 0, maximum: 99 } },
            required: ["city", "n"],
            additionalProperties: false,
          },
        },
      },
    });
    assert.equal(chat.choices[0]!.finish_reason, "stop");
    const value = JSON.parse(chat.choices[0]!.message.content!) as { city: unknown; n: unknown };
    assert.ok(["Paris", "Rome", "Oslo"].includes(value.city as string));
    assert.ok(Number.isInteger(value.n));
    assert.deepEqual(Object.keys(value).sort(), ["city", "n"]);
  });

  test("response_format json_object gives one JSON object", async () => {
    const chat = await openai.chat.completions.create({
      model: "demo",
      messages: [{ role: "user", content: "JSON please" }],
      max_tokens: 200,
      temperature: 0,
      response_format: { type: "json_object" },
    });
    const text = chat.choices[0]!.message.content!;
    // A random-weight model may write one string until max_tokens: then the text is a cut object.
    if (chat.choices[0]!.finish_reason === "length") assert.match(text, /^\s*\{/);
    else assert.equal(typeof JSON.parse(text), "object");
  });

  test("tools with tool_choice required: a valid tool call, finish_reason tool_calls", async () => {
    const chat = await openai.chat.completions.create({
      model: "demo",
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [weatherTool],
      tool_choice: "required",
      max_tokens: 100,
      temperature: 0,
    });
    const choice = chat.choices[0]!;
    assert.equal(choice.finish_reason, "tool_calls");
    const call = choice.message.tool_calls![0]!;
    assert.equal(call.type, "function");
    assert.ok(call.id);
    if (call.type !== "function") return;
    assert.equal(call.function.name, "get_weather");
    assert.equal(typeof (JSON.parse(call.function.arguments) as { city: unknown }).city, "string");
  });

  test("streamed tool calls come as deltas with an index", async () => {
    const stream = await openai.chat.completions.create({
      model: "demo",
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [weatherTool],
      tool_choice: { type: "function", function: { name: "get_weather" } },
      max_tokens: 100,
      temperature: 0,
      stream: true,
    });
    const calls: Array<{ index: number; id?: string; name?: string; args: string }> = [];
    let finish: string | null = null;
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      finish = choice.finish_reason ?? finish;
      for (const delta of choice.delta.tool_calls ?? []) {
        const call = (calls[delta.index] ??= { index: delta.index, args: "" });
        if (delta.id) call.id = delta.id;
        if (delta.function?.name) call.name = delta.function.name;
        call.args += delta.function?.arguments ?? "";
      }
    }
    assert.equal(finish, "tool_calls");
    assert.equal(calls[0]?.name, "get_weather");
    assert.ok(calls[0]?.id);
    assert.equal(typeof (JSON.parse(calls[0]!.args) as { city: unknown }).city, "string");
  });

  test("a tool result fed back with tool_choice none gives a text answer", async () => {
    const chat = await openai.chat.completions.create({
      model: "demo",
      messages: [
        { role: "user", content: "What is the weather in Paris?" },
        { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } }] },
        { role: "tool", tool_call_id: "call_1", content: "Sunny, 21 C" },
      ],
      tools: [weatherTool],
      tool_choice: "none",
      max_tokens: 16,
      temperature: 0,
    });
    assert.equal(chat.choices[0]!.message.tool_calls, undefined);
    assert.ok(chat.choices[0]!.message.content);
  });

  test("errors: unknown model is 404, bad params are 400 with the param, context length is 400", async () => {
    await assert.rejects(
      openai.chat.completions.create({ model: "nobody/no-such-model", messages: [{ role: "user", content: "Hi" }] }),
      (error: unknown) => error instanceof OpenAI.NotFoundError && error.code === "model_not_found" && error.param === "model",
    );
    await assert.rejects(
      openai.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "Hi" }], temperature: 5 }),
      (error: unknown) => error instanceof OpenAI.BadRequestError && error.param === "temperature",
    );
    await assert.rejects(
      openai.chat.completions.create({ model: "demo", messages: [] }),
      (error: unknown) => error instanceof OpenAI.BadRequestError && error.param === "messages",
    );
    // The sidecar's own check (-32602 on a token id outside the vocabulary) names the OpenAI param.
    await assert.rejects(
      openai.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "Hi" }], max_tokens: 2, logit_bias: { "99999999": 5 } }),
      (error: unknown) => error instanceof OpenAI.BadRequestError && error.param?.startsWith("logit_bias") === true,
    );
    await assert.rejects(
      openai.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "sea mountain river ".repeat(7000) /* ~35,000 tokens: past the demo's 32768 */ }], max_tokens: 2 }),
      (error: unknown) => error instanceof OpenAI.BadRequestError && error.code === "context_length_exceeded",
    );
  });

  test("a client that disconnects cancels its generation", async () => {
    const cancelled = nextRequest(server, (info) => info.path === "/v1/chat/completions" && info.stream === true);
    const controller = new AbortController();
    const response = await fetch(`${server.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "demo", messages: [{ role: "user", content: "Go on" }], max_tokens: 2000, temperature: 0.7, stream: true }),
      signal: controller.signal,
    });
    const reader = response.body!.getReader();
    await reader.read(); // the stream has started
    controller.abort();
    const info = await cancelled;
    assert.equal(info.finishReason, "cancelled");
    const status = await mlx.status();
    assert.equal(status.requests.active + status.requests.queued, 0);
  });

  test("embeddings: float and base64, dimensions", async (t) => {
    const model = buildEmbeddingModel();
    if (!model) return t.skip("no embedding model could be built (tests.families.build_embedding_model)");
    const floats = await openai.embeddings.create({ model, input: ["the sea", "the mountains"], encoding_format: "float" });
    assert.equal(floats.data.length, 2);
    assert.equal(floats.data[1]!.index, 1);
    const size = floats.data[0]!.embedding.length;
    assert.ok(size > 8);
    assert.ok(floats.usage.prompt_tokens > 0);
    // The SDK asks for base64 by default and decodes it into floats.
    const decoded = await openai.embeddings.create({ model, input: "the sea" });
    assert.equal(decoded.data[0]!.embedding.length, size);
    decoded.data[0]!.embedding.forEach((x, i) => assert.ok(Math.abs(x - floats.data[0]!.embedding[i]!) < 1e-5));
    const short = await openai.embeddings.create({ model, input: "the sea", dimensions: 8, encoding_format: "float" });
    assert.equal(short.data[0]!.embedding.length, 8);
    await assert.rejects(
      openai.embeddings.create({ model: "demo", input: "x" }),
      (error: unknown) => error instanceof OpenAI.BadRequestError && error.param === "model",
    );
  });
});

describe("the endpoint's HTTP edges", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  let server: OpenAIServer;

  before(async () => {
    mlx = await startClient();
    server = await startOpenAIServer({
      client: mlx,
      apiKey: "sekret",
      maxBodyBytes: 4096,
      fallback: false,
      listen: [0, { port: 0, aliases: { "*": "demo" } }],
    });
  });
  after(async () => {
    await server?.close();
    await mlx?.close();
  });

  test("a bearer key is required (401 otherwise)", async () => {
    const anonymous = new OpenAI({ baseURL: server.url, apiKey: "wrong", maxRetries: 0 });
    await assert.rejects(anonymous.models.list(), (error: unknown) => error instanceof OpenAI.AuthenticationError);
    const keyed = new OpenAI({ baseURL: server.url, apiKey: "sekret", maxRetries: 0 });
    const page = await keyed.models.list();
    assert.ok(page.data.length >= 1);
  });

  test("a body past the limit is 413; malformed JSON is 400; unknown paths 404", async () => {
    const post = (path: string, body: string): Promise<{ status: number; json: { error: { code: string } } }> =>
      new Promise((resolve, reject) => {
        const url = new URL(`${server.url}${path}`);
        const req = httpRequest(url, { method: "POST", headers: { authorization: "Bearer sekret", "content-type": "application/json" } }, (res) => {
          let text = "";
          res.setEncoding("utf8");
          res.on("data", (chunk: string) => (text += chunk));
          res.on("end", () => resolve({ status: res.statusCode!, json: JSON.parse(text) as { error: { code: string } } }));
        });
        req.on("error", reject);
        req.end(body);
      });
    const big = await post("/chat/completions", JSON.stringify({ model: "demo", messages: [{ role: "user", content: "x".repeat(10_000) }] }));
    assert.equal(big.status, 413);
    assert.equal(big.json.error.code, "request_too_large");
    const broken = await post("/chat/completions", "{not json");
    assert.equal(broken.status, 400);
    const nowhere = await post("/nowhere", "{}");
    assert.equal(nowhere.status, 404);
  });

  test("several ports, one sidecar: a tier port maps any model name to its model", async () => {
    assert.equal(server.addresses.length, 2);
    assert.notEqual(server.addresses[0]!.port, server.addresses[1]!.port);
    const tier = new OpenAI({ baseURL: server.addresses[1]!.url, apiKey: "sekret", maxRetries: 0 });
    const chat = await tier.chat.completions.create({ model: "qwen3-router-whatever", messages: [{ role: "user", content: "Hi" }], max_tokens: 4 });
    assert.equal(chat.model, "qwen3-router-whatever");
    assert.equal(chat.usage!.completion_tokens, 4);
    const plain = new OpenAI({ baseURL: server.addresses[0]!.url, apiKey: "sekret", maxRetries: 0 });
    await assert.rejects(
      plain.chat.completions.create({ model: "qwen3-router-whatever", messages: [{ role: "user", content: "Hi" }], max_tokens: 4 }),
      (error: unknown) => error instanceof OpenAI.NotFoundError,
    );
    assert.equal(server.local.current, mlx);
  });
});

/**
 * The channels of a prediction against the real sidecar: JSON output (demo model), tool calls
 * (a tiny Qwen3 with its real template) and reasoning (the same with a thinking template),
 * each streamed in chunks and put back together by the client.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  ErrorCode,
  LocalMLX,
  RpcError,
  type PredictionChunk,
  type PredictionFragment,
  type StreamedToolCall,
  type Tool,
} from "../src/index";
import { buildFamilyModel, buildThinkingModel, messages, startClient } from "./helpers";

const weather: Tool = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 12 }, unit: { enum: ["celsius", "fahrenheit"] } },
      required: ["city", "unit"],
      additionalProperties: false,
    },
  },
};
const clock: Tool = {
  type: "function",
  function: {
    name: "get_time",
    description: "The time in a time zone",
    parameters: { type: "object", properties: { zone: { type: "string", maxLength: 12 } }, required: ["zone"], additionalProperties: false },
  },
};

async function collect(fragments: AsyncIterable<PredictionFragment>): Promise<PredictionFragment[]> {
  const all: PredictionFragment[] = [];
  for await (const fragment of fragments) all.push(fragment);
  return all;
}

function joined(fragments: PredictionFragment[], type: "text" | "reasoning"): string {
  return fragments.map((f) => (f.type === type ? f.text : "")).join("");
}

function withoutIndex({ index: _index, ...call }: StreamedToolCall): Omit<StreamedToolCall, "index"> {
  return call;
}

describe("the channels of a prediction", { timeout: 180_000 }, () => {
  let mlx: LocalMLX;
  let qwen: string;
  let thinking: string;

  before(async () => {
    qwen = buildFamilyModel("qwen3");
    thinking = buildThinkingModel();
    mlx = await startClient({ highWaterMark: 2 });
  });
  after(async () => {
    await mlx?.close();
  });

  // ---- responseFormat -------------------------------------------------------------------

  test("a json_schema reply streams as text that parses and fits the schema", async () => {
    const schema = {
      type: "object",
      properties: { count: { type: "integer" }, ok: { type: "boolean" } },
      required: ["count", "ok"],
      additionalProperties: false,
    };
    const prediction = mlx.chat({ messages, maxTokens: 200, temperature: 0, responseFormat: { type: "json_schema", schema } });
    const fragments = await collect(prediction.fragments());
    const result = await prediction.result;
    assert.ok(fragments.every((f) => f.type === "text"));
    assert.equal(result.text, joined(fragments, "text"));
    assert.equal(result.finishReason, "stop");
    const value = JSON.parse(result.text) as { count: unknown; ok: unknown };
    assert.deepEqual(Object.keys(value).sort(), ["count", "ok"]);
    assert.ok(Number.isInteger(value.count));
    assert.equal(typeof value.ok, "boolean");
    assert.equal(typeof result.timings.maskMsPerToken, "number");
    assert.equal(result.reasoning, undefined);
    assert.equal(result.toolCalls, undefined);
  });

  test("generate takes responseFormat json_object", async () => {
    const result = await mlx.generate({ prompt: "Once upon a time", maxTokens: 200, temperature: 0, responseFormat: { type: "json_object" } });
    assert.equal(result.finishReason, "stop");
    const value: unknown = JSON.parse(result.text);
    assert.ok(value !== null && typeof value === "object" && !Array.isArray(value));
  });

  test("a schema that cannot be compiled is InvalidParams", async () => {
    const schema = { type: "string", pattern: "(?<=a)b" }; // look-behind: no token mask for it
    await assert.rejects(
      mlx.chat({ messages, maxTokens: 5, responseFormat: { type: "json_schema", schema } }).result,
      (error: unknown) => error instanceof RpcError && error.code === ErrorCode.InvalidParams,
    );
  });

  // ---- tool calls -----------------------------------------------------------------------

  test("toolChoice required: the call arrives whole in a chunk and the result carries it", async () => {
    const prediction = mlx.chat({
      model: qwen,
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [weather, clock],
      toolChoice: "required",
      maxTokens: 200,
      temperature: 0,
    });
    const heard: StreamedToolCall[] = [];
    prediction.on("toolCall", (call) => heard.push(call));
    const fragments = await collect(prediction.fragments());
    const result = await prediction.result;

    assert.deepEqual(fragments.map((f) => f.seq), [...fragments.keys()]);
    const streamed = fragments.flatMap((f) => (f.type === "toolCall" ? [f.toolCall] : []));
    assert.ok(streamed.length >= 1, "a tool call fragment");
    assert.deepEqual(streamed.map((c) => c.index), [...streamed.keys()]);
    assert.deepEqual(heard, streamed);
    assert.equal(result.finishReason, "tool_calls");
    assert.deepEqual(result.toolCalls, streamed.map(withoutIndex));
    assert.deepEqual(prediction.toolCalls, result.toolCalls);
    for (const call of result.toolCalls!) {
      assert.equal(call.type, "function");
      assert.ok(call.id.length > 0);
      assert.ok(["get_weather", "get_time"].includes(call.function.name));
      assert.equal(call.error, undefined, "a constrained call is valid");
      const args = JSON.parse(call.function.arguments) as Record<string, unknown>;
      assert.equal(typeof (args.city ?? args.zone), "string");
    }
    assert.equal(result.text, joined(fragments, "text"));
    assert.ok(!result.text.includes("<tool_call>"), "the call's markup is not text");
  });

  test("a named toolChoice calls that tool; iterating the prediction itself yields text only", async () => {
    const prediction = mlx.chat({
      model: qwen,
      messages: [{ role: "user", content: "What time is it in Tokyo?" }],
      tools: [weather, clock],
      toolChoice: { type: "function", function: { name: "get_time" } },
      maxTokens: 200,
      temperature: 0,
    });
    const chunks: PredictionChunk[] = [];
    for await (const chunk of prediction) chunks.push(chunk);
    const result = await prediction.result;
    assert.ok(chunks.every((c) => typeof c.text === "string" && !("type" in c)));
    assert.deepEqual(chunks.map((c) => c.seq), [...chunks.keys()]);
    assert.equal(result.text, chunks.map((c) => c.text).join(""));
    assert.equal(result.finishReason, "tool_calls");
    assert.deepEqual(result.toolCalls?.map((c) => c.function.name), ["get_time"]);
    assert.equal(typeof (JSON.parse(result.toolCalls![0]!.function.arguments) as { zone: unknown }).zone, "string");
  });

  test("streamed tool calls equal the unstreamed ones", async () => {
    const params = {
      model: qwen,
      messages: [{ role: "user" as const, content: "Weather in Oslo, please." }],
      tools: [weather],
      toolChoice: "required" as const,
      maxTokens: 200,
      temperature: 0,
      cache: false,
    };
    const streamed = await mlx.chat(params).result;
    const unstreamed = await mlx.request("chat", params);
    const shape = (calls: typeof streamed.toolCalls) => calls?.map(({ function: f, type, error }) => ({ f, type, error }));
    assert.deepEqual(shape(streamed.toolCalls), shape(unstreamed.toolCalls));
    assert.equal(streamed.text, unstreamed.text ?? "");
    assert.equal(streamed.finishReason, unstreamed.finishReason);
  });

  test("a tool result goes back as a tool turn", async () => {
    const first = await mlx.chat({
      model: qwen,
      messages: [{ role: "user", content: "Weather in Rome?" }],
      tools: [weather],
      toolChoice: "required",
      maxTokens: 200,
      temperature: 0,
    }).result;
    const call = first.toolCalls![0]!;
    const second = await mlx.chat({
      model: qwen,
      messages: [
        { role: "user", content: "Weather in Rome?" },
        { role: "assistant", content: null, toolCalls: first.toolCalls! },
        { role: "tool", toolCallId: call.id, name: call.function.name, content: '{"temperature": 21}' },
      ],
      tools: [weather],
      toolChoice: "none",
      maxTokens: 8,
      temperature: 0,
    }).result;
    assert.equal(second.finishReason, "length");
    assert.equal(second.toolCalls, undefined);
    assert.ok(second.text.length > 0);
  });

  // ---- reasoning ------------------------------------------------------------------------

  test("reasoning streams apart from the text, and thinkingBudget closes it for the answer", async () => {
    const params = { model: thinking, messages, thinking: true, thinkingBudget: 8, maxTokens: 40, temperature: 0, cache: false };
    const prediction = mlx.chat(params);
    const heard: string[] = [];
    prediction.on("reasoning", (text) => heard.push(text));
    const fragments = await collect(prediction.fragments());
    const result = await prediction.result;

    const firstText = fragments.findIndex((f) => f.type === "text");
    const lastReasoning = fragments.findLastIndex((f) => f.type === "reasoning");
    assert.ok(lastReasoning >= 0, "reasoning came");
    assert.ok(firstText > lastReasoning, "the answer follows the reasoning");
    assert.equal(result.reasoning, joined(fragments, "reasoning"));
    assert.equal(result.reasoning, heard.join(""));
    assert.equal(prediction.reasoning, result.reasoning);
    assert.equal(result.text, joined(fragments, "text"));
    assert.ok(result.text.length > 0);
    for (const tag of ["<think>", "</think>"]) assert.ok(!result.text.includes(tag), `no ${tag} in the text`);
    const reasoningTokens = result.usage.reasoningTokens ?? 0;
    assert.ok(reasoningTokens >= 1 && reasoningTokens <= 8 + 1, `reasoningTokens ${reasoningTokens} within the budget (+ the closing tag)`);

    const unstreamed = await mlx.request("chat", params);
    assert.equal(unstreamed.reasoning, result.reasoning);
    assert.equal(unstreamed.text, result.text);
  });

  test("thinking: false leaves no reasoning", async () => {
    const prediction = mlx.chat({ model: thinking, messages, thinking: false, maxTokens: 12, temperature: 0 });
    const result = await prediction.result;
    assert.equal(result.reasoning, undefined);
    assert.equal(prediction.reasoning, "");
    assert.ok(result.text.length > 0);
  });

  test("a lagging consumer gets reasoning joined with reasoning and text with text", async () => {
    const prediction = mlx.chat({ model: thinking, messages, thinking: true, thinkingBudget: 10, maxTokens: 40, temperature: 0 });
    const result = await prediction.result; // everything is unread now; highWaterMark is 2
    const fragments = await collect(prediction.fragments());
    assert.ok(fragments.length <= 3, `${fragments.length} fragments`);
    assert.equal(joined(fragments, "reasoning"), result.reasoning);
    assert.equal(joined(fragments, "text"), result.text);
    assert.equal(fragments[0]!.type, "reasoning");
    assert.equal(fragments[fragments.length - 1]!.type, "text");
  });
});

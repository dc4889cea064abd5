/**
 * LangChain's `ChatOpenAI` against the endpoint: a tool-calling agent loop to a final answer on
 * the demo model (random weights, so the first turn forces a call with tool_choice required and
 * the last forbids one with tool_choice none).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { AIMessage, HumanMessage, ToolMessage, type BaseMessage } from "@langchain/core/messages";
import { tool } from "@langchain/core/tools";
import { ChatOpenAI } from "@langchain/openai";
import { z } from "zod";
import { LocalMLX, startOpenAIServer, type OpenAIServer } from "../src/index";
import { startClient } from "./helpers";

describe("LangChain ChatOpenAI with bindTools", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  let server: OpenAIServer;

  before(async () => {
    mlx = await startClient();
    server = await startOpenAIServer({ client: mlx, port: 0, fallback: false });
  });
  after(async () => {
    await server?.close();
    await mlx?.close();
  });

  test("a tool-calling agent loop reaches a final answer", async () => {
    const calls: string[] = [];
    const getWeather = tool(
      async ({ city }: { city: string }) => {
        calls.push(city);
        return `It is sunny and 21 C in ${city}.`;
      },
      {
        name: "get_weather",
        description: "The current weather in a city",
        schema: z.object({ city: z.string().max(20).describe("The city") }),
      },
    );
    const model = new ChatOpenAI({
      model: "demo",
      apiKey: "unused",
      temperature: 0,
      maxTokens: 256, // the demo vocabulary spells JSON keys almost a byte at a time
      maxRetries: 0,
      configuration: { baseURL: server.url },
    });
    const mustCall = model.bindTools([getWeather], { tool_choice: "required" });
    const mustAnswer = model.bindTools([getWeather], { tool_choice: "none" });

    const history: BaseMessage[] = [new HumanMessage("What is the weather in Paris?")];
    let final: AIMessage | undefined;
    for (let turn = 0; turn < 4 && !final; turn++) {
      const reply = (await (turn === 0 ? mustCall : mustAnswer).invoke(history)) as AIMessage;
      history.push(reply);
      if (!reply.tool_calls?.length) {
        final = reply;
        break;
      }
      for (const call of reply.tool_calls) {
        assert.equal(call.name, "get_weather");
        const result = (await getWeather.invoke(call)) as ToolMessage;
        assert.ok(result instanceof ToolMessage);
        assert.equal(result.tool_call_id, call.id);
        history.push(result);
      }
    }
    assert.ok(calls.length >= 1, "the tool ran");
    assert.ok(final, "the loop ended with an answer");
    assert.equal(typeof final.content, "string");
    assert.ok((final.content as string).length > 0);
    assert.equal(final.tool_calls?.length ?? 0, 0);
    assert.ok(history.length >= 4);
  });
});

/**
 * Profiles through the OpenAI endpoint with the official `openai` SDK: `/v1/models` lists each
 * profile and `auto`; a chat completion names a profile, or `auto` (with the `task` extension or
 * without), answers as that profile and echoes the name asked for; unstreamed answers say which
 * profile served (`x-localmlx-profile`) and why auto chose it (`x-localmlx-routed-by`).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { startOpenAIServer, type LocalMLX, type OpenAIRequestInfo, type OpenAIServer } from "../src/index";
import { startClient } from "./helpers";

const ASK = [{ role: "user" as const, content: "Tell me about the sea." }];
const CODE = [{ role: "user" as const, content: "Fix the bug:\n```js\nlet x = 1\n```" }];

describe("profiles through the OpenAI endpoint with the openai SDK", { timeout: 60_000 }, () => {
  const profilesDir = mkdtempSync(join(tmpdir(), "localmlx-openai-profiles-"));
  let mlx: LocalMLX;
  let server: OpenAIServer;
  let openai: OpenAI;
  const requests: OpenAIRequestInfo[] = [];

  before(async () => {
    mlx = await startClient({ profilesDir });
    await mlx.profiles.save("terse", { model: "demo", system: "Answer in one word.", defaults: { maxTokens: 3 }, tasks: ["chat"] });
    await mlx.profiles.save("coder", { model: "demo", defaults: { maxTokens: 5 }, tasks: ["code"] });
    server = await startOpenAIServer({ client: mlx, port: 0, fallback: false });
    server.on("request", (info) => requests.push(info));
    openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => {
    await server?.close();
    await mlx?.close();
    rmSync(profilesDir, { recursive: true, force: true });
  });

  test("/v1/models lists the profiles and auto beside the models; each is retrieved", async () => {
    const ids: string[] = [];
    for await (const model of openai.models.list()) ids.push(model.id);
    for (const id of ["demo", "terse", "coder", "auto"]) assert.ok(ids.includes(id), `${id} in ${ids.join(", ")}`);
    assert.equal((await openai.models.retrieve("terse")).id, "terse");
    assert.equal((await openai.models.retrieve("auto")).id, "auto");
  });

  test("a profile's name as the model: its defaults, the name echoed, the profile in a header", async () => {
    const { data, response } = await openai.chat.completions.create({ model: "terse", messages: ASK, temperature: 0 }).withResponse();
    assert.equal(data.model, "terse");
    assert.equal(data.usage?.completion_tokens, 3);
    assert.equal(response.headers.get("x-localmlx-profile"), "terse");
    assert.equal(response.headers.get("x-localmlx-routed-by"), null);
    const own = await mlx.chat({ model: "terse", messages: ASK, temperature: 0 });
    assert.equal(data.choices[0]!.message.content, own.text);
    assert.equal(requests.at(-1)?.profile, "terse");

    const completion = await openai.completions.create({ model: "coder", prompt: "Once upon a time", temperature: 0 }).withResponse();
    assert.deepEqual([completion.data.model, completion.data.usage?.completion_tokens], ["coder", 5]);
    assert.equal(completion.response.headers.get("x-localmlx-profile"), "coder");
  });

  test("model auto routes by the request's task, stated (the task extension) or classified, and says why", async () => {
    const classified = await openai.chat.completions.create({ model: "auto", messages: CODE, temperature: 0 }).withResponse();
    assert.equal(classified.data.model, "auto");
    assert.equal(classified.response.headers.get("x-localmlx-profile"), "coder");
    assert.match(classified.response.headers.get("x-localmlx-routed-by") ?? "", /^code \(classified\): coder scores highest/);
    // `task` is not OpenAI's: the SDK sends extra body fields as given.
    const stated = await openai.chat.completions.create({ model: "auto", messages: CODE, temperature: 0, task: "chat" } as OpenAI.ChatCompletionCreateParamsNonStreaming).withResponse();
    assert.equal(stated.response.headers.get("x-localmlx-profile"), "terse");
    assert.match(stated.response.headers.get("x-localmlx-routed-by") ?? "", /^chat \(stated\): terse/);

    let streamed = "";
    let model = "";
    for await (const chunk of await openai.chat.completions.create({ model: "auto", messages: CODE, temperature: 0, stream: true })) {
      streamed += chunk.choices[0]?.delta?.content ?? "";
      model = chunk.model;
    }
    assert.equal(model, "auto");
    assert.equal(streamed, classified.data.choices[0]!.message.content);
    assert.equal(requests.at(-1)?.profile, "coder"); // known once it ends: in the request's log line

    await assert.rejects(
      openai.chat.completions.create({ model: "auto", messages: CODE, task: "juggling" } as OpenAI.ChatCompletionCreateParamsNonStreaming),
      (error: unknown) => error instanceof OpenAI.BadRequestError,
    );
  });

  test("an unknown profile is a 404, as an unknown model is; without profiles, auto is neither listed nor served", async () => {
    await assert.rejects(openai.models.retrieve("no-such-profile"), (error: unknown) => error instanceof OpenAI.NotFoundError);
    await assert.rejects(
      openai.chat.completions.create({ model: "no-such-profile", messages: ASK, max_tokens: 4 }),
      (error: unknown) => error instanceof OpenAI.NotFoundError,
    );
    for (const name of ["terse", "coder"]) await mlx.profiles.delete(name);
    const ids: string[] = [];
    for await (const model of openai.models.list()) ids.push(model.id);
    assert.ok(!ids.includes("auto") && !ids.includes("terse"), ids.join(", "));
    await assert.rejects(openai.models.retrieve("auto"), (error: unknown) => error instanceof OpenAI.NotFoundError);
    await assert.rejects(
      openai.chat.completions.create({ model: "auto", messages: ASK, max_tokens: 4 }),
      (error: unknown) => error instanceof OpenAI.BadRequestError,
    );
  });
});

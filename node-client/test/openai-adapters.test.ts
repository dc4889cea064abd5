/**
 * Adapters through the OpenAI endpoint with the official `openai` SDK: `<base>+<adapter>` is
 * listed, retrieved and served like any model, and answers as the sidecar's own chat does.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { LocalMLX, startOpenAIServer, type OpenAIServer } from "../src/index";
import { modelsDir, python, repositoryRoot, startClient } from "./helpers";

const ADAPTER = "openai-sdk-sea";
const VARIANT = `demo+${ADAPTER}`;

/** A random LoRA adapter for the demo model, written as mlx_lm.lora writes one (naming its base). */
function buildAdapter(): void {
  const script = [
    "import sys; from pathlib import Path",
    "from tests.tuning_models import build_random_adapter",
    "models = Path(sys.argv[1])",
    "build_random_adapter(models / 'localmlx-demo', models / 'adapters' / sys.argv[2], seed=5, base='demo')",
  ].join("\n");
  const built = spawnSync(python, ["-c", script, modelsDir, ADAPTER], { cwd: repositoryRoot, encoding: "utf8" });
  assert.equal(built.status, 0, built.stderr);
}

describe("adapters through the OpenAI endpoint with the openai SDK", { timeout: 180_000 }, () => {
  let mlx: LocalMLX;
  let server: OpenAIServer;
  let openai: OpenAI;

  before(async () => {
    mlx = await startClient(); // builds the demo model the adapter is made for
    buildAdapter();
    server = await startOpenAIServer({ client: mlx, port: 0, fallback: false });
    openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => {
    await server?.close();
    await mlx?.models.deleteAdapter(ADAPTER, { force: true }).catch(() => undefined);
    await mlx?.close();
  });

  test("lists and retrieves <base>+<adapter>, and answers as the sidecar's own chat does", async () => {
    const ids: string[] = [];
    for await (const model of openai.models.list()) ids.push(model.id);
    assert.ok(ids.includes(VARIANT), `${VARIANT} in ${ids.join(", ")}`);
    assert.equal((await openai.models.retrieve(VARIANT)).id, VARIANT);

    const ask = { messages: [{ role: "user" as const, content: "Tell me about the sea." }], max_tokens: 16, temperature: 0 };
    const viaSdk = await openai.chat.completions.create({ model: VARIANT, ...ask });
    assert.equal(viaSdk.model, VARIANT);
    const own = await mlx.chat({ model: VARIANT, messages: ask.messages, maxTokens: 16, temperature: 0 });
    assert.equal(viaSdk.choices[0]!.message.content, own.text);
    const base = await openai.chat.completions.create({ model: "demo", ...ask });
    assert.notEqual(base.choices[0]!.message.content, viaSdk.choices[0]!.message.content);

    let streamed = "";
    for await (const chunk of await openai.chat.completions.create({ model: VARIANT, ...ask, stream: true })) {
      streamed += chunk.choices[0]?.delta?.content ?? "";
    }
    assert.equal(streamed, own.text);
    const loaded = await mlx.models.adapters();
    assert.deepEqual(loaded.find((a) => a.name === ADAPTER)?.loadedAs, [VARIANT]);
  });

  test("an adapter that does not exist is a 404, as an unknown model is", async () => {
    await assert.rejects(openai.models.retrieve("demo+no-such-adapter"), (error: unknown) => error instanceof OpenAI.NotFoundError);
    await assert.rejects(
      openai.chat.completions.create({ model: "demo+no-such-adapter", messages: [{ role: "user", content: "hi" }], max_tokens: 4 }),
      (error: unknown) => error instanceof OpenAI.NotFoundError,
    );
  });
});

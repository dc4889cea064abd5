/**
 * Speculative decoding from the client's side (README "Speculative decoding"): the `draftModels`
 * option reaches the sidecar as `LOCALMLX_DRAFT_MODELS`; `draftModel`, `numDraftTokens` and
 * `promptLookup` pass through chat and generate (and the OpenAI endpoint's `draft_model`,
 * `num_draft_tokens`, `prompt_lookup`); greedy output with them is the output without them; timings
 * count drafted and accepted tokens consistently. The engine's own tests are on the Python side.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import {
  ErrorCode,
  LocalMLX,
  OpenAIHttpError,
  RpcError,
  SettingsError,
  chatParamsOf,
  completionParamsOf,
  draftModelsEnv,
  startOpenAIServer,
  type GenerationResult,
  type OpenAIServer,
} from "../src/index";
import { readSettings } from "../wooster/config";
import { modelsDir, python, startClient } from "./helpers";

const T = { timeout: 120_000 };

/** A prompt whose natural continuation copies it: what prompt lookup drafts from. */
const COPYING = "Copy this list exactly: apples, pears, plums, apples, pears, plums, apples, pears, plums, apples, pears,";

/** Drafted and accepted counts, when present, are whole, together, and accepted ≤ drafted. */
function assertSpeculationTimings(result: GenerationResult): void {
  const { draftedTokens, acceptedTokens } = result.timings;
  assert.equal(draftedTokens === undefined, acceptedTokens === undefined, "draftedTokens and acceptedTokens come together");
  if (draftedTokens === undefined || acceptedTokens === undefined) return;
  assert.ok(Number.isInteger(draftedTokens) && draftedTokens >= 0);
  assert.ok(Number.isInteger(acceptedTokens) && acceptedTokens >= 0 && acceptedTokens <= draftedTokens);
}

describe("draftModels settings", () => {
  test("an object or the variable's text becomes LOCALMLX_DRAFT_MODELS; what cannot be written is a SettingsError", () => {
    assert.deepEqual(draftModelsEnv(), {});
    assert.deepEqual(draftModelsEnv({ "mlx-community/Big": "mlx-community/Small", demo: "demo" }), {
      LOCALMLX_DRAFT_MODELS: "mlx-community/Big=mlx-community/Small,demo=demo",
    });
    assert.deepEqual(draftModelsEnv(" big = small ,, demo=demo "), { LOCALMLX_DRAFT_MODELS: "big=small,demo=demo" });
    const bad: Array<Parameters<typeof draftModelsEnv>[0]> = ["big", "big=", "=small", "big=a,big=b", { "a,b": "c" }, { a: "b,c" }, { "a=b": "c" }, { a: "" }];
    for (const value of bad) {
      assert.throws(() => draftModelsEnv(value), (e: unknown) => e instanceof SettingsError && e.variable === "LOCALMLX_DRAFT_MODELS", JSON.stringify(value));
    }
  });

  test("the Wooster plugin reads them from the environment and from config.plugins.localMLX, and passes them on", () => {
    const fromEnv = readSettings(undefined, { LOCALMLX_DRAFT_MODELS: "big=small" });
    assert.deepEqual(fromEnv.draftModels, { big: "small" });
    assert.equal(fromEnv.sidecarEnv.LOCALMLX_DRAFT_MODELS, "big=small");
    const fromConfig = readSettings({ plugins: { localMLX: { draftModels: { big: "small", demo: "demo" } } } }, {});
    assert.deepEqual(fromConfig.draftModels, { big: "small", demo: "demo" });
    assert.equal(fromConfig.sidecarEnv.LOCALMLX_DRAFT_MODELS, "big=small,demo=demo");
    assert.throws(() => readSettings(undefined, { LOCALMLX_DRAFT_MODELS: "big" }), /LOCALMLX_DRAFT_MODELS="big": "big" is not a target=draft pair/);
  });

  test("the client's draftModels option, over env, reaches the sidecar", { ...T, skip: process.platform !== "linux" && "reads /proc" }, async () => {
    const mlx = await LocalMLX.start({ python, env: { LOCALMLX_MODELS_DIR: modelsDir, LOCALMLX_DRAFT_MODELS: "x=y" }, draftModels: { demo: "demo" } });
    try {
      const environ = readFileSync(`/proc/${mlx.pid!}/environ`, "latin1").split("\0");
      assert.ok(environ.includes("LOCALMLX_DRAFT_MODELS=demo=demo"), "the option wins over env");
    } finally {
      await mlx.close();
    }
  });
});

describe("the OpenAI endpoint's speculation fields", () => {
  test("draft_model, num_draft_tokens and prompt_lookup map to the protocol's params; bad ones are a 400 naming the field", () => {
    const messages = [{ role: "user", content: "hi" }];
    assert.deepEqual(
      chatParamsOf({ messages, draft_model: "small", num_draft_tokens: 4, prompt_lookup: true }),
      { messages, draftModel: "small", numDraftTokens: 4, promptLookup: true },
    );
    assert.deepEqual(chatParamsOf({ messages, draft_model: null }), { messages, draftModel: null });
    assert.deepEqual(completionParamsOf({ prompt: "p", prompt_lookup: false }).params, { prompt: "p", promptLookup: false });
    const bad: Array<[Record<string, unknown>, string]> = [
      [{ num_draft_tokens: 0 }, "num_draft_tokens"],
      [{ num_draft_tokens: 33 }, "num_draft_tokens"],
      [{ num_draft_tokens: 2.5 }, "num_draft_tokens"],
      [{ prompt_lookup: "yes" }, "prompt_lookup"],
      [{ draft_model: 5 }, "draft_model"],
      [{ draft_model: "" }, "draft_model"],
    ];
    for (const [fields, param] of bad) {
      assert.throws(() => chatParamsOf({ messages, ...fields }), (e: unknown) => e instanceof OpenAIHttpError && e.status === 400 && e.param === param, JSON.stringify(fields));
    }
  });
});

describe("speculative requests on the real sidecar", T, () => {
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

  test("greedy output with prompt lookup, or with no draft model, is the output without", async () => {
    const plain = await mlx.generate({ prompt: COPYING, maxTokens: 24, temperature: 0, cache: false });
    const lookup = await mlx.generate({ prompt: COPYING, maxTokens: 24, temperature: 0, cache: false, promptLookup: true, numDraftTokens: 4 });
    assert.equal(lookup.text, plain.text);
    assert.equal(lookup.usage.completionTokens, plain.usage.completionTokens);
    assertSpeculationTimings(lookup);
    assert.equal(plain.timings.draftedTokens, undefined, "no speculation asked, none reported");

    const messages = [{ role: "user" as const, content: COPYING }];
    const chatPlain = await mlx.chat({ messages, maxTokens: 16, temperature: 0, cache: false });
    const chatNoDraft = await mlx.chat({ messages, maxTokens: 16, temperature: 0, cache: false, draftModel: null, promptLookup: true });
    assert.equal(chatNoDraft.text, chatPlain.text);
    assertSpeculationTimings(chatNoDraft);
  });

  test("a numDraftTokens out of range is -32602 at its path", async () => {
    const error = await mlx.generate({ prompt: "hi", numDraftTokens: 0 }).result.then(
      () => assert.fail("numDraftTokens 0 must be refused"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof RpcError && error.code === ErrorCode.InvalidParams, String(error));
    assert.deepEqual((error.data.errors as Array<{ path: string }>).map((e) => e.path), ["/numDraftTokens"]);
  });

  test("the endpoint's prompt_lookup gives the same greedy completion", async () => {
    const complete = async (extra: Record<string, unknown>): Promise<string> => {
      const response = await fetch(`${server.url}/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "demo", prompt: COPYING, max_tokens: 16, temperature: 0, ...extra }),
      });
      assert.equal(response.status, 200);
      return ((await response.json()) as { choices: Array<{ text: string }> }).choices[0]!.text;
    };
    assert.equal(await complete({ prompt_lookup: true, num_draft_tokens: 3, draft_model: null }), await complete({}));
  });
});

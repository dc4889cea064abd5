/** `usage.cachedTokens` as the README documents it. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { LocalMLX, Message } from "../src/index";
import { startClient } from "./helpers";

describe("usage.cachedTokens", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  before(async () => {
    mlx = await startClient();
  });
  after(async () => {
    await mlx?.close();
  });

  test("0 at first; the prefix cache's share of the prompt later (never the last token); all of it from the response cache", async () => {
    const turn: Message[] = [{ role: "user", content: "Tell me about the rivers and the hills, at length." }];
    const first = await mlx.chat({ messages: turn, maxTokens: 8, temperature: 0 });
    assert.equal(first.usage.cachedTokens, 0);
    assert.equal(first.cached, undefined);

    const again = await mlx.chat({ messages: turn, maxTokens: 8, temperature: 0 });
    assert.equal(again.cached, true, "the exact response cache answered");
    assert.equal(again.usage.cachedTokens, again.usage.promptTokens);

    const recomputed = await mlx.chat({ messages: turn, maxTokens: 8, temperature: 0, cache: false });
    assert.equal(recomputed.cached, undefined);
    assert.equal(recomputed.usage.cachedTokens, recomputed.usage.promptTokens - 1, "the prefix cache, less the last prompt token");

    const next = await mlx.chat({
      messages: [...turn, { role: "assistant", content: first.text }, { role: "user", content: "And then?" }],
      maxTokens: 8,
      temperature: 0,
      cache: false,
    });
    assert.ok(next.usage.cachedTokens >= first.usage.promptTokens - 1, "a later turn reuses the earlier turns");
    assert.ok(next.usage.cachedTokens < next.usage.promptTokens);

    const aborted = await mlx.chat({ messages: turn, signal: AbortSignal.abort() });
    assert.equal(aborted.usage.cachedTokens, 0);
  });
});

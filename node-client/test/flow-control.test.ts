/**
 * Flow control is per Prediction: a consumer that reads one stream slowly, or not at all, never
 * holds up the wire, so other calls and streams go on. Against the real sidecar.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { LocalMLX, PredictionChunk } from "../src/index";
import { messages, sleep, startClient } from "./helpers";

const MiB = 1024 * 1024;
/** Small, so that a lagging consumer has unread chunks beyond it within a few tokens. */
const highWaterMark = 4;

function assertWhole(chunks: PredictionChunk[], text: string): void {
  assert.deepEqual(
    chunks.map((chunk) => chunk.seq),
    [...chunks.keys()],
    "seq counts the chunks yielded, without gaps",
  );
  assert.equal(chunks.map((chunk) => chunk.text).join(""), text);
}

describe("flow control per prediction", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;

  before(async () => {
    mlx = await startClient({ highWaterMark });
  });
  after(async () => {
    await mlx?.close();
  });

  test("a for-await body that awaits other calls does not deadlock the stream", async () => {
    const prediction = mlx.chat({ messages, maxTokens: 300, temperature: 0, timeoutMs: 60_000 });
    const chunks: PredictionChunk[] = [];
    for await (const chunk of prediction) {
      chunks.push(chunk);
      // Each of these waits for a response behind the chunks this loop has not read yet.
      const { tokens } = await mlx.tokenize(chunk.text, { timeoutMs: 15_000 });
      assert.ok(tokens.length > 0);
      await mlx.ping({ timeoutMs: 15_000 });
    }
    const result = await prediction.result;
    assert.equal(result.finishReason, "length");
    assert.equal(result.usage.completionTokens, 300);
    assertWhole(chunks, result.text);
  });

  test("a stream left unread for 10 s holds up nothing, and its text is whole when reading resumes", async (t) => {
    const stalled = mlx.chat({ messages, maxTokens: 300, temperature: 0 });
    let stalledDone = false;
    void stalled.result.then(() => (stalledDone = true));
    const iterator = stalled[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(first.done, false);

    // Stop reading `stalled` for 10 s (a real pause, by design); everything else goes on meanwhile.
    let pausing = true;
    const pause = sleep(10_000).then(() => (pausing = false));
    const rssAtPauseStart = (await mlx.status({ timeoutMs: 9_000 })).memory.rssBytes;
    const other = mlx.chat({ messages: [{ role: "user", content: "Say something about rivers." }], maxTokens: 30, temperature: 0, timeoutMs: 9_000 });
    const [otherChunks, tokenized, status] = await Promise.all([
      (async () => {
        const chunks: PredictionChunk[] = [];
        for await (const chunk of other) chunks.push(chunk);
        return chunks;
      })(),
      mlx.tokenize("The sea and the mountains.", { timeoutMs: 9_000 }),
      mlx.status({ timeoutMs: 9_000 }),
    ]);
    assert.ok(pausing, "the other chat, tokenize and server/status completed during the pause");
    assertWhole(otherChunks, (await other.result).text);
    assert.ok(tokenized.tokens.length > 0);
    assert.ok(status.memory.rssBytes > 0);

    await pause;
    assert.ok(stalledDone, "the unread stream's generation was not held back either");
    const rssGrowth = (await mlx.status()).memory.rssBytes - rssAtPauseStart;
    t.diagnostic(`sidecar RSS growth over the pause: ${(rssGrowth / MiB).toFixed(1)} MiB`);
    assert.ok(rssGrowth < 64 * MiB, `the sidecar's RSS grew by ${(rssGrowth / MiB).toFixed(1)} MiB over the pause`);

    const chunks = [first.value as PredictionChunk];
    for (let next = await iterator.next(); !next.done; next = await iterator.next()) chunks.push(next.value);
    const result = await stalled.result;
    assert.equal(result.usage.completionTokens, 300);
    assertWhole(chunks, result.text);
    assert.ok(chunks.length <= 1 + highWaterMark, `the unread chunks were joined: ${chunks.length} yielded`);
    t.diagnostic(`${chunks.length} chunks yielded for ${result.usage.completionTokens} tokens`);
  });
});

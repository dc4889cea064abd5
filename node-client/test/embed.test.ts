/** `LocalMLX.embed` against the real sidecar and a tiny Qwen3-Embedding built for the run. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ErrorCode, LocalMLX, RpcError } from "../src/index";
import { buildFamilyModel, startClient } from "./helpers";

const norm = (v: number[]): number => Math.sqrt(v.reduce((sum, x) => sum + x * x, 0));
const cosine = (a: number[], b: number[]): number => a.reduce((sum, x, i) => sum + x * b[i]!, 0) / (norm(a) * norm(b));

describe("embed", { timeout: 120_000 }, () => {
  let mlx: LocalMLX;
  let model: string;

  before(async () => {
    model = buildFamilyModel("qwen3-embedding");
    mlx = await startClient();
  });
  after(async () => {
    await mlx?.close();
  });

  test("one unit vector per text, in order, with usage and timings", async () => {
    const texts = ["the sea", "the ocean is wide and deep", "mountains"];
    const result = await mlx.embed(texts, { model });
    assert.equal(result.model, model);
    assert.equal(result.vectors.length, texts.length);
    assert.ok(result.dimensions > 0);
    for (const vector of result.vectors) {
      assert.equal(vector.length, result.dimensions);
      assert.ok(Math.abs(norm(vector) - 1) < 1e-3, `norm ${norm(vector)}`);
    }
    assert.ok(result.usage.promptTokens >= texts.length);
    assert.ok(result.usage.totalTokens >= result.usage.promptTokens);
    assert.ok(result.timings.totalMs >= 0);
    assert.ok(mlx.trackedModels.includes(model), "reloaded after a restart, like a chat's model");
  });

  test("a single string is one vector, the same as inside a batch", async () => {
    const alone = await mlx.embed("the sea", { model });
    const batch = await mlx.embed(["the sea", "a much longer text about the mountains and the rivers"], { model });
    assert.equal(alone.vectors.length, 1);
    assert.ok(cosine(alone.vectors[0]!, batch.vectors[0]!) > 0.999);
    assert.ok(cosine(batch.vectors[0]!, batch.vectors[1]!) < 0.999, "different texts, different vectors");
  });

  test("dimensions keeps the first components, renormalized; normalize: false keeps the length", async () => {
    const full = (await mlx.embed("the sea", { model })).vectors[0]!;
    const short = await mlx.embed("the sea", { model, dimensions: 16 });
    assert.equal(short.dimensions, 16);
    assert.equal(short.vectors[0]!.length, 16);
    assert.ok(Math.abs(norm(short.vectors[0]!) - 1) < 1e-3);
    assert.ok(cosine(short.vectors[0]!, full.slice(0, 16)) > 0.999);
    const raw = (await mlx.embed("the sea", { model, normalize: false })).vectors[0]!;
    assert.ok(cosine(raw, full) > 0.999);
    assert.ok(Math.abs(norm(raw) - 1) > 1e-3, `a raw vector's norm (${norm(raw)}) is its own`);
  });

  test("a text-generation model cannot embed: InvalidParams", async () => {
    await assert.rejects(
      mlx.embed("hello", { model: "demo" }),
      (error: unknown) => error instanceof RpcError && error.code === ErrorCode.InvalidParams,
    );
  });
});

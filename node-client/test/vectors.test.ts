/** Every protocol/vectors/*.json, replayed against a fresh sidecar as protocol/vectors/README.md says. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { repositoryRoot } from "./helpers";
import { matches, replay, utf8SurrogatePass, type Vector } from "./vector-replayer";

const vectorsDir = join(repositoryRoot, "protocol", "vectors");
const files = readdirSync(vectorsDir)
  .filter((name) => name.endsWith(".json"))
  .sort();

describe("protocol/vectors", () => {
  if (files.length === 0) {
    test("no vectors yet", { skip: "protocol/vectors has no *.json" }, () => undefined);
  }
  for (const file of files) {
    const vector = JSON.parse(readFileSync(join(vectorsDir, file), "utf8")) as Vector;
    test(vector.name, { timeout: 120_000 }, async () => {
      assert.equal(`${vector.name}.json`, file, "a vector's name is its file name");
      await replay(vector);
    });
  }
});

describe("the replayer itself", () => {
  test("patterns", () => {
    assert.ok(matches({ a: "$integer", b: ["$string", 2] }, { a: 3, b: ["x", 2], c: null }));
    assert.ok(!matches({ a: "$integer" }, { a: 1.5 }));
    assert.ok(!matches({ a: 1 }, { a: "1" }));
    assert.ok(!matches({ a: null }, {}));
    assert.ok(matches({ a: null }, { a: null }));
    assert.ok(!matches([1], [1, 2]));
    assert.ok(matches([{ id: 1 }, { id: 2 }], [{ id: 2 }, { id: 1 }]), "batch responses in any order");
    assert.ok(!matches([{ id: 1 }, { id: 1 }], [{ id: 1 }, { id: 2 }]), "one to one");
    assert.ok(!matches("$object", []));
    assert.ok(!matches("$array", {}));
    assert.ok(matches("$any", null));
    assert.ok(!matches(true, 1));
  });

  test("sendRaw keeps lone surrogates as bytes", () => {
    assert.equal(utf8SurrogatePass("a\ud800🌊").toString("hex"), "61eda080f09f8c8a");
  });

  test("a response nobody expected fails the vector", { timeout: 60_000 }, async () => {
    const vector: Vector = { name: "extra", steps: [{ send: { jsonrpc: "2.0", id: 5, method: "ping" } }] };
    await assert.rejects(replay(vector), /no expect matched/);
  });

  test("an expect that never matches fails the vector", { timeout: 60_000 }, async () => {
    const vector: Vector = {
      name: "mismatch",
      steps: [{ send: { jsonrpc: "2.0", id: 5, method: "ping" } }, { expect: { jsonrpc: "2.0", id: 5, result: "$array" } }],
    };
    await assert.rejects(replay(vector, 2_000), /no message matched/);
  });
});

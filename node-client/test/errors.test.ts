/**
 * Errors keep the wire's fields as they came, and their display text is built in one place: an
 * RpcError from the real sidecar carries the sidecar's own message (`rawMessage`), and what the
 * OpenAI endpoint and the Wooster plugin show is made from the fields, never parsed back out of
 * `message`. (The plugin's `describeError` reads the same fields: test/wooster.test.ts.) A start failure keeps its reason apart from the command and the stderr tail.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { LocalMLX, RpcError, SidecarStartError, toOpenAIError, type RpcErrorObject } from "../src/index";
import { startClient } from "./helpers";

const T = { timeout: 120_000 };

describe("RpcError", () => {
  let mlx: LocalMLX;
  before(async () => {
    mlx = await startClient();
  });
  after(async () => mlx?.close());

  test("keeps the sidecar's message, code, data and method as fields; message is built from them", T, async () => {
    const error = await mlx.models.load("no-such-model-here").then(
      () => assert.fail("the load should fail"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof RpcError);
    assert.equal(error.method, "models/load");
    assert.ok(error.rawMessage.length > 0);
    assert.ok(!error.rawMessage.startsWith("models/load"), "the raw message has no method in front");
    assert.ok(!error.rawMessage.endsWith(`(${error.code})`), "nor the code behind");
    assert.equal(error.message, RpcError.makeMessage({ code: error.code, message: error.rawMessage }, error.method));
    assert.equal(error.message, `models/load: ${error.rawMessage} (${error.code})`);
    // What a client of the endpoint sees is the sidecar's message itself.
    assert.equal(toOpenAIError(error).message, error.rawMessage);
  });

  test("a message that looks like the display form is not cut", () => {
    const wire: RpcErrorObject = { code: -32603, message: "tokenize: odd input (-1)", data: "x" };
    const error = new RpcError(wire, "chat");
    assert.equal(error.rawMessage, "tokenize: odd input (-1)");
    assert.equal(error.message, "chat: tokenize: odd input (-1) (-32603)");
    assert.deepEqual(error.data, { detail: "x" });
    assert.equal(toOpenAIError(error).message, "tokenize: odd input (-1)");
  });
});

describe("SidecarStartError", () => {
  test("keeps the reason and the summary apart from the stderr tail", T, async () => {
    const error = await LocalMLX.start({ python: "/nonexistent/python3", startTimeoutMs: 5_000 }).then(
      () => assert.fail("the start should fail"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof SidecarStartError);
    assert.match(error.details.reason ?? "", /^cannot run \/nonexistent\/python3: /);
    assert.ok(error.summary.endsWith(error.details.reason!));
    assert.ok(error.message.startsWith(error.summary));
  });
});

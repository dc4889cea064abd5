import assert from "node:assert/strict";
import { PassThrough, Writable } from "node:stream";
import { describe, test } from "node:test";
import { Connection, type WireWarning } from "../src/connection";
import { ErrorCode, RpcError } from "../src/errors";
import { Prediction, type PredictionChunk } from "../src/prediction";

/** A connection on in-memory streams: `sidecar.write(...)` plays the sidecar's stdout. */
function wire(options: { maxMessageBytes?: number; output?: Writable } = {}) {
  const sidecar = new PassThrough();
  const sent: unknown[] = [];
  const output =
    options.output ??
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        for (const line of chunk.toString("utf8").split("\n").filter(Boolean)) sent.push(JSON.parse(line));
        callback();
      },
    });
  const warnings: WireWarning[] = [];
  let id = 0;
  const connection = new Connection(sidecar, output, {
    maxMessageBytes: options.maxMessageBytes ?? 1 << 20,
    maxLineBytes: 1 << 20,
    nextId: () => ++id,
    onWarning: (warning) => warnings.push(warning),
  });
  const send = (...messages: unknown[]): void => {
    sidecar.write(messages.map((message) => `${JSON.stringify(message)}\n`).join(""));
  };
  return { connection, sidecar, sent, warnings, send };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

function prediction(onWarning: (warning: WireWarning) => void = () => undefined): Prediction {
  return new Prediction({ method: "chat", highWaterMark: 1024, onWarning });
}

async function collect(p: Prediction): Promise<string[]> {
  const texts: string[] = [];
  for await (const chunk of p) texts.push(chunk.text);
  return texts;
}

const usage = { promptTokens: 1, completionTokens: 3, totalTokens: 4 };
const timings = { ttftMs: 1, tokensPerSecond: 1, totalMs: 1 };
const result = (id: number) => ({ jsonrpc: "2.0", id, result: { model: "m", finishReason: "stop", usage, timings } });
const chunk = (requestId: unknown, seq: number, text: string) => ({
  jsonrpc: "2.0",
  method: "generate/chunk",
  params: { requestId, seq, text },
});

describe("Connection routing", () => {
  test("interleaved streams never mix, and chunks are put back in seq order", async () => {
    const { connection, send, sent } = wire();
    const a = prediction();
    const b = prediction();
    a.start(connection, { messages: [] });
    b.start(connection, { messages: [] });
    assert.deepEqual(
      sent.map((m) => (m as { id: number; params: { stream: boolean } }).params.stream),
      [true, true],
    );
    const [textsA, textsB] = [collect(a), collect(b)];
    send(chunk(1, 0, "a0"), chunk(2, 1, "b1"), chunk(1, 1, "a1"), chunk(2, 0, "b0"), chunk("1", 2, "not-a"));
    send(chunk(2, 2, "b2"), chunk(1, 2, "a2"), result(2), result(1));
    assert.deepEqual(await textsA, ["a0", "a1", "a2"]);
    assert.deepEqual(await textsB, ["b0", "b1", "b2"]);
    assert.equal((await a.result).text, "a0a1a2");
    assert.equal((await b.result).text, "b0b1b2");
  });

  test("a string id is not the number id", async () => {
    const { connection, send, warnings } = wire();
    const pending = connection.request("ping", {});
    send({ jsonrpc: "2.0", id: "1", result: {} });
    await tick();
    assert.equal(warnings.length, 1);
    send({ jsonrpc: "2.0", id: 1, result: {} });
    assert.deepEqual(await pending, {});
  });

  test("junk lines are skipped and reported; the stream goes on", async () => {
    const { connection, sidecar, send, warnings } = wire();
    const pending = connection.request("ping", {});
    sidecar.write("Loading weights... 50%\n{not json\n[1,2]\n\xff\xfe\n");
    sidecar.write(Buffer.from([0xc3, 0x28, 0x0a])); // invalid UTF-8
    send({ jsonrpc: "2.0", id: 1, result: {} });
    assert.deepEqual(await pending, {});
    assert.deepEqual(
      warnings.map((w) => w.kind),
      ["junk", "junk", "junk", "junk", "junk", "junk"],
    );
    assert.match(warnings[0]!.line!, /Loading weights/);
  });

  test("an oversized response fails its own request at once with -32017", async () => {
    const { connection, send, warnings } = wire({ maxMessageBytes: 64 });
    const big = connection.request("tokenize", { text: "x" });
    const small = connection.request("ping", {});
    send({ jsonrpc: "2.0", id: 1, result: { model: "m", tokens: Array.from({ length: 100 }, (_, i) => i) } });
    send({ jsonrpc: "2.0", id: 2, result: {} });
    await assert.rejects(big, (error: unknown) => error instanceof RpcError && error.code === ErrorCode.MessageTooLarge);
    assert.deepEqual(await small, {});
    assert.equal(warnings[0]!.kind, "oversized");
  });

  test("an outgoing line over the sidecar's limit is refused before it is written", async () => {
    const { connection, sent } = wire();
    connection.maxLineBytes = 100;
    await assert.rejects(
      connection.request("tokenize", { text: "x".repeat(200) }),
      (error: unknown) => error instanceof RpcError && error.code === ErrorCode.MessageTooLarge,
    );
    assert.equal(sent.length, 0);
  });

  test("progress is routed to its request by token", async () => {
    const { connection, send, sent } = wire();
    const seen: number[] = [];
    const pending = connection.request("models/load", { model: "m" }, { onProgress: (p) => seen.push(p.completed) });
    const token = (sent[0] as { params: { _meta: { progressToken: number } } }).params._meta.progressToken;
    send({ jsonrpc: "2.0", method: "$/progress", params: { token, phase: "load", completed: 1, total: 2, unit: "step" } });
    send({ jsonrpc: "2.0", method: "$/progress", params: { token: 999, phase: "load", completed: 5, total: 2, unit: "step" } });
    send({ jsonrpc: "2.0", id: 1, result: { model: "m" } });
    await pending;
    assert.deepEqual(seen, [1]);
  });

  test("other notifications go to onNotification", async () => {
    const sidecar = new PassThrough();
    const seen: unknown[] = [];
    new Connection(sidecar, new PassThrough(), {
      maxMessageBytes: 1024,
      maxLineBytes: 1024,
      nextId: () => 1,
      onWarning: () => assert.fail("no warning expected"),
      onNotification: (method, params) => seen.push([method, params]),
    });
    sidecar.write('{"jsonrpc":"2.0","method":"$/log","params":{"level":"info"}}\n');
    await tick();
    assert.deepEqual(seen, [["$/log", { level: "info" }]]);
  });

  test("close() fails every pending call with the given error", async () => {
    const { connection } = wire();
    const a = connection.request("ping", {});
    const p = prediction();
    p.start(connection, {});
    const boom = new Error("gone");
    connection.close(boom);
    await assert.rejects(a, boom);
    await assert.rejects(p.result, boom);
    await assert.rejects(connection.request("ping", {}), boom);
  });
});

describe("Connection writing", () => {
  test("writes wait for drain instead of piling into a full stream", async () => {
    let needDrainWrites = 0;
    const received: string[] = [];
    const output = new Writable({
      highWaterMark: 16,
      write(chunk: Buffer, _encoding, callback) {
        received.push(chunk.toString("utf8"));
        setTimeout(callback, 2);
      },
    });
    const write = output.write.bind(output);
    output.write = ((...args: Parameters<Writable["write"]>) => {
      if (output.writableNeedDrain) needDrainWrites++;
      return write(...args);
    }) as Writable["write"];
    const { connection } = wire({ output });
    for (let i = 0; i < 20; i++) connection.notify("note", { i });
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(needDrainWrites, 0);
    assert.equal(received.join("").trim().split("\n").length, 20);
    assert.deepEqual(JSON.parse(received.join("").trim().split("\n")[19]!).params, { i: 19 });
  });

  test("EPIPE on the sidecar's stdin is reported, never thrown", async () => {
    const output = new Writable({
      write(_chunk, _encoding, callback) {
        callback(Object.assign(new Error("write EPIPE"), { code: "EPIPE" }));
      },
    });
    const errors: Error[] = [];
    let id = 0;
    const connection = new Connection(new PassThrough(), output, {
      maxMessageBytes: 1024,
      maxLineBytes: 1024,
      nextId: () => ++id,
      onWarning: () => undefined,
      onWriteError: (error) => errors.push(error),
    });
    connection.notify("a");
    connection.notify("b");
    await tick();
    await tick();
    assert.equal(errors.length, 1);
    assert.match(errors[0]!.message, /EPIPE/);
  });
});

describe("Flow control per prediction", () => {
  async function rest(iterator: AsyncIterator<PredictionChunk>): Promise<PredictionChunk[]> {
    const seen: PredictionChunk[] = [];
    for (let next = await iterator.next(); !next.done; next = await iterator.next()) seen.push(next.value);
    return seen;
  }

  test("a consumer that falls behind never pauses reads: other calls are answered meanwhile", async () => {
    const { connection, send } = wire();
    const p = new Prediction({ method: "chat", highWaterMark: 2, onWarning: () => undefined });
    p.start(connection, {});
    const iterator = p[Symbol.asyncIterator]();
    for (let seq = 0; seq < 6; seq++) send(chunk(1, seq, `t${seq}`));
    const ping = connection.request("ping", {});
    send({ jsonrpc: "2.0", id: 2, result: {} }, result(1));
    assert.deepEqual(await ping, {});
    assert.equal((await p.result).text, "t0t1t2t3t4t5");
    // Past the mark, later text joined the last unread chunk; seq counts what is yielded.
    assert.deepEqual(await rest(iterator), [
      { text: "t0", seq: 0 },
      { text: "t1t2t3t4t5", seq: 1 },
    ]);
  });

  test("a consumer that keeps up gets the chunks as sent; one that lags gets them joined", async () => {
    const { connection, send } = wire();
    const p = new Prediction({ method: "chat", highWaterMark: 2, onWarning: () => undefined });
    p.start(connection, {});
    const iterator = p[Symbol.asyncIterator]();
    const first = iterator.next();
    send(chunk(1, 0, "a"));
    assert.deepEqual((await first).value, { text: "a", seq: 0 });
    send(chunk(1, 2, "c"), chunk(1, 1, "b"), chunk(1, 3, "d"), result(1));
    await p.result;
    assert.deepEqual(await rest(iterator), [
      { text: "b", seq: 1 },
      { text: "cd", seq: 2 },
    ]);
  });

  test("breaking off drops the unread chunks; result.text stays whole", async () => {
    const { connection, send } = wire();
    const p = new Prediction({ method: "chat", highWaterMark: 2, onWarning: () => undefined });
    p.start(connection, {});
    const iterator = p[Symbol.asyncIterator]();
    send(chunk(1, 0, "a"), chunk(1, 1, "b"), chunk(1, 2, "c"));
    assert.deepEqual((await iterator.next()).value, { text: "a", seq: 0 });
    await iterator.return!();
    send(chunk(1, 3, "d"), { jsonrpc: "2.0", id: 1, result: { model: "m", finishReason: "cancelled", usage, timings } });
    assert.deepEqual(await iterator.next(), { done: true, value: undefined });
    assert.equal((await p.result).text, "abcd");
  });
});

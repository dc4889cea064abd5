import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ByteTail, encodeMessage, isOversized, LineSplitter, parseLine, peekId, type Frame } from "../src/framing";

const text = (frames: Frame[]): string[] => frames.map((frame) => (isOversized(frame) ? "<oversized>" : frame.toString("utf8")));

describe("LineSplitter", () => {
  test("a multi-byte character split across chunks survives, byte by byte", () => {
    const line = Buffer.from('{"text":"héllo 🌊 мир"}\n{"n":2}\n', "utf8");
    const splitter = new LineSplitter(1024);
    const frames: Frame[] = [];
    for (const byte of line) frames.push(...splitter.push(Buffer.from([byte])));
    assert.deepEqual(text(frames), ['{"text":"héllo 🌊 мир"}', '{"n":2}']);
    assert.deepEqual(parseLine(frames[0] as Buffer), { text: "héllo 🌊 мир" });
  });

  test("several lines in one chunk, \\r\\n endings, blank lines skipped", () => {
    const splitter = new LineSplitter(1024);
    assert.deepEqual(text(splitter.push(Buffer.from("a\r\n\n  \r\nb\nc"))), ["a", "b"]);
    assert.deepEqual(text(splitter.push(Buffer.from("d\n"))), ["cd"]);
  });

  test("an unterminated last line counts at end of input", () => {
    const splitter = new LineSplitter(1024);
    assert.deepEqual(text(splitter.push(Buffer.from("x\ny"))), ["x"]);
    assert.deepEqual(text(splitter.end()), ["y"]);
  });

  test("an oversized line is reported once, as soon as it passes the cap, and the stream goes on", () => {
    const splitter = new LineSplitter(10);
    const first = splitter.push(Buffer.from('{"id":7,"x":"aaaa'));
    assert.equal(first.length, 1);
    assert.ok(isOversized(first[0]!));
    assert.equal(peekId((first[0] as { head: Buffer }).head), 7);
    assert.deepEqual(text(splitter.push(Buffer.from("aaaaaaaaaaaaaaaa"))), []);
    assert.deepEqual(text(splitter.push(Buffer.from('aaa"}\nok\n'))), ["ok"]);
  });

  test("a line over the cap inside one chunk is reported, not returned", () => {
    const splitter = new LineSplitter(4);
    assert.deepEqual(text(splitter.push(Buffer.from("12345\n1234\n"))), ["<oversized>", "1234"]);
  });
});

describe("peekId", () => {
  test("finds a top-level id, not a nested one", () => {
    assert.equal(peekId(Buffer.from('{"jsonrpc":"2.0","id":12,"result":{"x"')), 12);
    assert.equal(peekId(Buffer.from('{"params":{"id":3},"id":"abc","method"')), "abc");
    assert.equal(peekId(Buffer.from('{"params":{"id":3},"method":"x"')), undefined);
    assert.equal(peekId(Buffer.from('{"id":null,"error":{')), null);
  });
});

describe("encodeMessage", () => {
  test("one line of valid UTF-8 even with a lone surrogate", () => {
    const line = encodeMessage({ text: "a\ud800b\nc" });
    assert.equal(line.indexOf("\n"), line.length - 1);
    assert.equal(line, '{"text":"a\\ud800b\\nc"}\n');
  });
});

describe("ByteTail", () => {
  test("keeps the last bytes and never starts inside a character", () => {
    const tail = new ByteTail(8);
    tail.push(Buffer.from("0123456789"));
    tail.push(Buffer.from("ab"));
    assert.equal(tail.toString(), "456789ab");
    const utf8 = new ByteTail(5);
    utf8.push(Buffer.from("xxмир", "utf8")); // м и р are 2 bytes each: the cut falls inside "м"
    assert.equal(utf8.toString(), "ир");
  });
});

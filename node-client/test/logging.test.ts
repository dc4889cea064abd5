/** The sidecar's log arrives structured (LOCALMLX_LOG_FORMAT=json); other stderr lines pass through as they are. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { LocalMLX, SidecarStartError, type SidecarLogRecord } from "../src/index";
import { python, startClient } from "./helpers";

const T = { timeout: 60_000 };

type Entry = { level: string; line: string };

function capture(): { entries: Entry[]; logger: Record<"debug" | "info" | "warn" | "error", (line: string) => void> } {
  const entries: Entry[] = [];
  const at = (level: string) => (line: string) => entries.push({ level, line });
  return { entries, logger: { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") } };
}

describe("the sidecar's log", () => {
  test("the real sidecar writes one JSON object per line; the logger gets readable text at its level", T, async () => {
    const { entries, logger } = capture();
    const records: SidecarLogRecord[] = [];
    const raw: string[] = [];
    const mlx = await startClient({ logger, env: { LOCALMLX_LOG_LEVEL: "DEBUG" } });
    mlx.on("log", (record) => records.push(record));
    mlx.on("stderr", (line) => raw.push(line));
    try {
      await mlx.chat({ messages: [{ role: "user", content: "hi" }], maxTokens: 3 }).result;
    } finally {
      await mlx.close();
    }
    const serving = entries.find((e) => /serving/.test(e.line));
    assert.ok(serving, "the start-up line reached the logger");
    assert.equal(serving.level, "info");
    assert.match(serving.line, /^localmlx: localmlx\.session: serving/);
    assert.ok(entries.some((e) => e.level === "debug"), "DEBUG lines go to logger.debug");
    assert.ok(!entries.some((e) => e.line.includes('"level"')), "no JSON reaches the logger");
    assert.ok(records.length > 0);
    for (const record of records) {
      assert.match(record.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}/);
      assert.ok(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"].includes(record.level));
      assert.equal(typeof record.logger, "string");
      assert.equal(typeof record.message, "string");
    }
    assert.ok(raw.every((line) => !line.startsWith("{") || JSON.parse(line).message !== undefined));
  });

  test("levels map to the logger; a line that is not JSON passes through as it is; the error's tail is readable", T, async () => {
    const { entries, logger } = capture();
    const script = [
      "import json, os, sys",
      "w = sys.stderr.write",
      "w(json.dumps({'time': '2026-01-01T00:00:00.000+00:00', 'level': 'WARNING', 'logger': 'localmlx.x', 'message': 'format=' + os.environ.get('LOCALMLX_LOG_FORMAT', '')}) + '\\n')",
      "w(json.dumps({'time': '2026-01-01T00:00:00.000+00:00', 'level': 'ERROR', 'logger': 'localmlx.y', 'message': 'it broke', 'exception': 'Traceback (most recent call last):\\nValueError: bad'}) + '\\n')",
      "w('a plain line, 100% not JSON {\\n')",
      "w('{\"not\": \"a log record\"}\\n')",
      "sys.exit(3)",
    ].join("\n");
    await assert.rejects(LocalMLX.start({ python, args: ["-c", script], logger }), (error: unknown) => {
      assert.ok(error instanceof SidecarStartError);
      assert.match(error.stderrTail, /WARNING localmlx\.x: format=json/);
      assert.match(error.stderrTail, /ERROR localmlx\.y: it broke\nTraceback \(most recent call last\):\nValueError: bad/);
      return true;
    });
    assert.deepEqual(entries.slice(0, 4), [
      { level: "warn", line: "localmlx: localmlx.x: format=json" },
      { level: "error", line: "localmlx: localmlx.y: it broke\nTraceback (most recent call last):\nValueError: bad" },
      { level: "info", line: "localmlx: a plain line, 100% not JSON {" },
      { level: "info", line: 'localmlx: {"not": "a log record"}' },
    ]);
  });

  test("the host's own LOCALMLX_LOG_FORMAT in `env` wins", T, async () => {
    const { entries, logger } = capture();
    const mlx = await startClient({ model: undefined, logger, env: { LOCALMLX_LOG_FORMAT: "text" } });
    await mlx.close();
    const serving = entries.find((e) => /serving/.test(e.line));
    assert.ok(serving);
    assert.match(serving.line, /^localmlx: \S+ \S+ INFO localmlx\.session: serving/, "the text format, passed through");
  });
});

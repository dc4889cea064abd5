/**
 * The service's log: one line per event on stderr, as a JSON object (`{"time","level","msg",…}`)
 * or as text (`2025-01-01T00:00:00.000Z INFO msg key=value`). Values are escaped (JSON strings; in
 * text, anything not plain is quoted), so no line can be split or forged by what it carries.
 * Callers pass facts (ports, models, statuses), never prompt or output text.
 */
import type { Logger } from "../client";
import type { ServiceLogFormat, ServiceLogLevel } from "./config";

const RANK: Record<ServiceLogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
const PLAIN = /^[\w.:/@+%,-]*$/;

export type LogFields = Record<string, unknown>;

export class ServiceLog {
  constructor(
    public format: ServiceLogFormat = "json",
    public level: ServiceLogLevel = "info",
    private readonly write: (line: string) => void = (line) => void process.stderr.write(line),
  ) {}

  debug(msg: string, fields?: LogFields): void {
    this.log("debug", msg, fields);
  }

  info(msg: string, fields?: LogFields): void {
    this.log("info", msg, fields);
  }

  warn(msg: string, fields?: LogFields): void {
    this.log("warn", msg, fields);
  }

  error(msg: string, fields?: LogFields): void {
    this.log("error", msg, fields);
  }

  log(level: ServiceLogLevel, msg: string, fields: LogFields = {}): void {
    if (RANK[level] < RANK[this.level]) return;
    const time = new Date().toISOString();
    const defined = Object.entries(fields).filter(([, value]) => value !== undefined);
    if (this.format === "json") {
      this.write(`${JSON.stringify({ time, level, msg, ...Object.fromEntries(defined) })}\n`);
      return;
    }
    const pairs = defined.map(([key, value]) => `${key}=${textValue(value)}`);
    this.write(`${[time, level.toUpperCase(), escapeText(msg), ...pairs].join(" ")}\n`);
  }

  /** A `Logger` (the client's interface: message strings) whose lines carry `source`. */
  logger(source: string, levels: ServiceLogLevel[] = ["debug", "info", "warn", "error"]): Logger {
    const out: Logger = {};
    for (const level of levels) out[level] = (message: string) => this.log(level, message, { source });
    return out;
  }
}

/** A message on one line: control characters (newlines included) written as JSON escapes. */
function escapeText(text: string): string {
  // eslint-disable-next-line no-control-regex
  return /[\u0000-\u001f\u007f\u2028\u2029]/.test(text) ? JSON.stringify(text).slice(1, -1) : text;
}

function textValue(value: unknown): string {
  if (typeof value === "number" || typeof value === "boolean" || value === null) return String(value);
  if (typeof value === "string") return PLAIN.test(value) && value !== "" ? value : JSON.stringify(value);
  return JSON.stringify(value) ?? String(value);
}

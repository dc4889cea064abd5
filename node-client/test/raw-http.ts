/**
 * HTTP at the byte level, for requests no HTTP client library would send: a raw TCP socket
 * (`node:net`) writes whatever bytes it is given and reads back the first response.
 */
import { connect, type Socket } from "node:net";

export interface RawResponse {
  status: number;
  /** Header names in lower case. */
  headers: Record<string, string>;
  body: string;
  /** The body parsed as JSON, when it is JSON. */
  json?: { error?: { message: string; type: string; param: string | null; code: string | null } } & Record<string, unknown>;
  /** Milliseconds from connecting to the whole response. */
  ms: number;
}

export interface RawOptions {
  /** Rejects when no whole response came by then. Default 10 s. */
  deadlineMs?: number;
  /** Writes the request itself (slowly, in pieces…) instead of sending `request` at once. */
  write?: (socket: Socket) => void;
}

/**
 * Sends `request` to `port` on loopback and resolves with the first whole response, or with
 * `undefined` when the server closed the connection without answering.
 */
export function rawExchange(port: number, request: string | Buffer, options: RawOptions = {}): Promise<RawResponse | undefined> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    const chunks: Buffer[] = [];
    let settled = false;
    const finish = (value: RawResponse | undefined, error?: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(deadline);
      socket.destroy();
      if (error) reject(error);
      else resolve(value);
    };
    const deadline = setTimeout(
      () => finish(undefined, new Error(`no whole response within ${options.deadlineMs ?? 10_000} ms to ${JSON.stringify(String(request).slice(0, 80))}`)),
      options.deadlineMs ?? 10_000,
    );
    socket.on("connect", () => {
      if (options.write) options.write(socket);
      else socket.write(request);
    });
    socket.on("data", (chunk: Buffer) => {
      chunks.push(chunk);
      const response = parseResponse(Buffer.concat(chunks), false, started);
      if (response) finish(response);
    });
    socket.on("error", () => undefined); // a reset after the answer is fine; no answer is `undefined`
    socket.on("close", () => finish(parseResponse(Buffer.concat(chunks), true, started)));
  });
}

/** The first response in `bytes`, once it is whole (or at the end of the connection). */
function parseResponse(bytes: Buffer, ended: boolean, started: number): RawResponse | undefined {
  const headEnd = bytes.indexOf("\r\n\r\n");
  if (headEnd < 0) return undefined;
  const [statusLine, ...lines] = bytes.subarray(0, headEnd).toString("latin1").split("\r\n");
  const match = /^HTTP\/1\.[01] (\d{3})/.exec(statusLine ?? "");
  if (!match) return undefined;
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(":");
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  if (match[1]!.startsWith("1")) return parseResponse(bytes.subarray(headEnd + 4), ended, started); // 100 Continue: interim
  const rest = bytes.subarray(headEnd + 4);
  let body: Buffer;
  if (headers["content-length"] !== undefined) {
    const length = Number(headers["content-length"]);
    if (rest.length < length && !ended) return undefined; // (a HEAD answer ends without its body)
    body = rest.subarray(0, length);
  } else if (/chunked/i.test(headers["transfer-encoding"] ?? "")) {
    const decoded = dechunk(rest);
    if (!decoded) return ended ? { status: Number(match[1]), headers, body: rest.toString("utf8"), ms: Date.now() - started } : undefined;
    body = decoded;
  } else {
    if (!ended) return undefined;
    body = rest;
  }
  const text = body.toString("utf8");
  const response: RawResponse = { status: Number(match[1]), headers, body: text, ms: Date.now() - started };
  if ((headers["content-type"] ?? "").includes("json")) {
    try {
      response.json = JSON.parse(text) as RawResponse["json"];
    } catch {
      // left undefined: the caller asserts on it
    }
  }
  return response;
}

function dechunk(bytes: Buffer): Buffer | undefined {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const lineEnd = bytes.indexOf("\r\n", at);
    if (lineEnd < 0) return undefined;
    const size = parseInt(bytes.subarray(at, lineEnd).toString("latin1"), 16);
    if (!Number.isFinite(size)) return undefined;
    if (size === 0) return Buffer.concat(parts);
    if (bytes.length < lineEnd + 2 + size + 2) return undefined;
    parts.push(bytes.subarray(lineEnd + 2, lineEnd + 2 + size));
    at = lineEnd + 2 + size + 2;
  }
}

/** A whole HTTP/1.1 request with `Connection: close` (and the body's length). */
export function httpRequest(method: string, target: string, body?: string | Buffer, headers: Record<string, string> = {}): Buffer {
  const payload = body === undefined ? Buffer.alloc(0) : Buffer.isBuffer(body) ? body : Buffer.from(body, "utf8");
  const head = [
    `${method} ${target} HTTP/1.1`,
    "Host: 127.0.0.1",
    "Connection: close",
    ...(body !== undefined ? ["Content-Type: application/json", `Content-Length: ${payload.length}`] : []),
    ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`),
  ];
  return Buffer.concat([Buffer.from(`${head.join("\r\n")}\r\n\r\n`, "latin1"), payload]);
}

/** `depth` arrays nested in one another: `[[[…]]]`. */
export function nestedArrays(depth: number): string {
  return "[".repeat(depth) + "]".repeat(depth);
}

/** `depth` objects nested in one another under key `a`: `{"a":{"a":…{}}}`. */
export function nestedObjects(depth: number): string {
  return '{"a":'.repeat(depth - 1) + "{}" + "}".repeat(depth - 1);
}

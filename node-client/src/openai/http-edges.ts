/**
 * The endpoint's HTTP edges, where anything may arrive: request targets read by functions that
 * cannot throw, answers written straight to a socket whose request never parsed, and values made
 * safe for a log line.
 */
import { STATUS_CODES } from "node:http";
import { OpenAIHttpError } from "./errors";

/**
 * The path of a request target (`/v1/models?x` → `/v1/models`), or `undefined` when the target is
 * no path: `*`, or an absolute URL whose authority is not a host (`http://[/v1/models`). Never
 * throws. The path is matched as sent; only a model id is percent-decoded (`decodeSegment`).
 */
export function pathOfTarget(target: string): string | undefined {
  let rest = target;
  const absolute = /^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i.exec(target);
  if (absolute) {
    if (!URL.canParse(`http://${absolute[1]}/`)) return undefined;
    rest = target.slice(absolute[0].length) || "/";
  }
  if (!rest.startsWith("/")) return undefined;
  const end = rest.search(/[?#]/);
  return end < 0 ? rest : rest.slice(0, end);
}

/** One percent-encoded path segment decoded, or `undefined` when its encoding is broken. */
export function decodeSegment(segment: string): string | undefined {
  try {
    return decodeURIComponent(segment);
  } catch {
    return undefined;
  }
}

/** The 400 for a target that is no path, or a segment whose percent-encoding is broken. */
export function badTarget(message: string, param: string | null = null): OpenAIHttpError {
  return new OpenAIHttpError(400, message, "invalid_request_error", param, "invalid_request_target");
}

/**
 * What a connection's error from node's HTTP parser or timers is answered with: a bad request
 * line or header (400), headers past `maxHeaderBytes` (431), a slow client (408).
 */
export function clientErrorOf(code: string | undefined): OpenAIHttpError {
  const [status, message, errorCode] = ((): [number, string, string] => {
    switch (code) {
      case "HPE_HEADER_OVERFLOW":
        return [431, "The request's headers are too large", "headers_too_large"];
      case "HPE_CHUNK_EXTENSIONS_OVERFLOW":
        return [413, "The request's chunk extensions are too large", "request_too_large"];
      case "ERR_HTTP_REQUEST_TIMEOUT":
        return [408, "The request did not arrive in time", "request_timeout"];
      default:
        return [400, "The request is not valid HTTP/1.1", "bad_request"];
    }
  })();
  // The parser cannot go on after its error: the connection closes after the answer.
  return new OpenAIHttpError(status, message, "invalid_request_error", null, errorCode, { connection: "close" });
}

/** A whole HTTP/1.1 response, for a socket no `ServerResponse` owns; it closes the connection. */
export function rawResponse(error: OpenAIHttpError): string {
  const body = JSON.stringify(error.body);
  const headers = { ...error.headers, "content-type": "application/json", "content-length": String(Buffer.byteLength(body)), connection: "close" };
  const head = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join("");
  return `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status] ?? "Error"}\r\n${head}\r\n${body}`;
}

const LOG_VALUE_MAX = 200;

/**
 * A value as it may appear in a log line: control characters (C0, DEL, C1, the line and paragraph
 * separators) and backslashes escaped, so nothing a client sends can end the line or start one;
 * at most 200 characters.
 */
export function logValue(value: string): string {
  const cut = value.length > LOG_VALUE_MAX ? `${value.slice(0, LOG_VALUE_MAX)}…` : value;
  return cut.replace(/[\\\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => {
    switch (c) {
      case "\\":
        return "\\\\";
      case "\n":
        return "\\n";
      case "\r":
        return "\\r";
      case "\t":
        return "\\t";
      default:
        return c.charCodeAt(0) < 0x100 ? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}` : `\\u${c.charCodeAt(0).toString(16)}`;
    }
  });
}

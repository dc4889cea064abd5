/**
 * Limits on what one request may hold, checked before any work: how deep its JSON nests (scanned
 * in the raw text, before it is parsed), how many messages, tools and stop strings, and how large
 * each schema is. Each refusal is a 400 naming the param.
 */
import { badRequest, type OpenAIHttpError } from "./errors";

export interface RequestLimits {
  /**
   * How deep arrays and objects may nest, in a body or in a tool call's `arguments` text
   * (the body object is level 1). Default 64: the sidecar's own limit on what it is sent.
   */
  maxDepth: number;
  /** Messages in one chat. Default 2048 (as OpenAI). */
  maxMessages: number;
  /** Tools offered in one chat. Default 128 (as OpenAI and the sidecar). */
  maxTools: number;
  /** Bytes of one schema: each tool's `parameters`, `response_format`'s schema. Default 64 KiB. */
  maxSchemaBytes: number;
  /** Stop strings. Default 16 (the sidecar's limit). */
  maxStopStrings: number;
  /** Texts in one embeddings request. Default 2048 (as OpenAI). */
  maxEmbeddingInputs: number;
}

export const DEFAULT_LIMITS: Readonly<RequestLimits> = Object.freeze({
  maxDepth: 64,
  maxMessages: 2048,
  maxTools: 128,
  maxSchemaBytes: 64 * 1024,
  maxStopStrings: 16,
  maxEmbeddingInputs: 2048,
});

/** The defaults with `overrides` over them. */
export function limitsOf(overrides: Partial<RequestLimits> = {}): RequestLimits {
  return { ...DEFAULT_LIMITS, ...overrides };
}

/** Path components the refusal names at most (`tools[0].function.parameters.properties.x`). */
const PARAM_PARTS = 6;
const QUOTE = 0x22;
const BACKSLASH = 0x5c;

interface Frame {
  isObject: boolean;
  /** The object's current key, kept for the first PARAM_PARTS levels only. */
  key: string | undefined;
  expectKey: boolean;
  index: number;
}

/**
 * Where `text` (JSON, or what claims to be) first nests deeper than `maxDepth`: the param path
 * down to there (`null` at the top level), or `undefined` when it stays within. One pass, no
 * recursion, no parsing: malformed text is left to `JSON.parse`.
 */
export function nestingPastLimit(text: string, maxDepth: number): { param: string | null } | undefined {
  const frames: Frame[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) {
      const end = stringEnd(text, i + 1);
      const top = frames[frames.length - 1];
      if (top?.isObject && top.expectKey) {
        top.expectKey = false;
        if (frames.length <= PARAM_PARTS) top.key = text.slice(i + 1, Math.min(end, i + 65));
      }
      i = end;
    } else if (c === 0x7b || c === 0x5b) { // { [
      if (frames.length >= maxDepth) return { param: paramOf(frames) };
      frames.push({ isObject: c === 0x7b, key: undefined, expectKey: c === 0x7b, index: 0 });
    } else if (c === 0x7d || c === 0x5d) { // } ]
      frames.pop();
    } else if (c === 0x2c) { // ,
      const top = frames[frames.length - 1];
      if (top?.isObject) top.expectKey = true;
      else if (top) top.index++;
    }
  }
  return undefined;
}

/** The index of the quote that closes the string opened before `from` (or the text's end). */
function stringEnd(text: string, from: number): number {
  for (let at = from; ; ) {
    const quote = text.indexOf('"', at);
    if (quote < 0) return text.length;
    let backslashes = 0;
    while (text.charCodeAt(quote - 1 - backslashes) === BACKSLASH) backslashes++;
    if (backslashes % 2 === 0) return quote;
    at = quote + 1;
  }
}

function paramOf(frames: Frame[]): string | null {
  let param = "";
  for (const frame of frames.slice(0, PARAM_PARTS)) {
    if (frame.isObject) param += frame.key === undefined ? "" : `${param ? "." : ""}${frame.key}`;
    else param += `[${frame.index}]`;
  }
  return param || null;
}

/** The 400 for JSON nested past the limit at `param`. */
export function tooDeep(param: string | null, maxDepth: number): OpenAIHttpError {
  return badRequest(`${param ?? "The request body"} nests arrays and objects more than ${maxDepth} levels deep`, param, "nesting_too_deep");
}

/** Refuses an array longer than `max` at `param`. */
export function checkCount(items: readonly unknown[], max: number, param: string): void {
  if (items.length > max) throw badRequest(`${param} may hold at most ${max} items (got ${items.length})`, param, "too_many_items");
}

/** Refuses a schema whose JSON takes more than `max` bytes (its nesting is already bounded). */
export function checkSchemaSize(schema: unknown, max: number, param: string): void {
  const bytes = Buffer.byteLength(JSON.stringify(schema) ?? "");
  if (bytes > max) throw badRequest(`${param} takes ${bytes} bytes; at most ${max} are accepted`, param, "schema_too_large");
}

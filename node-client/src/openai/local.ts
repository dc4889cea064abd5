/**
 * The local side of the endpoint: model-name routing, and the calls that run a request on the
 * sidecar. The client itself is held by `LocalBackend` (src/backend.ts), re-exported here.
 */
import type { LocalMLX } from "../client";
import type { Prediction, PredictionResult } from "../prediction";
import type { ChatParams, EmbedParams, EmbedResult, StreamedToolCall, ToolCall } from "../protocol";
import type { StreamPiece } from "./translate";

export { LocalBackend, type LocalBackendOptions, type LocalSource } from "../backend";

/** Model names as clients send them → what the sidecar loads. */
export interface ModelRouting {
  /**
   * Name → sidecar model (`"demo"`, a models-dir name, a path, an `owner/repo`). The key `"*"`
   * matches every name not listed (a port that serves one model whatever it is asked for).
   */
  aliases?: Record<string, string>;
  /** Used when the request names no model. Default: the client's model, else the sidecar's default. */
  defaultModel?: string;
}

/** The sidecar model for a requested name (undefined: let the client/sidecar choose). */
export function resolveModel(requested: string | undefined, routing: ModelRouting = {}): string | undefined {
  const aliases = routing.aliases ?? {};
  if (requested === undefined) return routing.defaultModel;
  if (Object.hasOwn(aliases, requested)) return aliases[requested];
  if (Object.hasOwn(aliases, "*")) return aliases["*"];
  return requested;
}

/**
 * What a prediction yields, as one piece: a fragment of `prediction.fragments()` (`{type: "text" |
 * "reasoning", text}` or `{type: "toolCall", toolCall}`), or a plain chunk (`{text}`) from a client
 * without fragments.
 */
export function pieceOf(chunk: unknown): StreamPiece {
  const c = chunk as { type?: unknown; text?: unknown; reasoning?: unknown; toolCalls?: unknown; toolCall?: unknown };
  const piece: StreamPiece = {};
  if (c.type === "reasoning") {
    if (typeof c.text === "string" && c.text !== "") piece.reasoning = c.text;
    return piece;
  }
  if (c.type === "toolCall") {
    if (c.toolCall) piece.toolCalls = [c.toolCall as StreamedToolCall];
    return piece;
  }
  if (typeof c.text === "string" && c.text !== "") piece.text = c.text;
  if (typeof c.reasoning === "string" && c.reasoning !== "") piece.reasoning = c.reasoning;
  if (Array.isArray(c.toolCalls) && c.toolCalls.length > 0) piece.toolCalls = c.toolCalls as StreamedToolCall[];
  return piece;
}

/** Iterates every channel of a prediction: its `fragments()` when the client has them, else its text chunks. */
export function piecesOf(prediction: Prediction): AsyncIterator<unknown> {
  const withFragments = prediction as unknown as { fragments?: () => AsyncIterable<unknown> };
  return typeof withFragments.fragments === "function"
    ? withFragments.fragments()[Symbol.asyncIterator]()
    : prediction[Symbol.asyncIterator]();
}

/** A finished generation with everything its chunks carried. */
export type GatheredResult = PredictionResult & { text: string; reasoning?: string; toolCalls?: ToolCall[] };

/**
 * Iterates a prediction to its end, gathering text, reasoning and tool calls (whether the client
 * puts them on the result or only in chunks). `first` is a chunk already taken from `iterator`.
 */
export async function gather(
  prediction: Prediction,
  iterator: AsyncIterator<unknown> = piecesOf(prediction),
  first?: IteratorResult<unknown>,
): Promise<GatheredResult> {
  let reasoning = "";
  const toolCalls: ToolCall[] = [];
  const take = (chunk: unknown): void => {
    const piece = pieceOf(chunk);
    if (piece.reasoning) reasoning += piece.reasoning;
    for (const { index: _index, ...call } of piece.toolCalls ?? []) toolCalls.push(call);
  };
  if (first && !first.done) take(first.value);
  if (!first || !first.done) {
    for (;;) {
      const next = await iterator.next();
      if (next.done) break;
      take(next.value);
    }
  }
  const result = await prediction.result;
  const gathered: GatheredResult = { ...result };
  if (!gathered.reasoning && reasoning) gathered.reasoning = reasoning;
  if ((!gathered.toolCalls || gathered.toolCalls.length === 0) && toolCalls.length > 0) gathered.toolCalls = toolCalls;
  return gathered;
}

/** Runs `chat` and waits for its first chunk (or its end), so that a failure comes before any output. */
export async function startChat(
  client: LocalMLX,
  params: ChatParams,
  options: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<{ prediction: Prediction; iterator: AsyncIterator<unknown>; first: IteratorResult<unknown> }> {
  const prediction = client.chat({ ...params, ...definedOptions(options) });
  const iterator = piecesOf(prediction);
  const first = await iterator.next();
  if (first.done) await prediction.result; // a failure before any chunk rejects here
  return { prediction, iterator, first };
}

/** `generate`, the same way as `startChat`. */
export async function startGenerate(
  client: LocalMLX,
  params: Parameters<LocalMLX["generate"]>[0],
  options: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<{ prediction: Prediction; iterator: AsyncIterator<unknown>; first: IteratorResult<unknown> }> {
  const prediction = client.generate({ ...params, ...definedOptions(options) });
  const iterator = piecesOf(prediction);
  const first = await iterator.next();
  if (first.done) await prediction.result;
  return { prediction, iterator, first };
}

/** `embed` on the sidecar (through `request`, so it needs no newer client than this one). */
export function embedLocal(
  client: LocalMLX,
  params: EmbedParams,
  options: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<EmbedResult> {
  return client.request("embed", params, definedOptions(options));
}

function definedOptions(options: { signal?: AbortSignal; timeoutMs?: number }): { signal?: AbortSignal; timeoutMs?: number } {
  const out: { signal?: AbortSignal; timeoutMs?: number } = {};
  if (options.signal) out.signal = options.signal;
  if (options.timeoutMs !== undefined) out.timeoutMs = options.timeoutMs;
  return out;
}

/**
 * The local side of the endpoint: one `LocalMLX` (given, or started here and owned), brought back
 * after it failed as a whole, model-name routing, and the calls that run a request on it.
 */
import { LocalMLX, type LocalMLXOptions } from "../client";
import { SidecarUnavailableError } from "../errors";
import type { Prediction, PredictionResult } from "../prediction";
import type { ChatParams, EmbedParams, EmbedResult, StreamedToolCall, ToolCall } from "../protocol";
import { isSidecarDown } from "./errors";
import type { StreamPiece } from "./translate";

/** Where the sidecar comes from: a running client, options to start one, or a factory. */
export type LocalSource = LocalMLX | LocalMLXOptions | (() => Promise<LocalMLX>);

/**
 * Holds the one client. A client it started itself is closed by `close()`; a given one is not.
 * After the sidecar failed as a whole, the next `acquire()` brings it back: it starts a client
 * that never started, or `restart()`s one whose crash budget is spent.
 */
export class LocalBackend {
  private client: LocalMLX | undefined;
  private starting: Promise<LocalMLX> | undefined;
  private lastFailure: unknown;
  private closed = false;
  private readonly owned: boolean;

  constructor(private readonly source: LocalSource) {
    if (source instanceof LocalMLX) {
      this.client = source;
      this.owned = false;
    } else {
      this.owned = true;
    }
  }

  /** The client, started (or restarted after a failure) if need be. */
  acquire(): Promise<LocalMLX> {
    if (this.closed) return Promise.reject(new SidecarUnavailableError("The OpenAI endpoint is closed", undefined));
    if (this.starting) return this.starting;
    if (this.client && !(this.lastFailure instanceof SidecarUnavailableError)) return Promise.resolve(this.client);
    this.starting = this.bringUp().finally(() => {
      this.starting = undefined;
    });
    return this.starting;
  }

  /** The client if it is running now (no start). */
  get current(): LocalMLX | undefined {
    return this.client;
  }

  /**
   * Where the sidecar stands, for a health check: `running` (its pid), `starting`, `stopped` (it
   * exited; the next request starts it again), `down` (it failed as a whole: `error` says why; the
   * next request tries again), `idle` (not started yet), or `closed`.
   */
  get status(): { state: "running" | "starting" | "stopped" | "down" | "idle" | "closed"; pid?: number; error?: string } {
    const error = this.lastFailure === undefined ? undefined : String((this.lastFailure as Error)?.message ?? this.lastFailure).split("\n")[0]!;
    if (this.closed) return { state: "closed" };
    if (this.starting) return { state: "starting" };
    if (error !== undefined) return { state: "down", error };
    const pid = this.client?.pid;
    if (pid !== undefined) return { state: "running", pid };
    return { state: this.client ? "stopped" : "idle" };
  }

  /** Tell the backend a call failed; a failure of the whole sidecar makes the next acquire bring it back. */
  noteFailure(error: unknown): void {
    if (isSidecarDown(error)) this.lastFailure = error;
  }

  noteSuccess(): void {
    this.lastFailure = undefined;
  }

  private async bringUp(): Promise<LocalMLX> {
    if (this.client) {
      await this.client.restart();
      this.lastFailure = undefined;
      return this.client;
    }
    const source = this.source as Exclude<LocalSource, LocalMLX>;
    const client = typeof source === "function" ? await source() : await LocalMLX.start(source);
    if (this.closed) {
      if (this.owned) await client.close();
      throw new SidecarUnavailableError("The OpenAI endpoint is closed", undefined);
    }
    this.client = client;
    this.lastFailure = undefined;
    return client;
  }

  /** Closes a client this backend started (a given one stays open). */
  async close(): Promise<void> {
    this.closed = true;
    const starting = this.starting;
    if (starting) await starting.catch(() => undefined);
    if (this.owned && this.client) await this.client.close();
  }
}

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

/**
 * One generation (`chat` or `generate`): an async iterator of text chunks and, at the same
 * time, a promise of the final result. Chunks are put back in `seq` order for their own
 * request id. A chunk has up to three channels: answer text, reasoning, and finished tool calls;
 * iterating the prediction yields the text, `fragments()` yields all three, and the result
 * carries each one assembled. Flow control is this prediction's own: a consumer that falls
 * behind never pauses the wire; its unread chunks wait here, joined into fewer chunks past
 * `highWaterMark`.
 */
import type { Connection, WireWarning } from "./connection";
import { TimeoutError } from "./errors";
import { TypedEmitter } from "./events";
import type { GenerateChunkParams, GenerationResult, StreamedToolCall, ToolCall } from "./protocol";

/** One piece of generated answer text, in order. */
export interface PredictionChunk {
  text: string;
  /**
   * 0, 1, 2, … counting the chunks this iterator yields, with no gaps. It is the sidecar's `seq`
   * until a lagging consumer gets chunks joined together (or a chunk carried no answer text);
   * from then on it counts the chunks yielded.
   */
  seq: number;
}

/**
 * One piece of a prediction on any channel, in the order the model produced them: answer
 * `text`, `reasoning` (a thinking model's, never part of the text), or a `toolCall` the model
 * has finished (whole, its arguments a JSON text; `error` when it is invalid). `seq` counts the
 * fragments yielded: 0, 1, 2, … with no gaps.
 */
export type PredictionFragment =
  | { type: "text"; text: string; seq: number }
  | { type: "reasoning"; text: string; seq: number }
  | { type: "toolCall"; toolCall: StreamedToolCall; seq: number };

/**
 * The final result: the sidecar's response, with `text` (every text chunk joined), and, when
 * there were any, `reasoning` (every reasoning chunk joined) and `toolCalls` (in `index` order).
 */
export interface PredictionResult extends GenerationResult {
  text: string;
}

/** Events of a prediction, each as its chunk arrives (wire order), whether or not it is iterated. */
export interface PredictionEvents {
  text: [text: string];
  reasoning: [text: string];
  toolCall: [toolCall: StreamedToolCall];
}

export interface PredictionOptions {
  method: "chat" | "generate";
  model?: string | undefined;
  signal?: AbortSignal | undefined;
  timeoutMs?: number | undefined;
  /** Unread chunks kept apart; past it, newly arrived text joins the last unread chunk. */
  highWaterMark: number;
  onWarning(warning: WireWarning): void;
  onResult?(result: PredictionResult): void;
}

type State = "waiting" | "running" | "done" | "failed";
/** A fragment not yet handed out (its `seq` is given when it is). */
type Piece = { type: "text" | "reasoning"; text: string } | { type: "toolCall"; toolCall: StreamedToolCall };
type Yielded = PredictionChunk | PredictionFragment;
type Waiter = { resolve(result: IteratorResult<Yielded>): void; reject(error: unknown): void };

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

export class Prediction
  extends TypedEmitter<PredictionEvents>
  implements AsyncIterable<PredictionChunk>, PromiseLike<PredictionResult>
{
  /** The final result. Aborting does not reject it: it resolves with finishReason "cancelled". */
  readonly result: Promise<PredictionResult>;
  private resolveResult!: (result: PredictionResult) => void;
  private rejectResult!: (error: unknown) => void;
  private state: State = "waiting";
  private connection: Connection | undefined;
  private requestId: number | undefined;
  /** All the text so far (for `text` and `result.text`), the reasoning, the tool calls by index. */
  private received = "";
  private receivedReasoning = "";
  private readonly calls = new Map<number, StreamedToolCall>();
  /**
   * Fragments not yet yielded: about `highWaterMark`, the last one taking whatever comes after on
   * its channel. Iterating the prediction itself keeps only text here.
   */
  private readonly unread: Piece[] = [];
  /** The `seq` of the next chunk for the consumer. */
  private nextChunkSeq = 0;
  /** The sidecar's `seq` expected next, and chunks that came before their turn. */
  private nextWireSeq = 0;
  private readonly early = new Map<number, GenerateChunkParams>();
  private iteration: "none" | "active" | "ended" = "none";
  /** What the iteration yields: text chunks (iterating the prediction) or every fragment. */
  private yields: "text" | "fragments" = "text";
  private waiter: Waiter | undefined;
  private error: unknown;
  private cancelRequested = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly onAbort = (): void => this.cancel();

  /** @internal Created by `LocalMLX.chat()` / `LocalMLX.generate()`. */
  constructor(private readonly options: PredictionOptions) {
    super();
    this.result = new Promise<PredictionResult>((resolve, reject) => {
      this.resolveResult = resolve;
      this.rejectResult = reject;
    });
    this.result.catch(() => undefined); // a consumer that only iterates sees errors there
    const { signal, timeoutMs } = options;
    if (signal?.aborted) {
      this.cancel();
      return;
    }
    signal?.addEventListener("abort", this.onAbort, { once: true });
    if (timeoutMs !== undefined && timeoutMs > 0) {
      this.timer = setTimeout(() => this.timeOut(timeoutMs), timeoutMs);
    }
  }

  /** The JSON-RPC id of the request, once it was sent. */
  get id(): number | undefined {
    return this.requestId;
  }

  /** The text received so far. */
  get text(): string {
    return this.received;
  }

  /** The reasoning received so far (a thinking model's; never part of `text`). */
  get reasoning(): string {
    return this.receivedReasoning;
  }

  /** The tool calls received so far, in `index` order, in OpenAI's shape (`error` when invalid). */
  get toolCalls(): ToolCall[] {
    return [...this.calls.values()].sort((a, b) => a.index - b.index).map(({ index: _index, ...call }) => call);
  }

  /** Stops the generation: sends `$/cancelRequest` and ends the iterator; `result` resolves "cancelled". */
  cancel(): void {
    if (this.state === "done" || this.state === "failed") return;
    this.cancelRequested = true;
    this.endIteration();
    if (this.state === "waiting") {
      this.complete(cancelledBeforeStart(this.options.model));
    } else {
      this.connection?.cancel(this.requestId!);
    }
  }

  then<T = PredictionResult, E = never>(
    onFulfilled?: ((result: PredictionResult) => T | PromiseLike<T>) | null,
    onRejected?: ((error: unknown) => E | PromiseLike<E>) | null,
  ): Promise<T | E> {
    return this.result.then(onFulfilled, onRejected);
  }

  /** Yields the answer text, chunk by chunk (reasoning and tool calls are in `fragments()`). */
  [Symbol.asyncIterator](): AsyncIterator<PredictionChunk> {
    return this.iterate("text") as AsyncIterator<PredictionChunk>;
  }

  /**
   * Yields every channel in order: `{type: "text" | "reasoning", text, seq}` and
   * `{type: "toolCall", toolCall, seq}`. Either this or the prediction itself can be iterated, once.
   */
  fragments(): AsyncIterable<PredictionFragment> {
    return { [Symbol.asyncIterator]: () => this.iterate("fragments") as AsyncIterator<PredictionFragment> };
  }

  private iterate(yields: "text" | "fragments"): AsyncIterator<Yielded> {
    if (this.iteration === "active") throw new Error("A prediction can be iterated only once");
    if (this.iteration === "none") {
      this.iteration = "active";
      this.yields = yields;
      if (yields === "text") this.keepText();
    }
    return {
      next: () => this.next(),
      return: async () => {
        if (this.state === "waiting" || this.state === "running") this.cancel();
        else this.endIteration();
        return DONE;
      },
    };
  }

  // ---- driven by the client ------------------------------------------------------------

  /** @internal Sends the request on a ready connection. */
  start(connection: Connection, params: Record<string, unknown>): void {
    if (this.state !== "waiting") return;
    try {
      this.requestId = connection.call(this.options.method, { ...params, stream: true }, {
        onResult: (result) => this.complete(result as GenerationResult),
        onError: (error) => this.fail(error),
        onChunk: (chunk) => this.accept(chunk),
      });
    } catch (error) {
      this.fail(error);
      return;
    }
    this.connection = connection;
    this.state = "running";
  }

  /** @internal */
  fail(error: unknown): void {
    if (this.state === "done" || this.state === "failed") return;
    this.state = "failed";
    this.error = error;
    this.cleanUp();
    this.rejectResult(error);
    if (this.waiter && this.unread.length === 0) {
      const waiter = this.waiter;
      this.waiter = undefined;
      this.iteration = "ended";
      waiter.reject(error);
    }
  }

  // ---- internals ---------------------------------------------------------------------

  private accept(chunk: GenerateChunkParams): void {
    if (this.state !== "running") return;
    if (chunk.seq === this.nextWireSeq) {
      this.push(chunk);
      while (this.early.has(this.nextWireSeq)) {
        const next = this.early.get(this.nextWireSeq)!;
        this.early.delete(this.nextWireSeq);
        this.push(next);
      }
    } else if (chunk.seq > this.nextWireSeq && !this.early.has(chunk.seq)) {
      this.early.set(chunk.seq, chunk);
    } else {
      this.options.onWarning({ kind: "unexpected", message: `duplicate chunk seq ${chunk.seq} for request ${this.requestId}` });
    }
  }

  /** A chunk in wire order: its reasoning, then its text, then its tool calls. */
  private push(chunk: GenerateChunkParams): void {
    this.nextWireSeq++;
    if (chunk.reasoning) {
      this.receivedReasoning += chunk.reasoning;
      this.emit("reasoning", chunk.reasoning);
      this.offer({ type: "reasoning", text: chunk.reasoning });
    }
    if (chunk.text) {
      this.received += chunk.text;
      this.emit("text", chunk.text);
      this.offer({ type: "text", text: chunk.text });
    }
    for (const toolCall of chunk.toolCalls ?? []) {
      this.calls.set(toolCall.index, toolCall);
      this.emit("toolCall", toolCall);
      this.offer({ type: "toolCall", toolCall });
    }
  }

  /** Handed to a waiting consumer, else kept unread (joined past the mark, on its own channel). */
  private offer(piece: Piece): void {
    if (this.iteration === "ended") return;
    if (this.iteration === "active" && this.yields === "text" && piece.type !== "text") return;
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = undefined;
      waiter.resolve({ value: this.handOut(piece), done: false });
      return;
    }
    const last = this.unread[this.unread.length - 1];
    if (this.unread.length >= this.options.highWaterMark && piece.type !== "toolCall" && last?.type === piece.type) {
      (last as { text: string }).text += piece.text; // memory grows with the text, not the chunk count
    } else {
      this.unread.push(piece);
    }
  }

  /** Iterating the prediction itself: drop what came before on the other channels. */
  private keepText(): void {
    const text = this.unread.filter((piece): piece is Piece & { type: "text" } => piece.type === "text");
    this.unread.length = 0;
    for (const piece of text) {
      const last = this.unread[this.unread.length - 1] as { text: string } | undefined;
      if (this.unread.length >= this.options.highWaterMark && last) last.text += piece.text;
      else this.unread.push(piece);
    }
  }

  private handOut(piece: Piece): Yielded {
    const seq = this.nextChunkSeq++;
    if (this.yields === "text") return { text: (piece as { text: string }).text, seq };
    return { ...piece, seq };
  }

  private next(): Promise<IteratorResult<Yielded>> {
    if (this.iteration === "ended") return Promise.resolve(DONE);
    const piece = this.unread.shift();
    if (piece) return Promise.resolve({ value: this.handOut(piece), done: false });
    if (this.state === "done") {
      this.iteration = "ended";
      return Promise.resolve(DONE);
    }
    if (this.state === "failed") {
      this.iteration = "ended";
      return Promise.reject(this.error);
    }
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  private complete(response: GenerationResult): void {
    if (this.state === "done" || this.state === "failed") return;
    if (this.early.size > 0) {
      const missing = this.nextWireSeq;
      this.options.onWarning({ kind: "unexpected", message: `request ${this.requestId} ended with chunk ${missing} missing` });
      for (const seq of [...this.early.keys()].sort((a, b) => a - b)) this.push(this.early.get(seq)!);
      this.early.clear();
    }
    const { text: _text, reasoning, toolCalls, ...rest } = response;
    const result: PredictionResult = { ...rest, text: this.text };
    // Streamed, they came in chunks; a response that carries them anyway is taken as it is.
    if (this.receivedReasoning || reasoning) result.reasoning = this.receivedReasoning || reasoning;
    if (this.calls.size > 0) result.toolCalls = this.toolCalls;
    else if (toolCalls?.length) result.toolCalls = toolCalls;
    this.state = "done";
    this.cleanUp();
    this.resolveResult(result);
    if (!this.cancelRequested || result.finishReason !== "cancelled") this.options.onResult?.(result);
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = undefined;
      this.iteration = "ended";
      waiter.resolve(DONE);
    }
  }

  private timeOut(timeoutMs: number): void {
    if (this.state === "done" || this.state === "failed") return;
    if (this.state === "running") this.connection?.abandon(this.requestId!, true);
    this.fail(new TimeoutError(this.options.method, timeoutMs));
  }

  private endIteration(): void {
    this.iteration = "ended";
    this.unread.length = 0;
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = undefined;
      waiter.resolve(DONE);
    }
  }

  private cleanUp(): void {
    if (this.timer) clearTimeout(this.timer);
    this.options.signal?.removeEventListener("abort", this.onAbort);
  }
}

function cancelledBeforeStart(model: string | undefined): PredictionResult {
  return {
    model: model ?? "",
    text: "",
    finishReason: "cancelled",
    usage: { promptTokens: 0, completionTokens: 0, totalTokens: 0, cachedTokens: 0 },
    timings: { ttftMs: 0, tokensPerSecond: 0, totalMs: 0 },
  };
}

/**
 * One generation (`chat` or `generate`): an async iterator of text chunks and, at the same
 * time, a promise of the final result. Chunks are put back in `seq` order for their own
 * request id. Flow control is this prediction's own: a consumer that falls behind never pauses
 * the wire; its unread chunks wait here, joined into fewer chunks past `highWaterMark`.
 */
import type { Connection, WireWarning } from "./connection";
import { TimeoutError } from "./errors";
import type { GenerateChunkParams, GenerationResult } from "./protocol";

/** One piece of generated text, in order. */
export interface PredictionChunk {
  text: string;
  /**
   * 0, 1, 2, … counting the chunks this iterator yields, with no gaps. It is the sidecar's `seq`
   * until a lagging consumer gets chunks joined together; from then on it counts the joined ones.
   */
  seq: number;
}

/** The final result: the sidecar's response, with `text` (every chunk joined). */
export interface PredictionResult extends GenerationResult {
  text: string;
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
type Waiter = { resolve(result: IteratorResult<PredictionChunk>): void; reject(error: unknown): void };

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

export class Prediction implements AsyncIterable<PredictionChunk>, PromiseLike<PredictionResult> {
  /** The final result. Aborting does not reject it: it resolves with finishReason "cancelled". */
  readonly result: Promise<PredictionResult>;
  private resolveResult!: (result: PredictionResult) => void;
  private rejectResult!: (error: unknown) => void;
  private state: State = "waiting";
  private connection: Connection | undefined;
  private requestId: number | undefined;
  /** All the text so far (for `text` and `result.text`). */
  private received = "";
  /** Chunks not yet yielded: at most `highWaterMark`, the last one taking whatever comes after. */
  private readonly unread: PredictionChunk[] = [];
  /** The `seq` of the next chunk for the consumer. */
  private nextChunkSeq = 0;
  /** The sidecar's `seq` expected next, and chunks that came before their turn. */
  private nextWireSeq = 0;
  private readonly early = new Map<number, string>();
  private iteration: "none" | "active" | "ended" = "none";
  private waiter: Waiter | undefined;
  private error: unknown;
  private cancelRequested = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly onAbort = (): void => this.cancel();

  /** @internal Created by `LocalMLX.chat()` / `LocalMLX.generate()`. */
  constructor(private readonly options: PredictionOptions) {
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

  [Symbol.asyncIterator](): AsyncIterator<PredictionChunk> {
    if (this.iteration === "active") throw new Error("A prediction can be iterated only once");
    if (this.iteration === "none") this.iteration = "active";
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
      this.push(chunk.text);
      while (this.early.has(this.nextWireSeq)) {
        const text = this.early.get(this.nextWireSeq)!;
        this.early.delete(this.nextWireSeq);
        this.push(text);
      }
    } else if (chunk.seq > this.nextWireSeq && !this.early.has(chunk.seq)) {
      this.early.set(chunk.seq, chunk.text);
    } else {
      this.options.onWarning({ kind: "unexpected", message: `duplicate chunk seq ${chunk.seq} for request ${this.requestId}` });
    }
  }

  /** Text in wire order: handed to a waiting consumer, else kept unread (joined past the mark). */
  private push(text: string): void {
    this.nextWireSeq++;
    this.received += text;
    if (this.iteration === "ended") return;
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = undefined;
      waiter.resolve({ value: { text, seq: this.nextChunkSeq++ }, done: false });
    } else if (this.unread.length >= this.options.highWaterMark) {
      this.unread[this.unread.length - 1]!.text += text; // memory grows with the text, not the chunk count
    } else {
      this.unread.push({ text, seq: this.nextChunkSeq++ });
    }
  }

  private next(): Promise<IteratorResult<PredictionChunk>> {
    if (this.iteration === "ended") return Promise.resolve(DONE);
    const value = this.unread.shift();
    if (value) return Promise.resolve({ value, done: false });
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
    const { text: _unused, ...rest } = response;
    const result: PredictionResult = { ...rest, text: this.text };
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

/**
 * JSON-RPC 2.0 over one readable and one writable byte stream (the sidecar's stdout and stdin):
 * ids, pending calls, routing of `generate/chunk` and `$/progress` to their call, and writes that
 * respect `drain`. It reads whatever arrives, always: one slow consumer must never hold up the
 * responses of every other call (flow control is per Prediction). Knows nothing of processes or models.
 */
import type { Readable, Writable } from "node:stream";
import { encodeMessage, isOversized, LineSplitter, parseLine, peekId, type Frame } from "./framing";
import { abortError, ErrorCode, isRecord, RpcError, TimeoutError, type RpcErrorObject } from "./errors";
import type { GenerateChunkParams, MethodName, ParamsOf, ProgressParams, ResultOf } from "./protocol";

/** Something odd on the wire that the client skipped: reported, never fatal. */
export interface WireWarning {
  kind: "junk" | "oversized" | "unexpected";
  message: string;
  /** The start of the offending line, when there was one. */
  line?: string;
}

export interface CallHandlers {
  onResult(result: unknown): void;
  onError(error: Error): void;
  onChunk?(chunk: GenerateChunkParams): void;
  onProgress?(progress: ProgressParams): void;
}

export interface ConnectionOptions {
  /** Cap on one incoming line, in bytes. */
  maxMessageBytes: number;
  /** Cap on one outgoing line (the sidecar's `limits.maxLineBytes`); settable after `initialize`. */
  maxLineBytes: number;
  nextId(): number;
  onWarning(warning: WireWarning): void;
  onNotification?(method: string, params: unknown): void;
  /** Called when the number of pending calls goes from 0 to 1 (true) and back (false). */
  onBusyChange?(busy: boolean): void;
  /** Called once when writing failed (EPIPE and the like): the peer is gone or unusable. */
  onWriteError?(error: Error): void;
}

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  timeoutMs?: number | undefined;
  onProgress?: ((progress: ProgressParams) => void) | undefined;
}

interface Pending {
  method: string;
  handlers: CallHandlers;
}

const PREVIEW_CHARS = 200;

function preview(line: Buffer): string {
  const text = line.subarray(0, PREVIEW_CHARS * 4).toString("utf8");
  return text.length > PREVIEW_CHARS ? `${text.slice(0, PREVIEW_CHARS)}…` : text;
}

/** Queues lines while the stream asks us to wait for `drain`; never lets a write error escape. */
class LineWriter {
  private queue: string[] = [];
  private waitingForDrain = false;
  private ending = false;
  failed: Error | undefined;

  constructor(
    private readonly stream: Writable,
    private readonly onError: (error: Error) => void,
  ) {
    stream.on("error", (error) => this.fail(error));
    stream.on("drain", () => this.flush());
  }

  write(line: string): void {
    if (this.failed || this.ending) return;
    if (this.waitingForDrain) {
      this.queue.push(line);
    } else if (!this.stream.write(line)) {
      this.waitingForDrain = true;
    }
  }

  /** End of input for the peer, once everything queued is written. */
  end(): void {
    if (this.ending) return;
    this.ending = true;
    if (!this.waitingForDrain) this.stream.end();
  }

  private flush(): void {
    this.waitingForDrain = false;
    while (this.queue.length > 0 && !this.waitingForDrain && !this.failed) {
      if (!this.stream.write(this.queue.shift()!)) this.waitingForDrain = true;
    }
    if (this.ending && !this.waitingForDrain && this.queue.length === 0) this.stream.end();
  }

  private fail(error: Error): void {
    if (this.failed) return;
    this.failed = error;
    this.queue = [];
    this.onError(error);
  }
}

export class Connection {
  private readonly splitter: LineSplitter;
  private readonly writer: LineWriter;
  private readonly pending = new Map<number, Pending>();
  /** Calls given up on (timeout, abort): their late messages are dropped silently. */
  private readonly abandoned = new Set<number>();
  private closedWith: Error | undefined;

  constructor(
    input: Readable,
    output: Writable,
    private readonly options: ConnectionOptions,
  ) {
    this.splitter = new LineSplitter(options.maxMessageBytes);
    this.writer = new LineWriter(output, (error) => options.onWriteError?.(error));
    input.on("data", (chunk: Buffer) => this.receive(this.splitter.push(chunk)));
    input.on("end", () => this.receive(this.splitter.end()));
    input.on("error", () => undefined); // the process exit is what counts; see Session
  }

  set maxLineBytes(value: number) {
    this.options.maxLineBytes = value;
  }

  /**
   * Sends a request and routes its response (and its chunks and progress) to `handlers`.
   * Throws RpcError -32017 at once when the line would exceed the sidecar's limit.
   */
  call(method: string, params: unknown, handlers: CallHandlers): number {
    if (this.closedWith) throw this.closedWith;
    const id = this.options.nextId();
    const wireParams =
      handlers.onProgress && isRecord(params)
        ? { ...params, _meta: { ...(isRecord(params._meta) ? params._meta : {}), progressToken: id } }
        : params;
    const line = encodeMessage({ jsonrpc: "2.0", id, method, params: wireParams });
    this.checkSize(method, line);
    this.pending.set(id, { method, handlers });
    if (this.pending.size === 1) this.options.onBusyChange?.(true);
    this.writer.write(line);
    return id;
  }

  /** Promise form of `call`, with a timeout and an AbortSignal (both send `$/cancelRequest`). */
  request<M extends MethodName>(method: M, params: ParamsOf<M>, options: RequestOptions = {}): Promise<ResultOf<M>> {
    const { signal, timeoutMs, onProgress } = options;
    return new Promise<ResultOf<M>>((resolve, reject) => {
      if (signal?.aborted) {
        reject(abortError(signal, method));
        return;
      }
      let id: number | undefined;
      let timer: NodeJS.Timeout | undefined;
      const settle = (): void => {
        if (timer) clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      const giveUp = (error: unknown): void => {
        settle();
        if (id !== undefined) this.abandon(id, true);
        reject(error);
      };
      const onAbort = (): void => giveUp(abortError(signal!, method));
      try {
        id = this.call(method, params, {
          onResult: (result) => {
            settle();
            resolve(result as ResultOf<M>);
          },
          onError: (error) => {
            settle();
            reject(error);
          },
          onProgress,
        });
      } catch (error) {
        reject(error);
        return;
      }
      if (timeoutMs !== undefined && timeoutMs > 0) {
        timer = setTimeout(() => giveUp(new TimeoutError(method, timeoutMs)), timeoutMs);
      }
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  notify(method: string, params?: unknown): void {
    if (this.closedWith || this.writer.failed) return;
    const message = params === undefined ? { jsonrpc: "2.0", method } : { jsonrpc: "2.0", method, params };
    this.writer.write(encodeMessage(message));
  }

  /** Stops routing a call's messages; with `cancel`, asks the sidecar to stop it too. */
  abandon(id: number, cancel: boolean): void {
    if (!this.pending.has(id)) return;
    this.forget(id);
    this.abandoned.add(id);
    if (cancel) this.notify("$/cancelRequest", { id });
  }

  /** Asks the sidecar to cancel a call, which keeps being routed until its response. */
  cancel(id: number): void {
    if (this.pending.has(id)) this.notify("$/cancelRequest", { id });
  }

  /** End of input for the sidecar. */
  endInput(): void {
    this.writer.end();
  }

  /** Every pending call fails with `error`, and so does every later one. */
  close(error: Error): void {
    this.closedWith ??= error;
    const calls = [...this.pending.values()];
    this.pending.clear();
    this.abandoned.clear();
    if (calls.length > 0) this.options.onBusyChange?.(false);
    for (const call of calls) call.handlers.onError(error);
  }

  // ---- reading ------------------------------------------------------------------------

  private receive(frames: Frame[]): void {
    for (const frame of frames) {
      if (isOversized(frame)) {
        this.oversized(frame.head, frame.limit);
        continue;
      }
      let message: unknown;
      try {
        message = parseLine(frame);
      } catch {
        this.options.onWarning({ kind: "junk", message: "skipped a line that is not JSON", line: preview(frame) });
        continue;
      }
      if (Array.isArray(message)) {
        for (const item of message) this.dispatch(item, frame);
      } else {
        this.dispatch(message, frame);
      }
    }
  }

  private oversized(head: Buffer, limit: number): void {
    const id = peekId(head);
    this.options.onWarning({
      kind: "oversized",
      message: `skipped a line longer than maxMessageBytes (${limit} bytes)`,
      line: preview(head),
    });
    if (typeof id === "number" && this.pending.has(id)) {
      const call = this.pending.get(id)!;
      this.forget(id);
      call.handlers.onError(
        new RpcError(
          {
            code: ErrorCode.MessageTooLarge,
            message: `The response is longer than this client's maxMessageBytes (${limit} bytes)`,
            data: { limit, direction: "incoming" },
          },
          call.method,
        ),
      );
    }
  }

  private dispatch(message: unknown, line: Buffer): void {
    if (!isRecord(message) || message.jsonrpc !== "2.0") {
      this.options.onWarning({ kind: "junk", message: "skipped a line that is not a JSON-RPC 2.0 message", line: preview(line) });
      return;
    }
    if (typeof message.method === "string") {
      if ("id" in message) {
        this.options.onWarning({ kind: "unexpected", message: `ignored a request from the sidecar (${message.method})` });
      } else {
        this.notification(message.method, message.params);
      }
      return;
    }
    if ("id" in message && ("result" in message || "error" in message)) {
      this.response(message.id, message);
      return;
    }
    this.options.onWarning({ kind: "junk", message: "skipped a message that is neither a response nor a notification", line: preview(line) });
  }

  private notification(method: string, params: unknown): void {
    if (method === "generate/chunk" && isRecord(params)) {
      const call = this.route(params.requestId, "generate/chunk");
      if (call?.handlers.onChunk && typeof params.seq === "number" && isChunkBody(params)) {
        call.handlers.onChunk(params as unknown as GenerateChunkParams);
      }
      return;
    }
    if (method === "$/progress" && isRecord(params)) {
      this.route(params.token, "$/progress")?.handlers.onProgress?.(params as unknown as ProgressParams);
      return;
    }
    this.options.onNotification?.(method, params);
  }

  /** The pending call a notification belongs to (ids and tokens are our own numbers). */
  private route(id: unknown, what: string): Pending | undefined {
    if (typeof id === "number") {
      const call = this.pending.get(id);
      if (call !== undefined || this.abandoned.has(id)) return call;
    }
    this.options.onWarning({ kind: "unexpected", message: `${what} for unknown request ${JSON.stringify(id)}` });
    return undefined;
  }

  private response(id: unknown, message: Record<string, unknown>): void {
    const call = typeof id === "number" ? this.pending.get(id) : undefined;
    if (call === undefined) {
      if (typeof id === "number" && this.abandoned.delete(id)) return;
      const error = isRecord(message.error) ? `: ${String(message.error.message)}` : "";
      this.options.onWarning({ kind: "unexpected", message: `response for unknown request ${JSON.stringify(id)}${error}` });
      return;
    }
    this.forget(id as number);
    if ("error" in message) {
      const error = isRecord(message.error) ? (message.error as unknown as RpcErrorObject) : { code: ErrorCode.InternalError, message: String(message.error) };
      call.handlers.onError(new RpcError(error, call.method));
    } else {
      call.handlers.onResult(message.result);
    }
  }

  private forget(id: number): void {
    if (this.pending.delete(id) && this.pending.size === 0) this.options.onBusyChange?.(false);
  }

  private checkSize(method: string, line: string): void {
    const bytes = Buffer.byteLength(line) - 1;
    if (bytes > this.options.maxLineBytes) {
      throw new RpcError(
        {
          code: ErrorCode.MessageTooLarge,
          message: `Message too large: ${bytes} bytes; the sidecar accepts lines of at most ${this.options.maxLineBytes} bytes`,
          data: { limit: this.options.maxLineBytes, bytes, direction: "outgoing" },
        },
        method,
      );
    }
  }
}

/** A chunk's channels have their types: `text` and `reasoning` strings, `toolCalls` an array (each optional). */
function isChunkBody(params: Record<string, unknown>): boolean {
  const { text, reasoning, toolCalls } = params;
  return (
    (text === undefined || typeof text === "string") &&
    (reasoning === undefined || typeof reasoning === "string") &&
    (toolCalls === undefined || (Array.isArray(toolCalls) && toolCalls.every(isRecord)))
  );
}

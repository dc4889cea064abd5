/** Typed errors: every way a call can fail is a class with the facts a host needs to log it. */

import { ErrorCodes } from "./protocol";

/** JSON-RPC and localmlx error codes, by name: generated from the protocol schema (`$defs/ErrorCode`). */
export const ErrorCode = ErrorCodes;

export type ErrorCodeName = keyof typeof ErrorCode;
/** One of the codes. */
export type ErrorCode = (typeof ErrorCode)[ErrorCodeName];

/** Base class of every error this package throws. */
export class LocalMLXError extends Error {
  override name = "LocalMLXError";
}

/** The JSON-RPC error object as it came over the wire. */
export interface RpcErrorObject {
  code: number;
  message: string;
  data?: unknown;
}

/**
 * The sidecar answered a request with an error (or the client refused to send it, for -32017).
 * The wire's fields are kept as they came (`rawMessage`, `code`, `data`) beside the `method`;
 * `message` is the display text built from them by `RpcError.makeMessage`, the one place it is built.
 */
export class RpcError extends LocalMLXError {
  override name = "RpcError";
  readonly code: number;
  readonly data: Record<string, unknown>;
  /** The error's message as the sidecar sent it: no method, no code. */
  readonly rawMessage: string;

  constructor(
    error: RpcErrorObject,
    readonly method: string,
  ) {
    super(RpcError.makeMessage(error, method));
    this.code = error.code;
    this.rawMessage = String(error.message);
    this.data = isRecord(error.data) ? error.data : error.data === undefined ? {} : { detail: error.data };
  }

  /** The display message: `models/load: Model not found: x (-32010)`. */
  static makeMessage(error: RpcErrorObject, method: string): string {
    return `${method}: ${String(error.message)} (${error.code})`;
  }

  /** The symbolic name of `code` (`"ModelNotFound"`), when it is a known one. */
  get codeName(): ErrorCodeName | undefined {
    return (Object.keys(ErrorCode) as ErrorCodeName[]).find((name) => ErrorCode[name] === this.code);
  }

  /**
   * Worth retrying later: the model is still loading, or the queue is full. Not -32019
   * (`RankLost`): that sidecar is going away; the supervisor restarts it on the next call.
   */
  get retryable(): boolean {
    return this.code === ErrorCode.ModelLoading || this.code === ErrorCode.Busy;
  }
}

/** How the sidecar process ended. */
export interface ExitInfo {
  pid: number | undefined;
  code: number | null;
  signal: NodeJS.Signals | null;
  /** The last bytes (64 KiB by default) the sidecar wrote to stderr. */
  stderrTail: string;
}

function describeExit(info: ExitInfo): string {
  if (info.signal) return `killed by ${info.signal}`;
  return `exited with code ${info.code}`;
}

function lastLines(text: string, count: number): string {
  const lines = text.trimEnd().split("\n");
  return lines.slice(-count).join("\n");
}

/** The sidecar exited while requests were pending (or was never reachable). */
export class SidecarCrashError extends LocalMLXError implements ExitInfo {
  override name = "SidecarCrashError";
  readonly pid: number | undefined;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderrTail: string;

  constructor(info: ExitInfo, options?: { cause?: unknown }) {
    const tail = lastLines(info.stderrTail, 5);
    super(`localmlx sidecar (pid ${info.pid}) ${describeExit(info)}${tail ? `; stderr ends with:\n${tail}` : ""}`, options);
    this.pid = info.pid;
    this.code = info.code;
    this.signal = info.signal;
    this.stderrTail = info.stderrTail;
  }
}

/** One way of starting the sidecar (see `findSidecar`), and what became of it. */
export interface SidecarAttempt {
  label: string;
  command?: string;
  args?: readonly string[];
  /** "not set", "not found", or why it failed to start. */
  outcome: string;
}

/** The sidecar could not be started: no such Python, a failed `initialize`, a protocol mismatch. */
export class SidecarStartError extends LocalMLXError {
  override name = "SidecarStartError";

  /** The message without the stderr tail. */
  readonly summary: string;

  constructor(
    message: string,
    readonly details: {
      python: string;
      args: readonly string[];
      stderrTail: string;
      exit?: ExitInfo;
      /** Each way of starting the sidecar that was looked at, in order, and what became of it. */
      tried?: readonly SidecarAttempt[];
      /** Why it failed, without the command: "initialize failed: …", "cannot run …". */
      reason?: string;
      /**
       * What the sidecar said when it refused to start (its stderr lines `localmlx: <why>`: a bad
       * setting, a group that cannot form, naming the host), without the prefix; also in `reason`.
       */
      refusal?: string;
    },
    options?: { cause?: unknown },
  ) {
    const tail = lastLines(details.stderrTail, 5);
    super(`${message}${tail ? `; stderr ends with:\n${tail}` : ""}`, options);
    this.summary = message;
  }

  get stderrTail(): string {
    return this.details.stderrTail;
  }
}

/** The sidecar speaks another protocol version than this client. */
export class ProtocolVersionError extends SidecarStartError {
  override name = "ProtocolVersionError";
}

/** The sidecar crashed too often (the restart budget is spent), or restarts are off. */
export class SidecarUnavailableError extends LocalMLXError {
  override name = "SidecarUnavailableError";

  constructor(
    message: string,
    readonly lastCrash: SidecarCrashError | SidecarStartError | undefined,
  ) {
    super(message, { cause: lastCrash });
  }
}

/** A request did not finish within its timeout. For a generation, a cancel was sent. */
export class TimeoutError extends LocalMLXError {
  override name = "TimeoutError";

  constructor(
    readonly method: string,
    readonly timeoutMs: number,
  ) {
    super(`${method}: no response within ${timeoutMs} ms`);
  }
}

/** The client was closed before or while the call ran. */
export class ClientClosedError extends LocalMLXError {
  override name = "ClientClosedError";

  constructor(message = "The LocalMLX client is closed") {
    super(message);
  }
}

/**
 * What a call aborted by its `signal` rejects with (every call but `chat`/`generate`, whose
 * `result` resolves with finishReason "cancelled" instead). The signal's reason is `reason`
 * (and `cause`): by default a DOMException named "AbortError", or whatever `abort(reason)` got.
 */
export class AbortError extends LocalMLXError {
  override name = "AbortError";
  readonly reason: unknown;

  constructor(message = "The operation was aborted", options?: { cause?: unknown }) {
    super(message, options);
    this.reason = options?.cause;
  }
}

/** The AbortError for a call aborted by `signal`; its message names the method and a reason given. */
export function abortError(signal: AbortSignal, method?: string): AbortError {
  const reason: unknown = signal.reason;
  const isDefault = reason instanceof Error && reason.name === "AbortError";
  const why =
    reason instanceof Error && !isDefault ? `: ${reason.message}` : typeof reason === "string" && reason ? `: ${reason}` : "";
  return new AbortError(`${method ? `${method}: ` : ""}aborted${why}`, { cause: reason });
}

/**
 * The sidecar as a whole cannot serve (not installed, failed to start, crash budget spent,
 * closed, or a rank of its group was lost: -32019, after which it exits): the fallback then keeps
 * requests off it for a cool-down, and `LocalBackend` brings it back.
 */
export function isSidecarDown(error: unknown): boolean {
  return (
    error instanceof SidecarStartError ||
    error instanceof SidecarUnavailableError ||
    error instanceof SidecarCrashError ||
    error instanceof ClientClosedError ||
    (error instanceof RpcError && error.code === ErrorCode.RankLost)
  );
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * `LocalBackend`: the one owner of a running `LocalMLX` for whatever serves on it (the OpenAI
 * endpoint, the service, the Wooster plugin). It starts the client on first use (or holds one it
 * is given), brings the sidecar back after it failed as a whole, waits out a backoff after a failed
 * start, and stops or closes what it started. Inside the client, the `Supervisor` restarts a
 * crashed sidecar process; this is the layer above it.
 */
import { LocalMLX, type LocalMLXOptions } from "./client";
import { isSidecarDown, SidecarUnavailableError } from "./errors";
import { onHostIdle } from "./host-exit";
import { backoffMs, type Backoff } from "./retry";

/** Where the sidecar comes from: a running client, options to start one, or a factory. */
export type LocalSource = LocalMLX | LocalMLXOptions | (() => Promise<LocalMLX>);

export interface LocalBackendOptions {
  /**
   * After a start fails, `acquire()` rejects with that failure, without trying again, until this
   * backoff (by failures in a row) has passed. Default: none, the next `acquire()` tries again.
   */
  startRetry?: Backoff;
  /** Each client it starts, once it is ready. */
  onStart?: (client: LocalMLX) => void;
  /** Each start that failed (not the rejections while the backoff runs). */
  onStartFailure?: (error: unknown) => void;
  /** Stop what it started when the host's event loop drains (hosts that never close it, like Wooster). */
  stopWhenIdle?: boolean;
}

/**
 * Holds the one client. A client it started itself is closed by `close()`; a given one is not.
 * After the sidecar failed as a whole, the next `acquire()` brings it back: it starts a client
 * that never started, or `restart()`s one whose crash budget is spent.
 */
export class LocalBackend {
  private client: LocalMLX | undefined;
  private starting: Promise<LocalMLX> | undefined;
  private lastFailure: unknown;
  private startFailures = 0;
  private retryAt = 0;
  private closed = false;
  private readonly owned: boolean;
  private readonly stopHooks: Array<() => void | Promise<void>> = [];
  private readonly forgetIdle: (() => void) | undefined;

  constructor(
    private readonly source: LocalSource,
    private readonly options: LocalBackendOptions = {},
  ) {
    this.owned = !(source instanceof LocalMLX);
    if (source instanceof LocalMLX) this.client = source;
    this.forgetIdle = options.stopWhenIdle
      ? onHostIdle(() => {
          if (this.client || this.starting) void this.stop();
        })
      : undefined;
  }

  /** The client, started (or restarted after a failure) if need be. */
  acquire(): Promise<LocalMLX> {
    if (this.closed) return Promise.reject(new SidecarUnavailableError("The OpenAI endpoint is closed", undefined));
    if (this.starting) return this.starting;
    if (this.client && !(this.lastFailure instanceof SidecarUnavailableError)) return Promise.resolve(this.client);
    if (!this.client && this.startFailures > 0 && Date.now() < this.retryAt) return Promise.reject(this.lastFailure);
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

  /** Runs `hook` (before the client closes) when `stop()` or `close()` stops what this backend started. */
  onStop(hook: () => void | Promise<void>): void {
    this.stopHooks.push(hook);
  }

  private async bringUp(): Promise<LocalMLX> {
    if (this.client) {
      await this.client.restart();
      this.lastFailure = undefined;
      return this.client;
    }
    const source = this.source as Exclude<LocalSource, LocalMLX>;
    let client: LocalMLX;
    try {
      client = typeof source === "function" ? await source() : await LocalMLX.start(source);
    } catch (error) {
      this.lastFailure = error;
      this.startFailures++;
      this.retryAt = Date.now() + (this.options.startRetry ? backoffMs(this.options.startRetry, this.startFailures) : 0);
      this.options.onStartFailure?.(error);
      throw error;
    }
    if (this.closed) {
      if (this.owned) await client.close();
      throw new SidecarUnavailableError("The OpenAI endpoint is closed", undefined);
    }
    this.client = client;
    this.lastFailure = undefined;
    this.startFailures = 0;
    this.options.onStart?.(client);
    return client;
  }

  /**
   * Stops the client this backend started, after its `onStop` hooks; the next `acquire()` starts
   * a new one. A given client stays open.
   */
  async stop(): Promise<void> {
    const client = this.client ?? (await this.starting?.catch(() => undefined));
    for (const hook of this.stopHooks.splice(0)) await Promise.resolve(hook()).catch(() => undefined);
    if (!this.owned) return;
    this.client = undefined;
    this.lastFailure = undefined;
    this.startFailures = 0;
    if (client) await client.close();
  }

  /** Closes a client this backend started (a given one stays open); `acquire()` rejects from now on. */
  async close(): Promise<void> {
    this.closed = true;
    this.forgetIdle?.();
    await this.stop();
  }
}

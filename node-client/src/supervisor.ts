/**
 * Keeps one sidecar session available: starts it, notices when it dies, restarts it on the next
 * use (with backoff and a crash budget), and closes it for good.
 */
import {
  ClientClosedError,
  SidecarCrashError,
  SidecarStartError,
  SidecarUnavailableError,
  type SidecarAttempt,
} from "./errors";
import type { SidecarCandidate } from "./process";
import { backoffMs, sleep } from "./retry";
import { Session, type CloseResult, type SessionEnd, type SessionOptions, type StopTimeouts } from "./session";

export interface RestartPolicy {
  /** Give up after this many crashes within `windowMs`. Default 5. */
  maxCrashes: number;
  /** Default 180000 (3 minutes). */
  windowMs: number;
  /** Delay before the first restart; doubles with each recent crash. Default 250. */
  initialDelayMs: number;
  /** Default 10000. */
  maxDelayMs: number;
}

export const DEFAULT_RESTART_POLICY: RestartPolicy = {
  maxCrashes: 5,
  windowMs: 180_000,
  initialDelayMs: 250,
  maxDelayMs: 10_000,
};

export interface SupervisorHooks {
  /** After a restart's `initialize`: bring the sidecar back to where it was (reload models). */
  restore(session: Session): Promise<void>;
  onSpawn(session: Session): void;
  onEnd(session: Session, end: SessionEnd): void;
  onCrash(error: SidecarCrashError | SidecarStartError): void;
  onUnavailable(error: SidecarUnavailableError): void;
}

export class Supervisor {
  private session: Session | undefined;
  private opening: Promise<Session> | undefined;
  private crashTimes: number[] = [];
  private unavailable: SidecarUnavailableError | undefined;
  private closing: Promise<CloseResult> | undefined;
  /** Aborted by `close()`: a restart waiting out its backoff stops waiting. */
  private readonly closed = new AbortController();
  /** How many sessions were started (1 = the first one). */
  starts = 0;
  /** The way of starting the sidecar that worked first; restarts use it. */
  chosen: SidecarCandidate | undefined;

  /**
   * `candidates` (from `findSidecar`) are tried in order at the first start, until one answers
   * `initialize`; without them, `sessionOptions.spawn` is the one way.
   */
  constructor(
    private readonly sessionOptions: SessionOptions,
    private readonly policy: RestartPolicy | false,
    private readonly hooks: SupervisorHooks,
    private readonly candidates?: readonly SidecarCandidate[],
  ) {}

  get current(): Session | undefined {
    return this.session?.alive ? this.session : undefined;
  }

  /** The first start: failures are thrown as they are, with no retry. */
  async start(): Promise<Session> {
    this.opening = this.open();
    try {
      return await this.opening;
    } finally {
      this.opening = undefined;
    }
  }

  /** A ready session: the current one, or a restarted one when it died. */
  acquire(): Promise<Session> {
    if (this.closing) return Promise.reject(new ClientClosedError());
    if (this.unavailable) return Promise.reject(this.unavailable);
    if (this.session?.alive) return Promise.resolve(this.session);
    this.opening ??= this.restart().finally(() => {
      this.opening = undefined;
    });
    return this.opening;
  }

  /** Restarts now, resetting the crash budget (also after the client gave up). */
  async restartNow(timeouts: StopTimeouts): Promise<Session> {
    if (this.closing) throw new ClientClosedError();
    await this.opening?.catch(() => undefined);
    this.crashTimes = [];
    this.unavailable = undefined;
    const previous = this.session;
    if (previous?.alive) await previous.stop(timeouts);
    return this.acquire();
  }

  close(timeouts: StopTimeouts): Promise<CloseResult> {
    this.closed.abort();
    this.closing ??= (async () => {
      await this.opening?.catch(() => undefined);
      const session = this.session;
      if (!session) return { stage: "already-exited", code: null, signal: null, exited: true } as CloseResult;
      return session.stop(timeouts);
    })();
    return this.closing;
  }

  private async restart(): Promise<Session> {
    await sleep(this.restartDelayMs(), this.closed.signal);
    if (this.closing) throw new ClientClosedError();
    let session: Session;
    try {
      session = await this.open();
    } catch (error) {
      if (error instanceof SidecarStartError) this.recordCrash(error);
      throw error;
    }
    await this.hooks.restore(session);
    return session;
  }

  private async open(): Promise<Session> {
    const session = this.chosen || !this.candidates ? await Session.open(this.optionsFor(this.chosen)) : await this.openFirst(this.candidates);
    this.starts++;
    if (this.closing) {
      await session.stop({ gracefulMs: 2000, terminateMs: 2000, killMs: 2000 });
      throw new ClientClosedError();
    }
    this.session = session;
    this.hooks.onSpawn(session);
    void session.ended.then((end) => {
      this.hooks.onEnd(session, end);
      if (!end.expected && end.error instanceof SidecarCrashError) this.recordCrash(end.error);
    });
    return session;
  }

  private optionsFor(candidate: SidecarCandidate | undefined): SessionOptions {
    if (!candidate?.command) return this.sessionOptions;
    const { spawn } = this.sessionOptions;
    return { ...this.sessionOptions, spawn: { ...spawn, python: candidate.command, args: candidate.args ?? spawn.args, cwd: candidate.cwd } };
  }

  /** The first start: each candidate that is there, in order, until one answers `initialize`. */
  private async openFirst(candidates: readonly SidecarCandidate[]): Promise<Session> {
    const tried: SidecarAttempt[] = [];
    let last: SidecarStartError | undefined;
    for (const candidate of candidates) {
      if (!candidate.command) {
        tried.push({ label: candidate.label, outcome: candidate.skipped ?? "not there" });
        continue;
      }
      if (this.closing) throw new ClientClosedError();
      try {
        const session = await Session.open(this.optionsFor(candidate));
        this.chosen = candidate;
        return session;
      } catch (error) {
        if (!(error instanceof SidecarStartError)) throw error;
        // This one is the sidecar, and it refused its settings (or its group): another install
        // would refuse them too, and "install it" would mislead. Its own words go to the host.
        if (error.details.refusal) throw error;
        last = error;
        tried.push({ label: candidate.label, command: candidate.command, args: candidate.args, outcome: startFailure(error) });
      }
    }
    // A Python the host named is the only candidate: its error says all there is.
    if (last && candidates.length === 1) throw last;
    const list = tried.map((attempt) => `  - ${attempt.label}${attempt.command ? ` (${[attempt.command, ...(attempt.args ?? [])].join(" ")})` : ""}: ${attempt.outcome}`);
    throw new SidecarStartError(
      "Cannot start the localmlx sidecar: install it with `npx @localmlx/client setup` (a private virtualenv), " +
        "or `pip install` localmlx into your Python environment (its `localmlx` command on PATH), " +
        `or point LOCALMLX_PYTHON (or the \`python\` option) at a Python that has it. Tried, in order:\n${list.join("\n")}`,
      {
        python: last?.details.python ?? "",
        args: last?.details.args ?? [],
        stderrTail: last?.stderrTail ?? "",
        ...(last?.details.exit ? { exit: last.details.exit } : {}),
        tried,
      },
      { cause: last },
    );
  }

  /** Wait before the next start: 0 without recent crashes, else the backoff for them, counted from the last. */
  private restartDelayMs(): number {
    if (!this.policy || this.crashTimes.length === 0) return 0;
    const delay = backoffMs({ initialMs: this.policy.initialDelayMs, maxMs: this.policy.maxDelayMs }, this.crashTimes.length);
    return Math.max(0, this.crashTimes[this.crashTimes.length - 1]! + delay - Date.now());
  }

  private recordCrash(error: SidecarCrashError | SidecarStartError): void {
    const now = Date.now();
    this.hooks.onCrash(error);
    if (this.closing || this.unavailable) return;
    if (!this.policy) {
      this.giveUp(new SidecarUnavailableError("The sidecar stopped and restarts are off", error));
      return;
    }
    const { maxCrashes, windowMs } = this.policy;
    this.crashTimes = [...this.crashTimes.filter((time) => now - time < windowMs), now];
    if (this.crashTimes.length >= maxCrashes) {
      this.giveUp(
        new SidecarUnavailableError(
          `The sidecar crashed ${this.crashTimes.length} times within ${Math.round(windowMs / 1000)} s; not restarting it ` +
            "(call restart() to try again)",
          error,
        ),
      );
    }
  }

  private giveUp(error: SidecarUnavailableError): void {
    this.unavailable = error;
    this.hooks.onUnavailable(error);
  }
}

/** Why a start failed, in one line: the reason and the last line of stderr. */
function startFailure(error: SidecarStartError): string {
  const reason = error.details.reason ?? error.summary;
  const lastLine = error.stderrTail.trimEnd().split("\n").pop()?.trim();
  return lastLine && !reason.includes(lastLine) ? `${reason} (${lastLine})` : reason;
}

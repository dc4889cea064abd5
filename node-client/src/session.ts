/**
 * One run of the sidecar: the process, its connection, the `initialize` handshake, and the
 * way it ends (a crash fails every pending call at once; `stop` escalates shutdown -> EOF ->
 * SIGTERM -> SIGKILL).
 */
import { Connection, type WireWarning } from "./connection";
import { ClientClosedError, ProtocolVersionError, SidecarCrashError, SidecarStartError, type ExitInfo } from "./errors";
import { SidecarProcess, type SpawnSpec } from "./process";
import { PROTOCOL_VERSION, type InitializeParams, type InitializeResult } from "./protocol";

export interface SessionOptions {
  spawn: SpawnSpec;
  clientInfo: NonNullable<InitializeParams["clientInfo"]>;
  startTimeoutMs: number;
  maxMessageBytes: number;
  keepAlive: boolean;
  nextId(): number;
  onWarning(warning: WireWarning): void;
  onNotification?(method: string, params: unknown): void;
}

export interface StopTimeouts {
  /** For `shutdown` and the exit that follows it (or the exit after EOF). Default 5000. */
  gracefulMs: number;
  /** After SIGTERM. Default 3000. */
  terminateMs: number;
  /** After SIGKILL. Default 3000. */
  killMs: number;
}

/** How `close()` ended the sidecar. */
export interface CloseResult {
  /** The last step that was needed: the `shutdown` request, EOF on stdin, SIGTERM or SIGKILL. */
  stage: "shutdown" | "eof" | "SIGTERM" | "SIGKILL" | "already-exited";
  code: number | null;
  signal: NodeJS.Signals | null;
  /** False only if the process survived SIGKILL for `killMs` (it should never happen). */
  exited: boolean;
}

export interface SessionEnd {
  info: ExitInfo;
  /** What pending calls failed with: a crash, or ClientClosedError when the exit was asked for. */
  error: Error;
  expected: boolean;
}

export class Session {
  readonly process: SidecarProcess;
  readonly connection: Connection;
  readonly ended: Promise<SessionEnd>;
  info: InitializeResult | undefined;
  private stopping = false;

  private constructor(private readonly options: SessionOptions) {
    this.process = new SidecarProcess(options.spawn);
    this.connection = new Connection(this.process.child.stdout!, this.process.child.stdin!, {
      maxMessageBytes: options.maxMessageBytes,
      maxLineBytes: 16 * 1024 * 1024,
      nextId: options.nextId,
      onWarning: options.onWarning,
      onNotification: options.onNotification,
      onBusyChange: (busy) => this.updateRef(busy),
      // Writing failed (EPIPE): this sidecar is unusable; its exit fails what is pending.
      onWriteError: () => {
        this.process.kill("SIGKILL");
      },
    });
    this.updateRef(false);
    this.ended = this.process.exited.then((info) => {
      const expected = this.stopping;
      const error = expected
        ? new ClientClosedError("The LocalMLX client closed while the request was pending")
        : new SidecarCrashError(info, { cause: this.process.spawnError });
      this.connection.close(error);
      return { info, error, expected };
    });
  }

  /** Spawns the sidecar and performs `initialize`; on failure nothing is left running. */
  static async open(options: SessionOptions): Promise<Session> {
    const session = new Session(options);
    const { spawn } = options;
    const details = (): SidecarStartError["details"] => ({
      python: spawn.python,
      args: spawn.args,
      stderrTail: session.process.stderrTail,
    });
    let result: InitializeResult;
    try {
      result = await session.connection.request(
        "initialize",
        { protocolVersion: PROTOCOL_VERSION, clientInfo: options.clientInfo, capabilities: {} },
        { timeoutMs: options.startTimeoutMs },
      );
    } catch (error) {
      await session.kill();
      const exit = await session.process.exited;
      const refusal = error instanceof SidecarCrashError ? refusalOf(exit.stderrTail) : undefined;
      const reason = session.process.spawnError
        ? `cannot run ${spawn.python}: ${session.process.spawnError.message}`
        : error instanceof SidecarCrashError
          ? `the sidecar ${exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`} before answering initialize${refusal ? `: ${refusal}` : ""}`
          : `initialize failed: ${(error as Error).message}`;
      throw new SidecarStartError(
        `Cannot start the localmlx sidecar (${spawn.python} ${spawn.args.join(" ")}): ${reason}`,
        { ...details(), exit, reason, ...(refusal ? { refusal } : {}) },
        { cause: error },
      );
    }
    if (result.protocolVersion !== PROTOCOL_VERSION) {
      await session.stop({ gracefulMs: 2000, terminateMs: 2000, killMs: 2000 });
      throw new ProtocolVersionError(
        `The sidecar speaks protocol version ${String(result.protocolVersion)}; this client speaks ${PROTOCOL_VERSION}`,
        details(),
      );
    }
    session.info = result;
    session.connection.maxLineBytes = result.limits.maxLineBytes;
    return session;
  }

  get pid(): number | undefined {
    return this.process.pid;
  }

  get alive(): boolean {
    return !this.process.hasExited && !this.stopping;
  }

  /** Ends the sidecar: `shutdown` + `exit` + EOF, then SIGTERM, then SIGKILL, each with a timeout. */
  async stop(timeouts: StopTimeouts): Promise<CloseResult> {
    if (this.process.hasExited) {
      const info = await this.process.exited;
      return { stage: "already-exited", code: info.code, signal: info.signal, exited: true };
    }
    this.stopping = true;
    this.updateRef(true); // the host must not exit halfway through closing
    const deadline = Date.now() + timeouts.gracefulMs;
    let stage: CloseResult["stage"] = "eof";
    if (this.info) {
      try {
        await this.connection.request("shutdown", {}, { timeoutMs: timeouts.gracefulMs });
        this.connection.notify("exit");
        stage = "shutdown";
      } catch {
        // a wedged or dying sidecar: EOF and signals follow
      }
    }
    this.connection.endInput();
    let exited = await this.process.waitForExit(Math.max(0, deadline - Date.now()));
    if (!exited) {
      stage = "SIGTERM";
      this.process.kill("SIGTERM");
      exited = await this.process.waitForExit(timeouts.terminateMs);
    }
    if (!exited) {
      stage = "SIGKILL";
      this.process.kill("SIGKILL");
      exited = await this.process.waitForExit(timeouts.killMs);
    }
    if (exited) await this.ended;
    const info = exited ? await this.process.exited : undefined;
    return { stage, code: info?.code ?? null, signal: info?.signal ?? null, exited };
  }

  /** Immediate SIGKILL, for a sidecar that failed to start; resolves once it has exited. */
  private async kill(): Promise<void> {
    this.stopping = true;
    this.process.kill("SIGKILL");
    await this.process.exited;
  }

  private updateRef(busy: boolean): void {
    this.process.setRef(busy || this.stopping || this.options.keepAlive);
  }
}

/** Lines of this many, at most, make a refusal. */
const REFUSAL_LINES = 5;

/**
 * Why the sidecar refused to start, in its own words: the stderr lines it writes as
 * `localmlx: <why>` just before it exits (a setting it cannot read, a group that cannot form,
 * naming the host), the last few joined by "; ". Undefined when it wrote none.
 */
export function refusalOf(stderrTail: string): string | undefined {
  const lines = stderrTail
    .split("\n")
    .filter((line) => line.startsWith("localmlx: "))
    .map((line) => line.slice("localmlx: ".length).trim())
    .filter(Boolean);
  return lines.length > 0 ? lines.slice(-REFUSAL_LINES).join("; ") : undefined;
}

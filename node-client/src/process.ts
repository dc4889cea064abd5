/**
 * The sidecar as a child process: which Python runs it, spawning with three pipes, draining
 * stderr (lines to a callback, the tail kept for error reports), exit detection, signals,
 * and keeping the host's event loop alive only while there is work.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { ByteTail, isOversized, LineSplitter } from "./framing";
import type { ExitInfo } from "./errors";

/** The package root: `dist/` and `src/` both sit one level below it. */
export const packageRoot = resolve(__dirname, "..");

/** The repository around the package, when the package is used from a checkout. */
const repositoryRoot = resolve(packageRoot, "..");

export const DEFAULT_SIDECAR_ARGS: readonly string[] = ["-m", "sidecar", "serve"];

/**
 * The Python that runs the sidecar: the option, then `LOCALMLX_PYTHON`, then the project's
 * environment (`../.venv` beside this package), then `python3` from PATH.
 */
export function resolvePython(option?: string, env: NodeJS.ProcessEnv = process.env): string {
  const given = option || env.LOCALMLX_PYTHON;
  // A relative path means "from where the host runs", not from the sidecar's working directory.
  if (given) return given.includes("/") || given.includes("\\") ? resolve(given) : given;
  const venv =
    process.platform === "win32"
      ? join(repositoryRoot, ".venv", "Scripts", "python.exe")
      : join(repositoryRoot, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

/**
 * The working directory for `python -m sidecar`: the checkout, when the package lives in one
 * (so that `sidecar` resolves to it, never to a same-named folder of the host's cwd).
 */
export function defaultSidecarCwd(): string | undefined {
  return existsSync(join(repositoryRoot, "sidecar", "__main__.py")) ? repositoryRoot : undefined;
}

export interface SpawnSpec {
  python: string;
  args: readonly string[];
  cwd?: string | undefined;
  env?: Record<string, string | undefined> | undefined;
  stderrTailBytes: number;
  onStderrLine?: ((line: string) => void) | undefined;
}

/** Live sidecars of this process, signalled if the host exits without closing them. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // The sidecar also exits on its own when our end of its stdin closes (that is what covers
  // SIGKILL of the host); this covers a sidecar too busy or wedged to notice.
  process.once("exit", () => {
    for (const child of live) child.kill("SIGTERM");
  });
}

const STDERR_LINE_BYTES = 64 * 1024;
const STDIO_DRAIN_GRACE_MS = 250;
const STDERR_GRACE_MS = 20;

export class SidecarProcess {
  readonly child: ChildProcess;
  /** Resolves once the process has exited and its output has been read; never rejects. */
  readonly exited: Promise<ExitInfo>;
  private readonly tail: ByteTail;
  private exitInfo: ExitInfo | undefined;
  spawnError: Error | undefined;

  constructor(readonly spec: SpawnSpec) {
    this.tail = new ByteTail(spec.stderrTailBytes);
    this.child = spawn(spec.python, [...spec.args], {
      cwd: spec.cwd,
      env: { ...process.env, ...spec.env },
      stdio: ["pipe", "pipe", "pipe"],
      windowsHide: true,
    });
    installExitHook();
    if (this.child.pid !== undefined) live.add(this.child);
    this.drainStderr();
    this.exited = new Promise<ExitInfo>((resolveExit) => {
      const finish = (code: number | null, signal: NodeJS.Signals | null): void => {
        if (this.exitInfo) return;
        live.delete(this.child);
        this.exitInfo = { pid: this.child.pid, code, signal, stderrTail: this.tail.toString() };
        // Let go of pipes another process may still hold (see below): they would keep the host
        // alive, and a process still reading our end of stdin gets EOF and ends.
        for (const stream of [this.child.stdin, this.child.stdout, this.child.stderr]) stream?.destroy();
        resolveExit(this.exitInfo);
      };
      this.child.once("error", (error) => {
        if (this.child.pid === undefined) {
          this.spawnError = error;
          finish(null, null);
        }
      });
      this.child.once("exit", (code, signal) => {
        // Pending calls fail when this resolves, so it must come fast. Let the last stdout bytes
        // (responses, chunks) and stderr lines arrive first: normally every pipe closes with the
        // process, and "close" follows within milliseconds. But any child of the sidecar inherits
        // stderr (its fd 1 and 2 both point there), and may hold it open long after a kill -9:
        // once the wire (stdout) has closed, stderr gets only a short grace. A pipe still open
        // after the longer grace (the wire held by a wrapper's child) is not waited for either.
        const timers: NodeJS.Timeout[] = [];
        const done = (): void => {
          for (const timer of timers) clearTimeout(timer);
          finish(code, signal);
        };
        timers.push(setTimeout(done, STDIO_DRAIN_GRACE_MS));
        this.child.once("close", done);
        const stdout = this.child.stdout!;
        const wireClosed = (): void => {
          if (!this.exitInfo) timers.push(setTimeout(done, STDERR_GRACE_MS));
        };
        if (stdout.closed) wireClosed();
        else stdout.once("close", wireClosed);
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get hasExited(): boolean {
    return this.exitInfo !== undefined;
  }

  get stderrTail(): string {
    return this.tail.toString();
  }

  /** Sends a signal unless the process is gone; true when it was sent. */
  kill(signal: NodeJS.Signals): boolean {
    if (this.hasExited || this.child.exitCode !== null || this.child.signalCode !== null) return false;
    try {
      return this.child.kill(signal);
    } catch {
      return false;
    }
  }

  /** Resolves true when the process exits within `ms`, false otherwise. */
  async waitForExit(ms: number): Promise<boolean> {
    if (this.hasExited) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolveTimeout) => {
      timer = setTimeout(() => resolveTimeout(false), ms);
    });
    const exited = this.exited.then(() => true as const);
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Whether the child (and its pipes) keep the host's event loop alive. */
  setRef(on: boolean): void {
    const handles = [this.child, this.child.stdin, this.child.stdout, this.child.stderr] as Array<
      { ref?: () => void; unref?: () => void } | null
    >;
    for (const handle of handles) {
      if (on) handle?.ref?.();
      else handle?.unref?.();
    }
  }

  private drainStderr(): void {
    const stderr = this.child.stderr!;
    const lines = new LineSplitter(STDERR_LINE_BYTES);
    const forward = (frames: ReturnType<LineSplitter["push"]>): void => {
      const onLine = this.spec.onStderrLine;
      if (!onLine) return;
      for (const frame of frames) {
        onLine(isOversized(frame) ? `${frame.head.toString("utf8")}… [line truncated]` : frame.toString("utf8"));
      }
    };
    stderr.on("data", (chunk: Buffer) => {
      this.tail.push(chunk);
      forward(lines.push(chunk));
    });
    stderr.on("end", () => forward(lines.end()));
    stderr.on("error", () => undefined);
  }
}

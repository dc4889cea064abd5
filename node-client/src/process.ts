/**
 * The sidecar as a child process: which program runs it (`findSidecar`), spawning with three pipes, draining
 * stderr (lines to a callback, the tail kept for error reports), exit detection, signals,
 * and keeping the host's event loop alive only while there is work.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants, existsSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { delimiter, join, resolve } from "node:path";
import { ByteTail, isOversized, LineSplitter } from "./framing";
import { onHostExit } from "./host-exit";
import type { ExitInfo } from "./errors";
import { readSetting, type SettingsEnv } from "./settings";

/** The package root: `dist/` and `src/` both sit one level below it. */
export const packageRoot = resolve(__dirname, "..");

/** The repository around the package, when the package is used from a checkout. */
const repositoryRoot = resolve(packageRoot, "..");

/** `python -m sidecar serve`, for a Python whose working directory is the localmlx checkout. */
export const DEFAULT_SIDECAR_ARGS: readonly string[] = ["-m", "sidecar", "serve"];
/**
 * `python -P -m sidecar serve`: `-P` (Python 3.11+, which the sidecar needs anyway) keeps the
 * working directory off `sys.path`, so a `sidecar/` folder in the host's cwd cannot stand in for ours.
 */
export const ISOLATED_SIDECAR_ARGS: readonly string[] = ["-P", "-m", "sidecar", "serve"];
/** The arguments of the `localmlx` entry point (a script never puts the cwd on `sys.path`). */
export const ENTRY_POINT_ARGS: readonly string[] = ["serve"];

const isWindows = process.platform === "win32";

/** The localmlx checkout this package lives in, if it lives in one. */
function checkoutRoot(): string | undefined {
  return existsSync(join(repositoryRoot, "sidecar", "__main__.py")) ? repositoryRoot : undefined;
}

function venvPython(venv: string): string {
  return isWindows ? join(venv, "Scripts", "python.exe") : join(venv, "bin", "python");
}

/** Absolute path of a relative path given by the host (relative to where the host runs). */
function fromHost(path: string): string {
  return path.includes("/") || path.includes("\\") ? resolve(path) : path;
}

/**
 * The private virtualenv that `npx @localmlx/client setup` creates: `LOCALMLX_VENV`, else
 * `$XDG_DATA_HOME/localmlx/venv` (default `~/.local/share/localmlx/venv`; on Windows
 * `%LOCALAPPDATA%\localmlx\venv`).
 */
export function privateVenvDir(env: SettingsEnv = process.env): string {
  const venv = readSetting(env, "venv");
  if (venv) return resolve(venv);
  const home = env.HOME || env.USERPROFILE || homedir();
  if (isWindows) return join(env.LOCALAPPDATA || join(home, "AppData", "Local"), "localmlx", "venv");
  return join(env.XDG_DATA_HOME || join(home, ".local", "share"), "localmlx", "venv");
}

/** The first executable called `name` on `PATH`, if any. */
export function findOnPath(name: string, env: Record<string, string | undefined> = process.env): string | undefined {
  const path = env.PATH ?? env.Path ?? "";
  const extensions = isWindows ? (env.PATHEXT ?? ".EXE;.CMD;.BAT").split(";").filter(Boolean) : [""];
  for (const dir of path.split(delimiter)) {
    if (!dir) continue;
    for (const extension of extensions) {
      const file = join(dir, name + extension);
      try {
        if (statSync(file).isFile()) {
          if (!isWindows) accessSync(file, constants.X_OK);
          return file;
        }
      } catch {
        // not here, or not executable
      }
    }
  }
  return undefined;
}

/** Where a way of starting the sidecar comes from, in the order they are tried. */
export type SidecarSource = "option" | "LOCALMLX_PYTHON" | "PATH" | "private-venv" | "checkout" | "python3";

/** One way of starting the sidecar, and whether it is there to try. */
export interface SidecarCandidate {
  source: SidecarSource;
  /** What it is, for messages: "LOCALMLX_PYTHON", "the `localmlx` entry point on PATH", … */
  label: string;
  /** The program to run: a Python, or the `localmlx` entry point. Absent when skipped. */
  command?: string;
  args?: readonly string[];
  cwd?: string | undefined;
  /** Why this one is not tried ("not set", "not found: …"); absent when it is. */
  skipped?: string;
}

export interface FindSidecarOptions {
  /** A Python to run the sidecar with; when given, the only candidate. */
  python?: string | undefined;
  /** Replaces the default arguments of whichever program is found. */
  args?: readonly string[] | undefined;
  /** The sidecar's working directory. */
  cwd?: string | undefined;
  /** The environment to look in (`LOCALMLX_PYTHON`, `LOCALMLX_VENV`, `PATH`, `HOME`). Default `process.env`. */
  env?: Record<string, string | undefined> | undefined;
}

/**
 * Every way of starting the sidecar, in the order the client tries them: the `python` option,
 * then `LOCALMLX_PYTHON` (either one, when given, is the only candidate), then the `localmlx`
 * entry point on `PATH` (`localmlx serve`), then the private virtualenv of
 * `npx @localmlx/client setup`, then the checkout's `.venv` when this package lives in a localmlx
 * checkout, then `python3` on `PATH`. Candidates that are not there carry `skipped`.
 *
 * A Python runs `-P -m sidecar serve` (the host's cwd stays off `sys.path`), or
 * `-m sidecar serve` when its working directory is the checkout itself.
 */
export function findSidecar(options: FindSidecarOptions = {}): SidecarCandidate[] {
  const env = options.env ?? process.env;
  const checkout = checkoutRoot();
  const inCheckout = options.cwd ?? checkout;
  const python = (source: SidecarSource, label: string, command: string, cwd: string | undefined): SidecarCandidate => ({
    source,
    label,
    command,
    args: options.args ?? (cwd !== undefined && cwd === checkout ? DEFAULT_SIDECAR_ARGS : ISOLATED_SIDECAR_ARGS),
    cwd,
  });
  if (options.python) return [python("option", "the `python` option", fromHost(options.python), inCheckout)];
  const fromEnv = readSetting(env, "python");
  if (fromEnv) return [python("LOCALMLX_PYTHON", "LOCALMLX_PYTHON", fromHost(fromEnv), inCheckout)];

  const candidates: SidecarCandidate[] = [
    { source: "option", label: "the `python` option", skipped: "not given" },
    { source: "LOCALMLX_PYTHON", label: "LOCALMLX_PYTHON", skipped: "not set" },
  ];
  const entryPoint = findOnPath("localmlx", env);
  const onPath = "the `localmlx` entry point on PATH";
  candidates.push(
    entryPoint
      ? { source: "PATH", label: onPath, command: entryPoint, args: options.args ?? ENTRY_POINT_ARGS, cwd: options.cwd }
      : { source: "PATH", label: onPath, skipped: "not found" },
  );
  const venv = privateVenvDir(env);
  const privateLabel = `the private virtualenv ${venv}`;
  candidates.push(
    existsSync(venvPython(venv))
      ? python("private-venv", privateLabel, venvPython(venv), options.cwd)
      : { source: "private-venv", label: privateLabel, skipped: "not there (create it with `npx @localmlx/client setup`)" },
  );
  const checkoutLabel = "the checkout's .venv";
  if (!checkout) {
    candidates.push({ source: "checkout", label: checkoutLabel, skipped: "this package is not inside a localmlx checkout" });
  } else if (!existsSync(venvPython(join(checkout, ".venv")))) {
    candidates.push({ source: "checkout", label: `${checkoutLabel} (${join(checkout, ".venv")})`, skipped: "not there (run scripts/setup.sh)" });
  } else {
    candidates.push(python("checkout", `${checkoutLabel} (${join(checkout, ".venv")})`, venvPython(join(checkout, ".venv")), inCheckout));
  }
  const python3 = isWindows ? "python" : "python3";
  const found = findOnPath(python3, env);
  candidates.push(
    found
      ? python("python3", `${python3} on PATH`, found, inCheckout)
      : { source: "python3", label: `${python3} on PATH`, skipped: "not found" },
  );
  return candidates;
}

/**
 * The Python interpreter the client would use for `python -m sidecar`: the option, then
 * `LOCALMLX_PYTHON`, then the private virtualenv, then the checkout's `.venv`, then `python3`.
 * (`findSidecar()` is the whole search, the `localmlx` entry point included.)
 */
export function resolvePython(option?: string, env: SettingsEnv = process.env): string {
  const given = option || readSetting(env, "python");
  // A relative path means "from where the host runs", not from the sidecar's working directory.
  if (given) return fromHost(given);
  for (const venv of [privateVenvDir(env), ...(checkoutRoot() ? [join(checkoutRoot()!, ".venv")] : [])]) {
    if (existsSync(venvPython(venv))) return venvPython(venv);
  }
  return isWindows ? "python" : "python3";
}

/**
 * The working directory for `python -m sidecar`: the checkout, when the package lives in one
 * (so that `sidecar` resolves to it, never to a same-named folder of the host's cwd).
 */
export function defaultSidecarCwd(): string | undefined {
  return checkoutRoot();
}

/** One structured line of the sidecar's log (`LOCALMLX_LOG_FORMAT=json`, which the client sets). */
export interface SidecarLogRecord {
  /** ISO 8601. */
  time: string;
  /** Python's level name: DEBUG, INFO, WARNING, ERROR, CRITICAL. */
  level: string;
  /** The Python logger, e.g. `localmlx.session`. */
  logger: string;
  message: string;
  /** A logged exception's traceback. */
  exception?: string;
  stack?: string;
}

/** The record of a JSON log line; undefined for any other line (a traceback, a library's print). */
export function parseLogLine(line: string): SidecarLogRecord | undefined {
  if (!line.startsWith("{")) return undefined;
  try {
    const value: unknown = JSON.parse(line);
    if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
    const record = value as Record<string, unknown>;
    if (typeof record.level !== "string" || typeof record.message !== "string") return undefined;
    return {
      ...record,
      time: typeof record.time === "string" ? record.time : "",
      logger: typeof record.logger === "string" ? record.logger : "",
    } as SidecarLogRecord;
  } catch {
    return undefined;
  }
}

/** A log record as one readable text (its traceback on the lines after). */
export function formatLogRecord(record: SidecarLogRecord, show: { time?: boolean; level?: boolean } = {}): string {
  const time = show.time !== false && record.time ? `${record.time} ` : "";
  const level = show.level !== false ? `${record.level} ` : "";
  const head = `${time}${level}${record.logger ? `${record.logger}: ` : ""}${record.message}`;
  return [head, record.exception, record.stack].filter(Boolean).join("\n");
}

/** Structured lines made readable again, for error reports; other lines as they are. */
function readableLog(text: string): string {
  if (!text.includes("{")) return text;
  return text
    .split("\n")
    .map((line) => {
      const record = parseLogLine(line);
      return record ? formatLogRecord(record) : line;
    })
    .join("\n");
}

export interface SpawnSpec {
  /** The program: a Python, or the `localmlx` entry point. */
  python: string;
  args: readonly string[];
  cwd?: string | undefined;
  env?: Record<string, string | undefined> | undefined;
  stderrTailBytes: number;
  /** Each line of stderr as written, and its record when it is a structured log line. */
  onStderrLine?: ((line: string, record: SidecarLogRecord | undefined) => void) | undefined;
}

/** Live sidecars of this process, signalled if the host exits without closing them. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // The sidecar also exits on its own when our end of its stdin closes (that is what covers
  // SIGKILL of the host); this covers a sidecar too busy or wedged to notice.
  onHostExit(() => {
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
        this.exitInfo = { pid: this.child.pid, code, signal, stderrTail: this.stderrTail };
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

  /** The end of stderr, structured log lines made readable. */
  get stderrTail(): string {
    return readableLog(this.tail.toString());
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
        if (isOversized(frame)) {
          onLine(`${frame.head.toString("utf8")}… [line truncated]`, undefined);
        } else {
          const line = frame.toString("utf8");
          onLine(line, parseLogLine(line));
        }
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

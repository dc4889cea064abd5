/**
 * `install-service` / `uninstall-service`: the service starts at login and is kept running.
 * macOS: a launchd agent (`~/Library/LaunchAgents/localmlx.serve.plist`, loaded with
 * `launchctl bootstrap gui/<uid>`), its log in `~/Library/Logs/localmlx/serve.log`. Linux: a
 * systemd user unit (`~/.config/systemd/user/localmlx.service`, `systemctl --user enable`), its
 * log in the journal. Both run `<node> <bin> serve --config <file>` with absolute paths, and
 * carry the environment the service needs (never a key or token).
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { defaultConfigPath, defaultServiceConfig } from "./config";

export const LAUNCHD_LABEL = "localmlx.serve";
export const SYSTEMD_UNIT = "localmlx.service";

export type ServicePlatform = "darwin" | "linux";

/** Runs one loader command; the default spawns it. */
export type CommandRunner = (command: string, args: string[]) => { status: number | null; error?: Error; stderr?: string };

export interface InstallServiceOptions {
  /** The bin that `serve`s (absolute): this package's `bin/localmlx-client.cjs`. */
  bin: string;
  /** The Node that runs it. Default: this one (`process.execPath`). */
  node?: string;
  platform?: string;
  /** Default: `os.homedir()` (which follows `HOME`). */
  home?: string;
  env?: NodeJS.ProcessEnv;
  /** The config file the service reads. Default: `defaultConfigPath()`; written with the defaults when missing. */
  configPath?: string;
  /** Print what would be written and run; change nothing. */
  dryRun?: boolean;
  /** Write the files but do not load them into launchd/systemd. Default: load. */
  load?: boolean;
  uid?: number;
  run?: CommandRunner;
  out?: (line: string) => void;
}

/** What an install wrote (or would) and the loader commands it ran (or would). */
export interface ServicePlan {
  platform: ServicePlatform;
  files: Array<{ path: string; content: string }>;
  commands: string[][];
  /** Environment variables it left out on purpose (secrets). */
  withheld: string[];
}

/** Variables the service may need, besides every `LOCALMLX_*` one. Keys and tokens are never written. */
const CARRIED = ["PATH", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "OPENAI_BASE_URL", "XDG_CONFIG_HOME", "XDG_DATA_HOME"];
const SECRET = /KEY|TOKEN|SECRET|PASSWORD/i;

function platformOf(platform: string): ServicePlatform {
  if (platform === "darwin" || platform === "linux") return platform;
  throw new Error(`install-service knows macOS (launchd) and Linux (systemd), not ${platform}`);
}

/** The environment written into the unit: `LOCALMLX_*` and the few others the sidecar reads; secrets withheld. */
export function serviceEnvironment(env: NodeJS.ProcessEnv): { env: Record<string, string>; withheld: string[] } {
  const out: Record<string, string> = {};
  const withheld: string[] = [];
  for (const [key, value] of Object.entries(env).sort(([a], [b]) => a.localeCompare(b))) {
    if (value === undefined || key === "LOCALMLX_SERVE_CONFIG") continue;
    if (!key.startsWith("LOCALMLX_") && !CARRIED.includes(key) && !/^OPENAI_API_KEY$|^HF_TOKEN$/.test(key)) continue;
    if (SECRET.test(key)) withheld.push(key);
    else out[key] = value;
  }
  return { env: out, withheld };
}

function xml(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** The launchd agent: runs at login, restarted if it fails (not after a clean stop), its log in a file. */
export function launchdPlist(spec: { programArguments: string[]; env: Record<string, string>; logFile: string; exitTimeoutS: number }): string {
  const strings = (items: string[]): string => items.map((item) => `\t\t<string>${xml(item)}</string>`).join("\n");
  const env = Object.entries(spec.env)
    .map(([key, value]) => `\t\t<key>${xml(key)}</key>\n\t\t<string>${xml(value)}</string>`)
    .join("\n");
  return `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
\t<key>Label</key>
\t<string>${LAUNCHD_LABEL}</string>
\t<key>ProgramArguments</key>
\t<array>
${strings(spec.programArguments)}
\t</array>
\t<key>EnvironmentVariables</key>
\t<dict>
${env}
\t</dict>
\t<key>RunAtLoad</key>
\t<true/>
\t<key>KeepAlive</key>
\t<dict>
\t\t<key>SuccessfulExit</key>
\t\t<false/>
\t</dict>
\t<key>ExitTimeOut</key>
\t<integer>${spec.exitTimeoutS}</integer>
\t<key>StandardOutPath</key>
\t<string>${xml(spec.logFile)}</string>
\t<key>StandardErrorPath</key>
\t<string>${xml(spec.logFile)}</string>
</dict>
</plist>
`;
}

/**
 * One systemd word, quoted: `\\` and `"` escaped, `%` doubled (no specifier expansion), and in
 * command lines `$` doubled too (no variable expansion; `Environment=` does none).
 */
function systemdWord(text: string, inCommand = true): string {
  const quoted = text.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/%/g, "%%");
  return `"${inCommand ? quoted.replace(/\$/g, "$$$$") : quoted}"`;
}

/**
 * The systemd user unit. `KillMode=mixed`: SIGTERM goes to the service alone, which drains and
 * stops its sidecar itself; whatever is left gets SIGKILL when `TimeoutStopSec` runs out.
 */
export function systemdUnit(spec: { programArguments: string[]; env: Record<string, string>; stopTimeoutS: number }): string {
  const environment = Object.entries(spec.env).map(([key, value]) => `Environment=${systemdWord(`${key}=${value}`, false)}`);
  return [
    "[Unit]",
    "Description=localmlx: local MLX models on OpenAI-compatible ports (Wooster's tiers)",
    "",
    "[Service]",
    "Type=simple",
    `ExecStart=${spec.programArguments.map((arg) => systemdWord(arg)).join(" ")}`,
    "ExecReload=/bin/kill -HUP $MAINPID",
    ...environment,
    "Restart=on-failure",
    "RestartSec=2",
    "KillMode=mixed",
    `TimeoutStopSec=${spec.stopTimeoutS}`,
    "",
    "[Install]",
    "WantedBy=default.target",
    "",
  ].join("\n");
}

function unitPath(platform: ServicePlatform, home: string, env: NodeJS.ProcessEnv): string {
  return platform === "darwin"
    ? join(home, "Library", "LaunchAgents", `${LAUNCHD_LABEL}.plist`)
    : join(env.XDG_CONFIG_HOME || join(home, ".config"), "systemd", "user", SYSTEMD_UNIT);
}

const defaultRun: CommandRunner = (command, args) => {
  const result = spawnSync(command, args, { encoding: "utf8", stdio: ["ignore", "inherit", "pipe"] });
  return { status: result.status, ...(result.error ? { error: result.error } : {}), stderr: result.stderr };
};

function uidOf(options: { uid?: number }): number {
  return options.uid ?? process.getuid?.() ?? 0;
}

/** Runs (or prints) the loader commands; `optional` ones may fail (unloading what is not loaded). */
function runCommands(commands: Array<{ argv: string[]; optional?: boolean }>, options: InstallServiceOptions, out: (line: string) => void): void {
  const run = options.run ?? defaultRun;
  for (const { argv, optional } of commands) {
    out(`${options.dryRun ? "would run" : "$"} ${argv.join(" ")}`);
    if (options.dryRun) continue;
    const result = run(argv[0]!, argv.slice(1));
    if (!optional && (result.error || result.status !== 0)) {
      const why = result.error ? result.error.message : `exit ${result.status}${result.stderr?.trim() ? `: ${result.stderr.trim().split("\n").pop()}` : ""}`;
      throw new Error(`${argv.join(" ")} failed (${why})`);
    }
  }
}

/** Writes the unit (and a default config when there is none) and loads it. */
export function installService(options: InstallServiceOptions): ServicePlan {
  const platform = platformOf(options.platform ?? process.platform);
  const env = options.env ?? process.env;
  const home = options.home ?? homedir();
  const out = options.out ?? ((line: string) => console.log(line));
  const configPath = options.configPath ?? defaultConfigPath(env, platform, home);
  const node = options.node ?? process.execPath;
  const programArguments = [node, options.bin, "serve", "--config", configPath];
  const { env: unitEnv, withheld } = serviceEnvironment(env);
  const drainS = Math.ceil(defaultServiceConfig().drainTimeoutMs / 1000);
  const stopS = drainS + 15; // the drain, then the sidecar's own stop
  const path = unitPath(platform, home, env);
  const files: ServicePlan["files"] = [];
  if (!existsSync(configPath)) files.push({ path: configPath, content: `${JSON.stringify(defaultServiceConfig(), null, 2)}\n` });
  const logFile = join(home, "Library", "Logs", "localmlx", "serve.log");
  files.push({
    path,
    content:
      platform === "darwin"
        ? launchdPlist({ programArguments, env: unitEnv, logFile, exitTimeoutS: stopS })
        : systemdUnit({ programArguments, env: unitEnv, stopTimeoutS: stopS }),
  });
  const uid = uidOf(options);
  const commands =
    platform === "darwin"
      ? [
          { argv: ["launchctl", "bootout", `gui/${uid}/${LAUNCHD_LABEL}`], optional: true },
          { argv: ["launchctl", "bootstrap", `gui/${uid}`, path] },
        ]
      : [
          { argv: ["systemctl", "--user", "daemon-reload"] },
          { argv: ["systemctl", "--user", "enable", SYSTEMD_UNIT] },
          // restart, not start: a unit that was running picks up the new file too.
          { argv: ["systemctl", "--user", "restart", SYSTEMD_UNIT] },
        ];

  if (/[\\/]_npx[\\/]/.test(options.bin)) {
    out(`warning: ${options.bin} is in npx's cache, which npm may clear; install the package (npm install -g @localmlx/client) and run install-service from there.`);
  }
  for (const file of files) {
    if (options.dryRun) {
      out(`would write ${file.path}:\n${file.content}`);
      continue;
    }
    mkdirSync(dirname(file.path), { recursive: true });
    writeFileSync(file.path, file.content);
    out(`wrote ${file.path}`);
  }
  if (platform === "darwin" && !options.dryRun) mkdirSync(dirname(logFile), { recursive: true });
  if (withheld.length) out(`not written into the unit (secrets): ${withheld.join(", ")}; the service does not need them unless LOCALMLX_FALLBACK_TO_OPENAI=true.`);
  const loading = options.load !== false;
  if (loading) runCommands(commands, options, out);
  else out(`not loaded (--no-load); load it with: ${commands.filter((c) => !c.optional).map((c) => c.argv.join(" ")).join(" && ")}`);
  if (!options.dryRun) {
    out(
      [
        "",
        `The service reads ${configPath} (edit it, then reload: ${platform === "darwin" ? `launchctl kill SIGHUP gui/${uid}/${LAUNCHD_LABEL}` : `systemctl --user reload ${SYSTEMD_UNIT}`}).`,
        `Its log: ${platform === "darwin" ? logFile : `journalctl --user -u ${SYSTEMD_UNIT}`}. Check it: curl http://127.0.0.1:8081/health`,
      ].join("\n"),
    );
  }
  return { platform, files, commands: loading ? commands.map((c) => c.argv) : [], withheld };
}

/** Unloads the unit and removes its file (the config file stays). */
export function uninstallService(options: Omit<InstallServiceOptions, "bin" | "node" | "configPath">): ServicePlan {
  const platform = platformOf(options.platform ?? process.platform);
  const env = options.env ?? process.env;
  const home = options.home ?? homedir();
  const out = options.out ?? ((line: string) => console.log(line));
  const path = unitPath(platform, home, env);
  const uid = uidOf(options);
  const before =
    platform === "darwin"
      ? [{ argv: ["launchctl", "bootout", `gui/${uid}/${LAUNCHD_LABEL}`], optional: true }]
      : [{ argv: ["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT], optional: true }];
  const after = platform === "darwin" ? [] : [{ argv: ["systemctl", "--user", "daemon-reload"] }];
  const loading = options.load !== false;
  const runOptions = { ...options, bin: "" };
  if (loading) runCommands(before, runOptions, out);
  if (options.dryRun) out(`would remove ${path}`);
  else if (existsSync(path)) {
    rmSync(path);
    out(`removed ${path}`);
  } else out(`${path} was not there`);
  if (loading) runCommands(after, runOptions, out);
  return { platform, files: [{ path, content: "" }], commands: loading ? [...before, ...after].map((c) => c.argv) : [], withheld: [] };
}

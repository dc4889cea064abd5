/**
 * The service's configuration (`serve.json`): the ports it listens on, one per tier, each with
 * its model; the sidecar's settings; how long a stop may drain; its log. Without a file it serves
 * Wooster's tiers with the defaults below. Every key is checked, and an error names the bad one.
 */
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { readSetting, type SettingsEnv } from "../settings";

/** One tier: a port, and the model it serves whatever model name a request sends. */
export interface TierConfig {
  port: number;
  model: string;
  /** Default: the service's `host`. */
  host?: string;
  /** Load the model when the service starts, not on the first request. Default false. */
  preload?: boolean;
}

export type ServiceLogFormat = "json" | "text";
export type ServiceLogLevel = "debug" | "info" | "warn" | "error";

export interface ServiceConfig {
  /** The interface every tier binds unless it names its own. Default `127.0.0.1` (loopback only). */
  host: string;
  /** Tier name → port and model. Default: Wooster's router, fast, thinking and embeddings. */
  tiers: Record<string, TierConfig>;
  sidecar: {
    /** The Python that runs the sidecar. Default: found as the client finds it (`LOCALMLX_PYTHON`, …). */
    python?: string;
    /** `LOCALMLX_*` settings for the sidecar, over the service's own environment. */
    env: Record<string, string>;
  };
  /** Require `Authorization: Bearer <apiKey>`. Default: none (loopback). */
  apiKey?: string;
  /** How long SIGTERM lets requests in flight finish before it ends them. Default 30000. */
  drainTimeoutMs: number;
  /** `format`: default `json`, or `text` when stderr is a terminal. */
  log: { format?: ServiceLogFormat; level: ServiceLogLevel };
}

/** The embeddings tier's default: Qwen3-Embedding 0.6B, 4-bit (about 350 MB; 1024 dimensions). */
export const DEFAULT_EMBEDDING_MODEL = "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ";
export const DEFAULT_EMBEDDING_DIMENSIONS = 1024;

/** Wooster's tiers at Wooster's own default ports (its configLoader.ts), on the demo model until you name real ones. */
export function defaultServiceConfig(): ServiceConfig {
  return {
    host: "127.0.0.1",
    tiers: {
      router: { port: 8080, model: "demo" },
      fast: { port: 8081, model: "demo" },
      thinking: { port: 8083, model: "demo" },
      embeddings: { port: 8084, model: DEFAULT_EMBEDDING_MODEL },
    },
    sidecar: { env: {} },
    drainTimeoutMs: 30_000,
    log: { level: "info" },
  };
}

/**
 * Where the service looks for its file: `LOCALMLX_SERVE_CONFIG`, else
 * `~/Library/Application Support/localmlx/serve.json` on macOS, else
 * `$XDG_CONFIG_HOME/localmlx/serve.json` (`~/.config/localmlx/serve.json`).
 */
export function defaultConfigPath(env: SettingsEnv = process.env, platform: string = process.platform, home: string = homedir()): string {
  const given = readSetting(env, "serveConfig");
  if (given) return given;
  if (platform === "darwin") return join(home, "Library", "Application Support", "localmlx", "serve.json");
  return join(env.XDG_CONFIG_HOME || join(home, ".config"), "localmlx", "serve.json");
}

/** A config file that cannot be used: `key` is the dotted path of the bad value (`tiers.fast.port`). */
export class ServiceConfigError extends Error {
  override name = "ServiceConfigError";

  constructor(
    readonly source: string,
    readonly key: string,
    problem: string,
  ) {
    super(`${source}: ${key ? `${key}: ` : ""}${problem}`);
  }
}

export interface LoadedServiceConfig {
  config: ServiceConfig;
  /** The file it came from; undefined: the built-in defaults (no file at the default path). */
  path: string | undefined;
}

/**
 * The configuration: from `path` when given (it must exist), else from `LOCALMLX_SERVE_CONFIG`
 * (which must exist too), else from the default path when a file is there, else the defaults.
 */
export function loadServiceConfig(options: { path?: string; env?: SettingsEnv; platform?: string; home?: string } = {}): LoadedServiceConfig {
  const env = options.env ?? process.env;
  const explicit = options.path ?? readSetting(env, "serveConfig");
  const path = explicit ?? defaultConfigPath(env, options.platform, options.home);
  if (!existsSync(path)) {
    if (explicit !== undefined) throw new ServiceConfigError(path, "", "no such file");
    return { config: defaultServiceConfig(), path: undefined };
  }
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (error) {
    throw new ServiceConfigError(path, "", `not valid JSON (${(error as Error).message})`);
  }
  return { config: parseServiceConfig(value, path), path };
}

const TIER_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Checks a parsed file and fills in the defaults. `source` names it in errors. */
export function parseServiceConfig(value: unknown, source = "serve.json"): ServiceConfig {
  const fail = (key: string, problem: string): never => {
    throw new ServiceConfigError(source, key, problem);
  };
  const got = (v: unknown): string => (JSON.stringify(v) ?? String(v)).slice(0, 80);
  const object = (v: unknown, key: string): Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : fail(key, `must be an object (got ${got(v)})`);
  const only = (o: Record<string, unknown>, prefix: string, keys: string[]): void => {
    for (const key of Object.keys(o)) {
      if (!keys.includes(key) && !key.startsWith("$")) fail(`${prefix}${key}`, `unknown key (known: ${keys.join(", ")})`);
    }
  };
  const text = (v: unknown, key: string): string => (typeof v === "string" && v.trim() !== "" ? v : fail(key, `must be a non-empty string (got ${got(v)})`));
  const port = (v: unknown, key: string): number =>
    Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 65535 ? (v as number) : fail(key, `must be an integer from 0 to 65535 (got ${got(v)})`);

  const root = object(value, "");
  only(root, "", ["host", "tiers", "sidecar", "apiKey", "drainTimeoutMs", "log"]);
  const config = defaultServiceConfig();
  if (root.host !== undefined) config.host = text(root.host, "host");
  if (root.apiKey !== undefined) config.apiKey = text(root.apiKey, "apiKey");
  if (root.drainTimeoutMs !== undefined) {
    const ms = root.drainTimeoutMs;
    config.drainTimeoutMs = typeof ms === "number" && Number.isFinite(ms) && ms >= 0 ? ms : fail("drainTimeoutMs", `must be a number of milliseconds, 0 or more (got ${got(ms)})`);
  }

  if (root.tiers !== undefined) {
    const tiers = object(root.tiers, "tiers");
    const names = Object.keys(tiers).filter((name) => !name.startsWith("$"));
    if (names.length === 0) fail("tiers", "must name at least one tier");
    config.tiers = {};
    const byAddress = new Map<string, string>();
    for (const name of names) {
      const key = `tiers.${name}`;
      if (!TIER_NAME.test(name)) fail(key, "a tier's name is letters, digits, - and _");
      const tier = object(tiers[name], key);
      only(tier, `${key}.`, ["port", "model", "host", "preload"]);
      const parsed: TierConfig = { port: port(tier.port, `${key}.port`), model: text(tier.model, `${key}.model`) };
      if (tier.host !== undefined) parsed.host = text(tier.host, `${key}.host`);
      if (tier.preload !== undefined) parsed.preload = typeof tier.preload === "boolean" ? tier.preload : fail(`${key}.preload`, `must be true or false (got ${got(tier.preload)})`);
      const address = `${parsed.host ?? config.host}:${parsed.port}`;
      const other = byAddress.get(address);
      if (other !== undefined && parsed.port !== 0) fail(`${key}.port`, `${parsed.port} is tiers.${other}'s port too; one port serves one tier`);
      byAddress.set(address, name);
      config.tiers[name] = parsed;
    }
  }

  if (root.sidecar !== undefined) {
    const sidecar = object(root.sidecar, "sidecar");
    only(sidecar, "sidecar.", ["python", "env"]);
    if (sidecar.python !== undefined) config.sidecar.python = text(sidecar.python, "sidecar.python");
    if (sidecar.env !== undefined) {
      for (const [name, v] of Object.entries(object(sidecar.env, "sidecar.env"))) {
        const key = `sidecar.env.${name}`;
        if (!ENV_NAME.test(name)) fail(key, "not an environment variable name");
        if (typeof v !== "string" && typeof v !== "number" && typeof v !== "boolean") fail(key, `must be a string, number or boolean (got ${got(v)})`);
        config.sidecar.env[name] = String(v);
      }
    }
  }

  if (root.log !== undefined) {
    const log = object(root.log, "log");
    only(log, "log.", ["format", "level"]);
    if (log.format !== undefined) {
      config.log.format = log.format === "json" || log.format === "text" ? log.format : fail("log.format", `must be "json" or "text" (got ${got(log.format)})`);
    }
    if (log.level !== undefined) {
      const levels = ["debug", "info", "warn", "error"];
      config.log.level = levels.includes(log.level as string) ? (log.level as ServiceLogLevel) : fail("log.level", `must be one of ${levels.join(", ")} (got ${got(log.level)})`);
    }
  }
  return config;
}

/**
 * Every environment variable the TypeScript side reads, in one table: its name, how its text
 * parses and prints, and its default. The client, the endpoint, the service and the Wooster
 * plugin read the environment once, where they start, through `readSetting`, and pass the values
 * down. Booleans follow the sidecar's rule (sidecar/settings.py `_bool`); a value that does not
 * parse is a `SettingsError` naming the variable, never a silent default.
 *
 * Settings the sidecar owns (`LOCALMLX_MAX_TOKENS`, `LOCALMLX_TEMPERATURE`, …) have no default
 * here: they reach the sidecar as written, and the sidecar's defaults apply (its `initialize`
 * result says which). The few the plugin also reads are parsed by the sidecar's rules.
 */
import { LocalMLXError } from "./errors";

/** The environment as read at the edge (`process.env`, a .env file, a config's `env`). */
export type SettingsEnv = Readonly<Record<string, string | undefined>>;

/** A variable whose text does not parse: `variable`, its `value`, and what is wrong. */
export class SettingsError extends LocalMLXError {
  override name = "SettingsError";

  constructor(
    readonly variable: string,
    readonly value: string,
    readonly problem: string,
  ) {
    super(`bad ${variable}=${JSON.stringify(value)}: ${problem}`);
  }
}

/** The sidecar's boolean rule: 1/true/yes/on, 0/false/no/off/empty (any case); anything else throws. */
export function parseBool(text: string): boolean {
  const value = text.trim().toLowerCase();
  if (["1", "true", "yes", "on"].includes(value)) return true;
  if (["0", "false", "no", "off", ""].includes(value)) return false;
  throw new Error(`not a boolean (1/true/yes/on or 0/false/no/off)`);
}

const DIGITS = String.raw`\d(?:_?\d)*`;
const INTEGER = new RegExp(String.raw`^[+-]?${DIGITS}$`);
const FLOAT = new RegExp(String.raw`^[+-]?(?:${DIGITS}(?:\.(?:${DIGITS})?)?|\.${DIGITS})(?:[eE][+-]?${DIGITS})?$`);
/** The sidecar's keep-alive (`parse_duration`): seconds, 0 or more, or "1h30m", "5m", "30s", "250ms". */
const SECONDS = /^(?:\d+\.?\d*|\.\d+)$/;
const DURATION = /^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$/;

/** Python's `int()` of a decimal text, as the sidecar reads its integer settings. */
export function parseInteger(text: string): number {
  const value = text.trim();
  if (!INTEGER.test(value)) throw new Error("not an integer");
  return Number(value.replace(/_/g, ""));
}

const SPECIAL = /^([+-]?)(inf|infinity|nan)$/i;

/** Python's `float()` of a text (decimal, or inf/nan), as the sidecar reads its number settings. */
export function parseNumber(text: string): number {
  const value = text.trim();
  const special = SPECIAL.exec(value);
  if (special) return special[2]!.toLowerCase() === "nan" ? NaN : special[1] === "-" ? -Infinity : Infinity;
  if (!FLOAT.test(value)) throw new Error("not a number");
  return Number(value.replace(/_/g, ""));
}

/** One variable: how its text parses and prints, its default, and values its round trip is tested with. */
export interface Setting<T> {
  readonly env: string;
  readonly help: string;
  /** The value of a non-empty text; throws an Error saying what is wrong. */
  parse(text: string): T;
  /** The text that parses back to `value`. */
  format(value: T): string;
  /** The value when unset or empty; undefined: none here (the sidecar's applies, or the feature is off). */
  readonly default?: T;
  /** Values `parse(format(value))` must give back (test/settings.test.ts tries each). */
  readonly examples: readonly T[];
}

function text(env: string, help: string, extra: { default?: string; examples?: string[] } = {}): Setting<string> {
  return { env, help, parse: (t) => t.trim(), format: (v) => v, examples: extra.examples ?? ["x", "/a path/with spaces"], ...(extra.default !== undefined ? { default: extra.default } : {}) };
}

function flag(env: string, help: string, defaultValue?: boolean): Setting<boolean> {
  return { env, help, parse: parseBool, format: String, examples: [true, false], ...(defaultValue !== undefined ? { default: defaultValue } : {}) };
}

function number(env: string, help: string, parse: (text: string) => number, examples: number[]): Setting<number> {
  return { env, help, parse, format: String, examples };
}

/** `true` or `false` when the text is a boolean by the sidecar's rule, else what `otherwise` makes of it. */
function flagOr<T>(text: string, otherwise: (value: string) => T): boolean | T {
  try {
    return parseBool(text);
  } catch {
    return otherwise(text.trim());
  }
}

/** One of `values`, any case (the sidecar's `_choice`). */
function choice<const T extends string>(env: string, help: string, values: readonly T[]): Setting<T> {
  const parse = (text: string): T => {
    const value = text.trim().toLowerCase();
    if (!(values as readonly string[]).includes(value)) throw new Error(`expected ${values.join(" or ")}`);
    return value as T;
  };
  return { env, help, parse, format: (v) => v, examples: values };
}

/** Seconds, more than 0. */
function positiveSeconds(text: string): number {
  const value = parseNumber(text);
  if (!(value > 0 && Number.isFinite(value))) throw new Error("must be a number of seconds, more than 0");
  return value;
}

/** `true`, `false`, or a comma list of models. */
function modelList(env: string, help: string): Setting<boolean | string[]> {
  return {
    env,
    help,
    parse: (t) => flagOr(t, (list) => list.split(",").map((m) => m.trim()).filter(Boolean)),
    format: (v) => (typeof v === "boolean" ? String(v) : v.join(",")),
    examples: [true, false, ["demo"], ["mlx-community/Qwen2.5-3B-Instruct-4bit", "demo"]],
  };
}

/** `true`, `false`, or a keep-alive duration the sidecar reads ("10m", "1h30m", seconds, -1). */
function keepAlive(env: string, help: string): Setting<boolean | string> {
  const duration = (value: string): string => {
    if (value === "-1" || SECONDS.test(value) || DURATION.test(value)) return value;
    throw new Error('not true, false or a duration ("5m", "1h30m", seconds, -1)');
  };
  return { env, help, parse: (t) => flagOr(t, duration), format: String, examples: [true, false, "10m", "1h30m", "90", "-1"] };
}

/**
 * Draft models by target (`LOCALMLX_DRAFT_MODELS`): a comma list of `target=draft` pairs, each
 * name as a `model` param spells it. A pair without `=`, an empty name or a target named twice
 * is an error (which draft would it get?).
 */
function draftModelPairs(env: string, help: string): Setting<Record<string, string>> {
  const parse = (text: string): Record<string, string> => {
    const pairs: Record<string, string> = {};
    for (const item of text.split(",").map((pair) => pair.trim()).filter(Boolean)) {
      const at = item.indexOf("=");
      const target = item.slice(0, at).trim();
      const draft = item.slice(at + 1).trim();
      if (at < 0 || target === "" || draft === "") throw new Error(`"${item}" is not a target=draft pair`);
      if (Object.hasOwn(pairs, target)) throw new Error(`${target} is given two draft models`);
      pairs[target] = draft;
    }
    return pairs;
  };
  const format = (pairs: Record<string, string>): string =>
    Object.entries(pairs).map(([target, draft]) => `${target}=${draft}`).join(",");
  return {
    env,
    help,
    parse,
    format,
    examples: [{ demo: "demo" }, { "mlx-community/Qwen2.5-7B-Instruct-4bit": "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "/models/big": "/models/small" }],
  };
}

/**
 * Every variable the TypeScript side reads. The key is the setting's name in Wooster's
 * `config.plugins.localMLX` object too.
 */
export const SETTINGS = {
  // Where the sidecar comes from (process.ts).
  python: text("LOCALMLX_PYTHON", "the Python that runs the sidecar (it then is the only one tried)"),
  venv: text("LOCALMLX_VENV", "the private virtualenv of `npx @localmlx/client setup`"),
  // The service (service/config.ts).
  serveConfig: text("LOCALMLX_SERVE_CONFIG", "the service's config file"),
  // The remote fallback (openai/fallback.ts).
  fallbackToOpenAI: flag("LOCALMLX_FALLBACK_TO_OPENAI", "true: the remote answers when local cannot; false: nothing ever goes remote; unset: only a fallback given in code"),
  fallbackModel: text("LOCALMLX_FALLBACK_MODEL", "the model asked of the remote (default: the name the client asked for)"),
  fallbackCooldownMs: number("LOCALMLX_FALLBACK_COOLDOWN_MS", "after the sidecar failed as a whole, requests go remote for this long", nonNegative, [0, 30_000, 1.5]),
  openAIApiKey: text("OPENAI_API_KEY", "the remote's key (Authorization: Bearer)", { examples: ["sk-test"] }),
  openAIBaseURL: text("OPENAI_BASE_URL", "the remote's base URL, /v1 included", { examples: ["http://127.0.0.1:9000/v1"] }),
  // The Wooster plugin (wooster/config.ts).
  toolsEnabled: flag("TOOLS_LOCALMLX_ENABLED", "offer the agent tools", true),
  autoStartServer: flag("LOCALMLX_AUTO_START_SERVER", "start the loopback OpenAI-compatible endpoint with the plugin", false),
  serverUrl: text("LOCALMLX_SERVER_URL", "where the plugin's endpoint listens", { default: "http://127.0.0.1:8000", examples: ["http://127.0.0.1:8080"] }),
  serveTiers: flag("LOCALMLX_SERVE_TIERS", "the plugin's endpoint also listens on Wooster's tier URLs", false),
  streamResponses: flag("LOCALMLX_STREAM_RESPONSES", "stream the tools' replies to LangChain callbacks and the debug log", false),
  preloadModels: modelList("LOCALMLX_PRELOAD_MODELS", "true (the default model) or a comma list, warmed by the plugin after start-up"),
  offloadInactive: keepAlive("LOCALMLX_OFFLOAD_INACTIVE", "true (5 minutes), false, or how long an idle model stays loaded"),
  visionModel: text("LOCALMLX_VISION_MODEL", "the model the plugin's local_vision tool sends images to (one with the vision capability)", { examples: ["mlx-community/Qwen2-VL-2B-Instruct-4bit", "qwen2-vl-tiny"] }),
  // The sidecar's own, read by the plugin too: no default here.
  defaultModel: text("LOCALMLX_DEFAULT_MODEL", "the model used when a call names none (sidecar)"),
  maxTokens: number("LOCALMLX_MAX_TOKENS", "default maxTokens of chat and generate (sidecar)", parseInteger, [1, 24, 2048]),
  temperature: number("LOCALMLX_TEMPERATURE", "default sampling temperature (sidecar)", parseNumber, [0, 0.2, 1.5]),
  modelsDir: text("LOCALMLX_MODELS_DIR", "the local models directory (sidecar)"),
  autoDownload: flag("LOCALMLX_AUTO_DOWNLOAD", "download a Hub model on first load (sidecar)"),
  quantization: text("LOCALMLX_QUANTIZATION", "4bit, 8bit or none, for converting non-MLX downloads (sidecar)", { examples: ["4bit", "none"] }),
  enableCache: flag("LOCALMLX_ENABLE_CACHE", "the exact response cache (sidecar)"),
  draftModels: draftModelPairs("LOCALMLX_DRAFT_MODELS", "speculative decoding: each target model's default draft model, target=draft pairs, comma-separated (sidecar)"),
  profilesDir: text("LOCALMLX_PROFILES_DIR", "a directory of profiles (<name>.toml), read before the models dir's profiles/ and written by profiles/save (sidecar)", { examples: ["/Users/me/.localmlx/profiles", "/a path/with spaces"] }),
  // One model sharded over several machines (sidecar; README "Several Macs"): no default here.
  hostfile: text("LOCALMLX_HOSTFILE", "mlx.launch's hostfile JSON: serve models sharded over its hosts (sidecar)", { examples: ["/Users/me/.localmlx/hosts.json", "/a path/with spaces.json"] }),
  distributedMode: choice("LOCALMLX_DISTRIBUTED_MODE", "how a model is split over the group: pipeline or tensor (sidecar)", ["pipeline", "tensor"]),
  distributedBackend: choice("LOCALMLX_DISTRIBUTED_BACKEND", "mlx.distributed backend: ring, jaccl or any (sidecar)", ["ring", "jaccl", "any"]),
  distributedLauncher: text("LOCALMLX_DISTRIBUTED_LAUNCHER", "the command that starts a rank on its host, a template ({ssh}, {ip}, {rank}); default ssh (sidecar)", { examples: ["ssh -o BatchMode=yes {ssh}", "ssh -i /keys/id {ssh}"] }),
  distributedAllowPublic: flag("LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC", "allow a hostfile address on a public network: the ring backend has no authentication (sidecar)"),
  distributedTimeout: number("LOCALMLX_DISTRIBUTED_TIMEOUT", "seconds without a heartbeat before a rank counts as lost (sidecar)", positiveSeconds, [5, 0.5, 30]),
} satisfies Record<string, Setting<unknown>>;

function nonNegative(text: string): number {
  const value = parseNumber(text);
  if (!(value >= 0)) throw new Error("must be a number, 0 or more");
  return value;
}

export type SettingName = keyof typeof SETTINGS;
/** The value type of one setting. */
export type SettingValue<K extends SettingName> = ReturnType<(typeof SETTINGS)[K]["parse"]>;

/**
 * One setting from `env`: its parsed value, its default when unset or empty (an empty variable
 * means the default, as Wooster reads its .env), or undefined. Throws `SettingsError` when the text
 * does not parse.
 */
export function readSetting<K extends SettingName>(env: SettingsEnv, name: K): SettingValue<K> | undefined {
  const setting = SETTINGS[name] as Setting<SettingValue<K>>;
  const raw = env[setting.env];
  if (raw === undefined || raw.trim() === "") return setting.default;
  try {
    return setting.parse(raw);
  } catch (error) {
    throw new SettingsError(setting.env, raw, (error as Error).message);
  }
}

/**
 * Serving models sharded over several machines (README "Several Macs"), as `LocalMLX`'s
 * `distributed` option: each field is the sidecar setting named beside it, unset ones left to the
 * environment and the sidecar's defaults.
 */
export interface DistributedOptions {
  /** LOCALMLX_HOSTFILE: mlx.launch's hostfile JSON; its first host is this machine (rank 0). */
  hostfile?: string;
  /** LOCALMLX_DISTRIBUTED_MODE: `pipeline` (a run of layers per rank) or `tensor` (a slice of every layer). */
  mode?: SettingValue<"distributedMode">;
  /** LOCALMLX_DISTRIBUTED_BACKEND: `ring` (TCP), `jaccl` (RDMA over Thunderbolt 5) or `any`. */
  backend?: SettingValue<"distributedBackend">;
  /** LOCALMLX_DISTRIBUTED_LAUNCHER: the command that starts a rank on its host ({ssh}, {ip}, {rank}); default ssh. */
  launcher?: string;
  /** LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC: allow a hostfile address on a public network (the ring backend has no authentication). */
  allowPublic?: boolean;
  /** LOCALMLX_DISTRIBUTED_TIMEOUT: seconds without a heartbeat before a rank counts as lost (default 5). */
  timeoutSeconds?: number;
}

const DISTRIBUTED_SETTINGS = {
  hostfile: "hostfile",
  mode: "distributedMode",
  backend: "distributedBackend",
  launcher: "distributedLauncher",
  allowPublic: "distributedAllowPublic",
  timeoutSeconds: "distributedTimeout",
} as const satisfies Record<keyof DistributedOptions, SettingName>;

/**
 * The sidecar's environment for `options`: each given field as its variable, written by the
 * table's `format` and read back through it, so a bad value (a mode from untyped code, a negative
 * timeout) is a `SettingsError` naming the variable before anything is spawned.
 */
export function distributedEnv(options: DistributedOptions = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [field, name] of Object.entries(DISTRIBUTED_SETTINGS) as Array<[keyof DistributedOptions, SettingName]>) {
    const value = options[field];
    if (value === undefined) continue;
    const setting = SETTINGS[name] as Setting<unknown>;
    env[setting.env] = setting.format(value);
    readSetting(env, name);
  }
  return env;
}

/** `LocalMLX`'s `draftModels` option: `{ target: draft }`, or the variable's own text (`"target=draft,…"`). */
export type DraftModels = Record<string, string> | string;

/**
 * The sidecar's environment for `draftModels`: `LOCALMLX_DRAFT_MODELS` as `target=draft` pairs.
 * The text is read back through the table, so a pair that cannot be written (a name with a comma,
 * a target with `=`, an empty name) is a `SettingsError` naming the variable before anything is spawned.
 */
export function draftModelsEnv(draftModels?: DraftModels): Record<string, string> {
  if (draftModels === undefined) return {};
  const setting = SETTINGS.draftModels;
  const text = typeof draftModels === "string" ? draftModels : setting.format(draftModels);
  const pairs = readSetting({ [setting.env]: text }, "draftModels") ?? {};
  if (typeof draftModels !== "string" && !samePairs(pairs, draftModels)) {
    throw new SettingsError(setting.env, text, "a model name holds a comma, or a target holds '=', or a name is empty");
  }
  return { [setting.env]: setting.format(pairs) };
}

function samePairs(a: Record<string, string>, b: Record<string, string>): boolean {
  const entries = Object.entries(b);
  return Object.keys(a).length === entries.length && entries.every(([target, draft]) => Object.hasOwn(a, target) && a[target] === draft);
}

/**
 * The sidecar's environment for `LocalMLX`'s `profilesDir` option: `LOCALMLX_PROFILES_DIR`, read
 * back through the table (an empty or blank path is a `SettingsError`, not "unset").
 */
export function profilesDirEnv(profilesDir?: string): Record<string, string> {
  if (profilesDir === undefined) return {};
  const setting = SETTINGS.profilesDir;
  const dir = readSetting({ [setting.env]: profilesDir }, "profilesDir");
  if (dir === undefined) throw new SettingsError(setting.env, profilesDir, "must be a directory, not empty");
  return { [setting.env]: setting.format(dir) };
}

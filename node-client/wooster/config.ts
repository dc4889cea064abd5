/**
 * The plugin's settings: `LOCALMLX_*` (and two `TOOLS_`/`PLUGIN_` switches) from the environment,
 * over `config.plugins.localMLX` when Wooster's config holds an object there, over defaults.
 * Wooster builds its config from the environment (and .env) itself; it has no localMLX section,
 * so the environment is the usual source.
 */
import { SETTINGS, readSetting, type SettingName, type SettingValue, type SettingsEnv } from "@localmlx/client";
import type { AppConfig } from "./types";

export interface LocalMLXPluginSettings {
  /** TOOLS_LOCALMLX_ENABLED: offer the agent tools (the service is registered either way). */
  toolsEnabled: boolean;
  /** LOCALMLX_DEFAULT_MODEL: the model tools use until switch_model picks another. */
  defaultModel: string | undefined;
  /** LOCALMLX_VISION_MODEL: the model local_vision sends images to (one with the vision capability); undefined: none, and local_vision says how to set one. */
  visionModel: string | undefined;
  /** LOCALMLX_MAX_TOKENS: most tokens a tool generates per reply; undefined: the sidecar's default (its `initialize` says which). */
  maxTokens: number | undefined;
  /** LOCALMLX_TEMPERATURE: sampling temperature of the tools; undefined: the sidecar's default. */
  temperature: number | undefined;
  /** LOCALMLX_FALLBACK_TO_OPENAI: when local cannot serve, answer through the remote OpenAI-compatible server. */
  fallbackToOpenAI: boolean;
  /** LOCALMLX_AUTO_START_SERVER: start the loopback OpenAI-compatible endpoint when Wooster loads the plugin. */
  autoStartServer: boolean;
  /** LOCALMLX_SERVER_URL: where that endpoint listens (host and port). */
  serverUrl: string;
  /** LOCALMLX_SERVE_TIERS: the endpoint also listens on the loopback URLs of Wooster's routing tiers (router, fast, thinking, embeddings), each port serving its tier's model. */
  serveTiers: boolean;
  /** LOCALMLX_MODELS_DIR (sidecar). */
  modelsDir: string | undefined;
  /** LOCALMLX_AUTO_DOWNLOAD (sidecar): download a Hub model on first load. */
  autoDownload: boolean | undefined;
  /** LOCALMLX_QUANTIZATION (sidecar): 4bit, 8bit or none, for converting non-MLX downloads. */
  quantization: string | undefined;
  /** LOCALMLX_OFFLOAD_INACTIVE: `true` (5 minutes), `false`, or a keep-alive duration ("10m", seconds). */
  offloadInactive: string | undefined;
  /** LOCALMLX_PRELOAD_MODELS: `true` (the default model) or a comma list; warmed in the background after start-up. */
  preloadModels: string[];
  /** LOCALMLX_STREAM_RESPONSES: stream replies (to LangChain callbacks and the debug log) as they are generated. */
  streamResponses: boolean;
  /** LOCALMLX_ENABLE_CACHE (sidecar): the exact response cache. */
  enableCache: boolean | undefined;
  /** LOCALMLX_DRAFT_MODELS (sidecar): each target model's default draft model, for speculative decoding. */
  draftModels: Record<string, string> | undefined;
  /** LOCALMLX_PROFILES_DIR (sidecar): a directory of profiles (`<name>.toml`); undefined: the models dir's `profiles/`. */
  profilesDir: string | undefined;
  /** LOCALMLX_PYTHON: the Python that runs the sidecar. */
  python: string | undefined;
  /** LOCALMLX_HOSTFILE (sidecar): mlx.launch's hostfile JSON, to serve models sharded over its hosts; undefined: this machine alone. */
  hostfile: string | undefined;
  /** LOCALMLX_DISTRIBUTED_MODE (sidecar): pipeline or tensor. */
  distributedMode: SettingValue<"distributedMode"> | undefined;
  /** LOCALMLX_DISTRIBUTED_BACKEND (sidecar): ring, jaccl or any. */
  distributedBackend: SettingValue<"distributedBackend"> | undefined;
  /** LOCALMLX_DISTRIBUTED_LAUNCHER (sidecar): the command that starts a rank on its host; default ssh. */
  distributedLauncher: string | undefined;
  /** LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC (sidecar): allow a hostfile address on a public network. */
  distributedAllowPublic: boolean | undefined;
  /** LOCALMLX_DISTRIBUTED_TIMEOUT (sidecar): seconds without a heartbeat before a rank counts as lost. */
  distributedTimeout: number | undefined;
  /** The environment given to the sidecar: every LOCALMLX_* setting as written, the plugin's own spellings translated. */
  sidecarEnv: Record<string, string>;
}

/** Settings from `config.plugins.localMLX` as environment variables: a key of the client's
 * `SETTINGS` by its variable, another camelCase key as `LOCALMLX_SNAKE_CASE` (a sidecar setting,
 * passed on), an upper-case key as it is; a list as a comma list, as the variable spells it, and
 * an object (`draftModels: {target: draft}`) as its setting writes it. */
function fromConfig(config: AppConfig | undefined): Record<string, string> {
  const section = config?.plugins?.["localMLX"];
  const out: Record<string, string> = {};
  if (!section || typeof section !== "object") return out;
  for (const [key, value] of Object.entries(section as Record<string, unknown>)) {
    const text = Array.isArray(value)
      ? value.join(",")
      : key === "draftModels" && isPlainObject(value)
        ? SETTINGS.draftModels.format(Object.fromEntries(Object.entries(value).map(([target, draft]) => [target, String(draft)])))
        : value === undefined || value === null || typeof value === "object"
          ? undefined
          : String(value);
    if (text === undefined) continue;
    const known = Object.hasOwn(SETTINGS, key) ? SETTINGS[key as SettingName].env : undefined;
    const envKey = /^[A-Z0-9_]+$/.test(key) ? key : known ?? `LOCALMLX_${key.replace(/OpenAI/g, "Openai").replace(/([a-z0-9])([A-Z])/g, "$1_$2").toUpperCase()}`;
    out[envKey] = text;
  }
  return out;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The keep-alive the sidecar reads for the plugin's `LOCALMLX_OFFLOAD_INACTIVE` (`true`: 5 minutes; `false`: never). */
function offloadDuration(value: boolean | string | undefined): string | undefined {
  return value === true ? "5m" : value === false ? "-1" : value;
}

/**
 * The plugin's settings, read once (at `initialize`) through the client's settings table: the
 * environment over `config.plugins.localMLX`. A value that does not parse throws `SettingsError`
 * naming the variable (the plugin then does not load, as the sidecar would not start).
 */
export function readSettings(config?: AppConfig, env: SettingsEnv = process.env): LocalMLXPluginSettings {
  const merged: Record<string, string | undefined> = { ...fromConfig(config) };
  for (const [key, value] of Object.entries(env)) {
    if (value !== undefined && (key.startsWith("LOCALMLX_") || key === SETTINGS.toolsEnabled.env)) merged[key] = value;
  }
  const read = <K extends SettingName>(name: K): SettingValue<K> | undefined => readSetting(merged, name);

  const defaultModel = read("defaultModel");
  const preload = read("preloadModels");
  const preloadModels = preload === true ? [defaultModel ?? "default"] : preload === false || preload === undefined ? [] : preload;

  // Everything LOCALMLX_* goes to the sidecar as written (it ignores what it does not know, and
  // applies its own defaults), with the plugin's own spellings translated. Preloading is done by
  // the plugin (in the background, after start-up), not at sidecar start, so no call waits for it.
  const sidecarEnv: Record<string, string> = {};
  for (const [key, value] of Object.entries(merged)) if (key.startsWith("LOCALMLX_") && value !== undefined) sidecarEnv[key] = value;
  const offload = offloadDuration(read("offloadInactive"));
  if (offload !== undefined) sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE = offload;
  else delete sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE;
  sidecarEnv.LOCALMLX_PRELOAD_MODELS = "";

  return {
    toolsEnabled: read("toolsEnabled")!,
    defaultModel,
    visionModel: read("visionModel"),
    maxTokens: read("maxTokens"),
    temperature: read("temperature"),
    fallbackToOpenAI: read("fallbackToOpenAI") ?? false,
    autoStartServer: read("autoStartServer")!,
    serverUrl: read("serverUrl")!,
    serveTiers: read("serveTiers")!,
    modelsDir: read("modelsDir"),
    autoDownload: read("autoDownload"),
    quantization: read("quantization"),
    offloadInactive: offload,
    preloadModels,
    streamResponses: read("streamResponses")!,
    enableCache: read("enableCache"),
    draftModels: read("draftModels"),
    profilesDir: read("profilesDir"),
    python: read("python"),
    // Checked here (a bad value stops the plugin with the variable's name), passed on as written.
    hostfile: read("hostfile"),
    distributedMode: read("distributedMode"),
    distributedBackend: read("distributedBackend"),
    distributedLauncher: read("distributedLauncher"),
    distributedAllowPublic: read("distributedAllowPublic"),
    distributedTimeout: read("distributedTimeout"),
    sidecarEnv,
  };
}

/**
 * The plugin's settings: `LOCALMLX_*` (and two `TOOLS_`/`PLUGIN_` switches) from the environment,
 * over `config.plugins.localMLX` when Wooster's config holds an object there, over defaults.
 * Wooster builds its config from the environment (and .env) itself; it has no localMLX section,
 * so the environment is the usual source.
 */
import type { AppConfig } from "./types";

export interface LocalMLXPluginSettings {
  /** TOOLS_LOCALMLX_ENABLED: offer the ten agent tools (the service is registered either way). */
  toolsEnabled: boolean;
  /** LOCALMLX_DEFAULT_MODEL: the model tools use until switch_model picks another. */
  defaultModel: string | undefined;
  /** LOCALMLX_MAX_TOKENS: most tokens a tool generates per reply. */
  maxTokens: number;
  /** LOCALMLX_TEMPERATURE: sampling temperature of the tools. */
  temperature: number;
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
  /** LOCALMLX_PYTHON: the Python that runs the sidecar. */
  python: string | undefined;
  /** The environment given to the sidecar: every LOCALMLX_* setting, normalised. */
  sidecarEnv: Record<string, string>;
}

const TRUE = new Set(["1", "true", "yes", "on"]);
const FALSE = new Set(["0", "false", "no", "off", ""]);

function bool(value: string | undefined): boolean | undefined {
  if (value === undefined) return undefined;
  const v = value.trim().toLowerCase();
  if (TRUE.has(v)) return true;
  if (FALSE.has(v)) return false;
  return undefined;
}

function number(value: string | undefined, fallback: number, min: number, max: number): number {
  const parsed = value === undefined ? NaN : Number(value);
  return Number.isFinite(parsed) ? Math.min(max, Math.max(min, parsed)) : fallback;
}

/** Settings from `config.plugins.localMLX` (camelCase keys or LOCALMLX_* keys), as strings. */
function fromConfig(config: AppConfig | undefined): Record<string, string> {
  const section = config?.plugins?.["localMLX"];
  const out: Record<string, string> = {};
  if (!section || typeof section !== "object") return out;
  for (const [key, value] of Object.entries(section as Record<string, unknown>)) {
    if (value === undefined || value === null || typeof value === "object") continue;
    const envKey = /^[A-Z0-9_]+$/.test(key) ? key : `LOCALMLX_${key.replace(/OpenAI/g, "Openai").replace(/([a-z0-9])([A-Z])/g, "$1_$2").toUpperCase()}`;
    out[envKey] = String(value);
  }
  return out;
}

/** The offload setting as the sidecar's keep-alive duration. */
function offloadDuration(raw: string | undefined): string | undefined {
  if (raw === undefined) return undefined;
  const flag = bool(raw);
  if (flag === true) return "5m";
  if (flag === false) return "-1";
  return raw.trim();
}

export function readSettings(config?: AppConfig, env: NodeJS.ProcessEnv = process.env): LocalMLXPluginSettings {
  const merged: Record<string, string | undefined> = { ...fromConfig(config) };
  for (const [key, value] of Object.entries(env)) {
    if (value !== undefined && (key.startsWith("LOCALMLX_") || key === "TOOLS_LOCALMLX_ENABLED")) merged[key] = value;
  }
  const get = (key: string): string | undefined => {
    const value = merged[key];
    return value === undefined || value.trim() === "" ? undefined : value.trim();
  };

  const defaultModel = get("LOCALMLX_DEFAULT_MODEL");
  const preloadRaw = get("LOCALMLX_PRELOAD_MODELS");
  const preloadFlag = bool(preloadRaw);
  const preloadModels =
    preloadFlag === true
      ? [defaultModel ?? "default"]
      : preloadFlag === false || preloadRaw === undefined
        ? []
        : preloadRaw.split(",").map((m) => m.trim()).filter(Boolean);

  // Everything LOCALMLX_* goes to the sidecar (it ignores what it does not know), with the two
  // values whose plugin spelling the sidecar would reject translated. Preloading is done by the
  // plugin (in the background, after start-up), not at sidecar start, so no call waits for it.
  const sidecarEnv: Record<string, string> = {};
  for (const [key, value] of Object.entries(merged)) if (key.startsWith("LOCALMLX_") && value !== undefined) sidecarEnv[key] = value;
  const offload = offloadDuration(get("LOCALMLX_OFFLOAD_INACTIVE"));
  if (offload !== undefined) sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE = offload;
  else delete sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE;
  sidecarEnv.LOCALMLX_PRELOAD_MODELS = "";
  const maxTokens = Math.round(number(get("LOCALMLX_MAX_TOKENS"), 1024, 1, 1_000_000));
  const temperature = number(get("LOCALMLX_TEMPERATURE"), 0.7, 0, 2);
  // Numbers the sidecar would refuse (and fail to start over) are not passed on; the plugin's defaults stand.
  for (const [key, value] of [["LOCALMLX_MAX_TOKENS", maxTokens], ["LOCALMLX_TEMPERATURE", temperature]] as const) {
    if (Number.isFinite(Number(get(key)))) sidecarEnv[key] = String(value);
    else delete sidecarEnv[key];
  }

  return {
    toolsEnabled: bool(get("TOOLS_LOCALMLX_ENABLED")) ?? true,
    defaultModel,
    maxTokens,
    temperature,
    fallbackToOpenAI: bool(get("LOCALMLX_FALLBACK_TO_OPENAI")) ?? false,
    autoStartServer: bool(get("LOCALMLX_AUTO_START_SERVER")) ?? false,
    serverUrl: get("LOCALMLX_SERVER_URL") ?? "http://127.0.0.1:8000",
    serveTiers: bool(get("LOCALMLX_SERVE_TIERS")) ?? false,
    modelsDir: get("LOCALMLX_MODELS_DIR"),
    autoDownload: bool(get("LOCALMLX_AUTO_DOWNLOAD")),
    quantization: get("LOCALMLX_QUANTIZATION"),
    offloadInactive: offload,
    preloadModels,
    streamResponses: bool(get("LOCALMLX_STREAM_RESPONSES")) ?? false,
    enableCache: bool(get("LOCALMLX_ENABLE_CACHE")),
    python: get("LOCALMLX_PYTHON"),
    sidecarEnv,
  };
}

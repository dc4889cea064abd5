/**
 * Will Wooster stay local? Checks of a Wooster checkout, its settings and the endpoints they name,
 * each a finding with its fix. They follow what Wooster itself does (JussaMouse/wooster:
 * src/configLoader.ts builds the routing from the environment; src/routing/ModelRouterService.ts
 * health-checks ROUTING_LOCAL_SERVER_URL once, before plugins load, and sends the code agent to
 * OpenAI when it did not answer; src/routing/IntelligentRouter.ts calls the router, fast and
 * thinking tiers; src/embeddings/ embeds through MLX_EMBEDDINGS_URL only with
 * MLX_EMBEDDINGS_ENABLED=true). Shared by `localmlx-client wooster-doctor` and the Wooster plugin,
 * which logs the problems as warnings in Wooster's log.
 */
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { parse as parseDotenv } from "dotenv";
import { readSetting, SETTINGS } from "./settings";

/** `ok`: as it should be; `warn`: worth fixing, Wooster still stays local; `fail`: it will not (or the plugin cannot load). */
export type FindingLevel = "ok" | "warn" | "fail";

export interface ReadinessFinding {
  /** Stable: `node`, `dependencies`, `plugin`, `package`, `plugin-enabled`, `routing`, `url:<tier>`, `embeddings`, `embedding-dimensions`, `openai-key`, `localmlx-fallback`, `auto-start-server`, `endpoint:<tier>`, `embedding-model`. */
  id: string;
  level: FindingLevel;
  message: string;
  /** What to do about it (warn and fail findings). */
  fix?: string;
}

/** Wooster's environment as it will see it: its process environment over its `.env`. */
export type WoosterEnv = Readonly<Record<string, string | undefined>>;

export type WoosterTierName = "local" | "router" | "fast" | "thinking" | "embeddings";

/** An endpoint Wooster will call, with the URL it checks it by. */
export interface WoosterTier {
  name: WoosterTierName;
  /** The setting that names it, e.g. ROUTING_FAST_URL. */
  variable: string;
  url: string;
  model: string;
  /** The URL Wooster's own health check requests (GET). */
  healthUrl: string;
  /** Who in Wooster calls it, for messages. (The IntelligentRouter's tiers serve scheduled tasks and knowledge-base queries; the ModelRouter's local server, the REPL's code agent.) */
  usedBy: string;
}

/** Where Wooster sends its model calls, decided from its environment as its configLoader decides. */
export interface WoosterRouting {
  /** ROUTING_ENABLED is not "false": the ModelRouter routes at all. */
  routingEnabled: boolean;
  /** ROUTING_LOCAL_ENABLED=true or ROUTING_STRATEGY=intelligent (set explicitly): the ModelRouter tries local first. */
  localEnabled: boolean;
  /** The strategy (ROUTING_STRATEGY, default intelligent) is "intelligent": the IntelligentRouter calls the tiers. */
  intelligent: boolean;
  /** ROUTING_HEALTH_TIMEOUT: how long Wooster waits for a health check (ms). */
  healthTimeoutMs: number;
  embeddingsEnabled: boolean;
  /** MLX_EMBEDDINGS_DIMENSIONS as Wooster parses it (NaN when it cannot). */
  embeddingDimensions: number;
  /** The endpoints Wooster will call with these settings. */
  tiers: WoosterTier[];
}

export const WOOSTER_DEFAULTS = {
  localServerUrl: "http://127.0.0.1:8081",
  routerUrl: "http://127.0.0.1:8080",
  fastUrl: "http://127.0.0.1:8081",
  thinkingUrl: "http://127.0.0.1:8083",
  embeddingsUrl: "http://127.0.0.1:8084/v1",
  routerModel: "mlx-community/Qwen3-0.6B-4bit",
  fastModel: "mlx-community/Qwen3-30B-A3B-4bit",
  thinkingModel: "mlx-community/Qwen3-30B-A3B-Thinking-2507-4bit",
  embeddingsModel: "Qwen/Qwen3-Embedding-8B",
  embeddingDimensions: "4096",
  healthTimeoutMs: "2000",
  /** Wooster's README: Node.js 22 LTS (its native modules have prebuilt binaries for it). */
  nodeMajor: 22,
} as const;

const SERVICE_FIX = "start the localmlx endpoint before Wooster, and keep it running: `localmlx-client serve` (router :8080, fast :8081, thinking :8083, embeddings :8084)";

function setting(env: WoosterEnv, key: string, fallback: string): string {
  return env[key] || fallback; // Wooster's `process.env.X || default`: empty means the default
}

/** Wooster's `${url}/v1` for the OpenAI clients it builds from a tier URL. */
function v1Base(url: string): string {
  return url.endsWith("/v1") ? url : `${url.replace(/\/$/, "")}/v1`;
}

export function woosterRouting(env: WoosterEnv): WoosterRouting {
  const strategy = env.ROUTING_STRATEGY || "intelligent";
  const routingEnabled = env.ROUTING_ENABLED !== "false";
  const localEnabled = env.ROUTING_LOCAL_ENABLED === "true" || env.ROUTING_STRATEGY === "intelligent";
  const embeddingsEnabled = env.MLX_EMBEDDINGS_ENABLED === "true";
  const fastModel = setting(env, "ROUTING_FAST_MODEL", WOOSTER_DEFAULTS.fastModel);
  const tiers: WoosterTier[] = [];
  if (routingEnabled && localEnabled) {
    const url = setting(env, "ROUTING_LOCAL_SERVER_URL", WOOSTER_DEFAULTS.localServerUrl);
    // LocalModelClient.isHealthy: `${serverUrl}/v1/models`, as written.
    tiers.push({ name: "local", variable: "ROUTING_LOCAL_SERVER_URL", url, model: fastModel, healthUrl: `${url}/v1/models`, usedBy: "Wooster's agent (its ModelRouter)" });
  }
  if (strategy === "intelligent") {
    for (const [name, variable, fallbackUrl, modelVariable, fallbackModel] of [
      ["router", "ROUTING_ROUTER_URL", WOOSTER_DEFAULTS.routerUrl, "ROUTING_ROUTER_MODEL", WOOSTER_DEFAULTS.routerModel],
      ["fast", "ROUTING_FAST_URL", WOOSTER_DEFAULTS.fastUrl, "ROUTING_FAST_MODEL", WOOSTER_DEFAULTS.fastModel],
      ["thinking", "ROUTING_THINKING_URL", WOOSTER_DEFAULTS.thinkingUrl, "ROUTING_THINKING_MODEL", WOOSTER_DEFAULTS.thinkingModel],
    ] as const) {
      const url = setting(env, variable, fallbackUrl);
      // IntelligentRouter.checkTierHealth: `${serverUrl without a trailing /}/v1/models`.
      tiers.push({ name, variable, url, model: setting(env, modelVariable, fallbackModel), healthUrl: `${url.replace(/\/$/, "")}/v1/models`, usedBy: `Wooster's ${name} tier` });
    }
  }
  if (embeddingsEnabled) {
    const url = setting(env, "MLX_EMBEDDINGS_URL", WOOSTER_DEFAULTS.embeddingsUrl);
    tiers.push({ name: "embeddings", variable: "MLX_EMBEDDINGS_URL", url, model: setting(env, "MLX_EMBEDDINGS_MODEL", WOOSTER_DEFAULTS.embeddingsModel), healthUrl: `${v1Base(url)}/models`, usedBy: "Wooster's embeddings (projects, user profile)" });
  }
  return {
    routingEnabled,
    localEnabled,
    intelligent: strategy === "intelligent",
    healthTimeoutMs: parseInt(setting(env, "ROUTING_HEALTH_TIMEOUT", WOOSTER_DEFAULTS.healthTimeoutMs), 10) || 2000,
    embeddingsEnabled,
    embeddingDimensions: parseInt(setting(env, "MLX_EMBEDDINGS_DIMENSIONS", WOOSTER_DEFAULTS.embeddingDimensions), 10),
    tiers,
  };
}

/** Wooster's environment: `<dir>/.env` parsed as Wooster's dotenv parses it, under the process environment (dotenv does not override what is set). */
export function readWoosterEnv(dir: string, processEnv: WoosterEnv = process.env): { env: Record<string, string | undefined>; dotenvFile: string | undefined } {
  const file = join(resolve(dir), ".env");
  const fromFile = existsSync(file) ? parseDotenv(readFileSync(file)) : {};
  const env: Record<string, string | undefined> = { ...fromFile };
  for (const [key, value] of Object.entries(processEnv)) if (value !== undefined) env[key] = value;
  return { env, dotenvFile: existsSync(file) ? file : undefined };
}

const LOOPBACK = new Set(["127.0.0.1", "localhost", "::1", "[::1]"]);
const PLACEHOLDER_KEY = "YOUR_OPENAI_API_KEY";

/** Findings from the settings alone (no files, no network): instant. */
export function checkWoosterEnv(env: WoosterEnv): ReadinessFinding[] {
  const routing = woosterRouting(env);
  const findings: ReadinessFinding[] = [];

  const enabled = env.PLUGIN_LOCALMLX_ENABLED;
  findings.push(
    enabled !== undefined && enabled.toLowerCase() !== "true"
      ? { id: "plugin-enabled", level: "warn", message: `PLUGIN_LOCALMLX_ENABLED=${enabled}: Wooster skips the localMLX plugin, so its tools are not offered (the endpoint, if running, still serves Wooster).`, fix: "set PLUGIN_LOCALMLX_ENABLED=true" }
      : { id: "plugin-enabled", level: "ok", message: `the localMLX plugin loads (PLUGIN_LOCALMLX_ENABLED ${enabled === undefined ? "unset: Wooster loads plugins unless told not to" : "=true"}).` },
  );

  if (!routing.routingEnabled) {
    findings.push({ id: "routing", level: "fail", message: "ROUTING_ENABLED=false: Wooster's ModelRouter sends every agent call to OpenAI.", fix: "remove ROUTING_ENABLED=false and set ROUTING_LOCAL_ENABLED=true" });
  } else if (!routing.localEnabled) {
    findings.push({
      id: "routing",
      level: "fail",
      message: `Wooster's agent does not try local models: its ModelRouter tries them only with ROUTING_LOCAL_ENABLED=true (or ROUTING_STRATEGY=intelligent set explicitly), and sends the agent to OpenAI (${env.OPENAI_MODEL_NAME || "gpt-4o-mini"}) otherwise.`,
      fix: "set ROUTING_LOCAL_ENABLED=true",
    });
  } else {
    findings.push({ id: "routing", level: "ok", message: `Wooster's agent tries local models first (${env.ROUTING_LOCAL_ENABLED === "true" ? "ROUTING_LOCAL_ENABLED=true" : "ROUTING_STRATEGY=intelligent"}).` });
  }

  for (const tier of routing.tiers) {
    let url: URL | undefined;
    try {
      url = new URL(tier.url);
    } catch {
      findings.push({ id: `url:${tier.name}`, level: "fail", message: `${tier.variable}=${tier.url} is not a URL: ${tier.usedBy} cannot reach it.`, fix: `set ${tier.variable} to an http:// URL such as ${defaultUrlOf(tier)}` });
      continue;
    }
    if (!LOOPBACK.has(url.hostname)) {
      findings.push({ id: `url:${tier.name}`, level: "warn", message: `${tier.variable}=${tier.url} is not on this machine: ${tier.usedBy} leaves it.`, fix: `point ${tier.variable} at the localmlx endpoint on this machine, e.g. ${defaultUrlOf(tier)}` });
    } else if (tier.name !== "embeddings" && /\/v1\/?$/.test(url.pathname)) {
      findings.push({ id: `url:${tier.name}`, level: "fail", message: `${tier.variable}=${tier.url} ends in /v1: Wooster adds /v1 itself, so its health check asks ${tier.healthUrl} and finds nothing.`, fix: `set ${tier.variable}=${tier.url.replace(/\/v1\/?$/, "")}` });
    } else {
      findings.push({ id: `url:${tier.name}`, level: "ok", message: `${tier.usedBy}: ${tier.url} (${tier.variable}${env[tier.variable] ? "" : ", Wooster's default"}).` });
    }
  }

  if (!routing.embeddingsEnabled) {
    findings.push({
      id: "embeddings",
      level: "fail",
      message: `MLX_EMBEDDINGS_ENABLED is not true: Wooster embeds project documents with OpenAI (${env.OPENAI_EMBEDDING_MODEL_NAME || "text-embedding-3-small"}).`,
      fix: "set MLX_EMBEDDINGS_ENABLED=true, with MLX_EMBEDDINGS_MODEL and MLX_EMBEDDINGS_DIMENSIONS for the embedding model the endpoint serves",
    });
  } else {
    findings.push({ id: "embeddings", level: "ok", message: `Wooster embeds through ${setting(env, "MLX_EMBEDDINGS_URL", WOOSTER_DEFAULTS.embeddingsUrl)} (MLX_EMBEDDINGS_ENABLED=true).` });
    const dims = routing.embeddingDimensions;
    findings.push(
      Number.isFinite(dims) && dims > 0
        ? { id: "embedding-dimensions", level: "ok", message: `Wooster expects ${dims}-dimensional vectors (MLX_EMBEDDINGS_DIMENSIONS${env.MLX_EMBEDDINGS_DIMENSIONS ? "" : " unset: Wooster's default for Qwen3-Embedding-8B"}).` }
        : { id: "embedding-dimensions", level: "fail", message: `MLX_EMBEDDINGS_DIMENSIONS=${env.MLX_EMBEDDINGS_DIMENSIONS} is not a number of dimensions.`, fix: "set MLX_EMBEDDINGS_DIMENSIONS to the embedding model's vector size" },
    );
  }

  const key = readSetting(env, "openAIApiKey");
  findings.push(
    key && !key.startsWith(PLACEHOLDER_KEY)
      ? { id: "openai-key", level: "ok", message: "OPENAI_API_KEY is set: where a local endpoint does not answer Wooster's start-up health check, Wooster's agent uses OpenAI with it (the endpoint checks say whether they answer)." }
      : { id: "openai-key", level: "ok", message: "OPENAI_API_KEY is not set: nothing can be answered by OpenAI; where a local endpoint does not answer, those calls fail." },
  );

  findings.push(
    pluginSwitch(env, "fallbackToOpenAI", findings)
      ? { id: "localmlx-fallback", level: "warn", message: "LOCALMLX_FALLBACK_TO_OPENAI is on: the plugin's tools answer through OpenAI when the local model cannot (each such answer is logged).", fix: "set LOCALMLX_FALLBACK_TO_OPENAI=false to keep every answer local" }
      : { id: "localmlx-fallback", level: "ok", message: "LOCALMLX_FALLBACK_TO_OPENAI is off: the plugin never answers through OpenAI." },
  );

  if (pluginSwitch(env, "autoStartServer", findings)) {
    findings.push({
      id: "auto-start-server",
      level: "warn",
      message:
        "LOCALMLX_AUTO_START_SERVER is on: the plugin starts its endpoint only when Wooster loads plugins, after Wooster has checked ROUTING_LOCAL_SERVER_URL (once, at start-up); unless another endpoint answered there first, Wooster's agent uses OpenAI for the whole session.",
      fix: `${SERVICE_FIX}; and set LOCALMLX_AUTO_START_SERVER=false`,
    });
  }
  return findings;
}

/** One of the plugin's switches as the plugin reads it; a value it cannot read is a finding (the plugin would not load). */
function pluginSwitch(env: WoosterEnv, name: "fallbackToOpenAI" | "autoStartServer", findings: ReadinessFinding[]): boolean {
  try {
    return readSetting(env, name) === true;
  } catch (error) {
    const variable = SETTINGS[name].env;
    findings.push({ id: `setting:${variable}`, level: "fail", message: `${(error as Error).message}: the localMLX plugin does not load with it.`, fix: `set ${variable} to true or false` });
    return false;
  }
}

function defaultUrlOf(tier: WoosterTier): string {
  return {
    local: WOOSTER_DEFAULTS.localServerUrl,
    router: WOOSTER_DEFAULTS.routerUrl,
    fast: WOOSTER_DEFAULTS.fastUrl,
    thinking: WOOSTER_DEFAULTS.thinkingUrl,
    embeddings: WOOSTER_DEFAULTS.embeddingsUrl,
  }[tier.name];
}

// ---- the checkout: Node, Wooster's dependencies, the plugin and its package ------------------

export interface WoosterInstallOptions {
  /** The Node version that will run Wooster (default: this process's). */
  nodeVersion?: string;
  /** The plugin's files as this package ships them (default: its `wooster/` folder). */
  pluginSource?: string;
}

export const PLUGIN_DIR = join("src", "plugins", "localMLX");

/** The plugin's files as shipped: every .ts in `wooster/` but tests. */
export function shippedPluginFiles(source: string): string[] {
  return readdirSync(source).filter((name) => name.endsWith(".ts") && !name.endsWith(".test.ts")).sort();
}

/**
 * Where `@localmlx/client` resolves from `fromDir`, or undefined: as Node resolves the plugin's
 * import. (A require of this package's own, even with `paths`, would find the package itself by
 * self-reference: so a require made in `fromDir`.)
 */
export function resolveClientFrom(fromDir: string): { path: string; version: string } | undefined {
  try {
    const requireThere = createRequire(join(resolve(fromDir), "index.js"));
    const main = requireThere.resolve("@localmlx/client");
    const pkgFile = requireThere.resolve("@localmlx/client/package.json");
    return { path: main, version: (JSON.parse(readFileSync(pkgFile, "utf8")) as { version: string }).version };
  } catch {
    return undefined;
  }
}

/** Findings about the checkout itself: the Node that runs it, its dependencies, the plugin's files and package. */
export function checkWoosterInstall(dir: string, options: WoosterInstallOptions = {}): ReadinessFinding[] {
  const root = resolve(dir);
  const findings: ReadinessFinding[] = [];
  const nodeVersion = options.nodeVersion ?? process.version;
  const major = Number(/^v?(\d+)/.exec(nodeVersion)?.[1]);
  let engines: string | undefined;
  try {
    engines = (JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { engines?: { node?: string } }).engines?.node;
  } catch {
    engines = undefined;
  }
  const wanted = Number(/(\d+)/.exec(engines ?? "")?.[1]) || WOOSTER_DEFAULTS.nodeMajor;
  const wants = engines ? `Wooster's engines say node ${engines}` : `Wooster's README asks for Node.js ${wanted} LTS`;
  if (!(major >= wanted)) {
    findings.push({ id: "node", level: "fail", message: `Node ${nodeVersion}: ${wants}; its native modules (better-sqlite3, hnswlib-node, isolated-vm) need it.`, fix: `install Node ${wanted} (e.g. \`nvm install ${wanted} && nvm use ${wanted}\`), then reinstall Wooster's dependencies` });
  } else if (!engines && major > wanted) {
    findings.push({ id: "node", level: "warn", message: `Node ${nodeVersion}: ${wants}; on newer Node its native modules may need building from source.`, fix: `use Node ${wanted} (e.g. \`nvm use ${wanted}\`) if \`pnpm install\` fails to build them` });
  } else {
    findings.push({ id: "node", level: "ok", message: `Node ${nodeVersion} (${wants}).` });
  }

  findings.push(
    existsSync(join(root, "node_modules"))
      ? { id: "dependencies", level: "ok", message: "Wooster's dependencies are installed (node_modules)." }
      : { id: "dependencies", level: "fail", message: "Wooster's dependencies are not installed (no node_modules): Wooster cannot start.", fix: `run \`pnpm install\` in ${root}` },
  );

  const pluginDir = join(root, PLUGIN_DIR);
  // Not `npx @localmlx/client`: with no plugin, Wooster does not depend on the package, so npx would
  // ask the npm registry for it (not published: E404). The command `npm install -g` put on PATH.
  const installer = `localmlx-client wooster-install ${root}`;
  if (!existsSync(join(pluginDir, "index.ts"))) {
    findings.push({ id: "plugin", level: "warn", message: `the localMLX plugin is not installed (no ${join(PLUGIN_DIR, "index.ts")}): Wooster can use the endpoint, but not the plugin's tools.`, fix: `run \`${installer}\`` });
    return findings;
  }
  const source = options.pluginSource ?? join(__dirname, "..", "wooster");
  if (existsSync(source)) {
    const differ = shippedPluginFiles(source).filter((name) => {
      const installed = join(pluginDir, name);
      return !existsSync(installed) || !readFileSync(installed).equals(readFileSync(join(source, name)));
    });
    findings.push(
      differ.length
        ? { id: "plugin", level: "warn", message: `the localMLX plugin in ${PLUGIN_DIR} is not this @localmlx/client's (${differ.join(", ")} differ).`, fix: `run \`${installer}\` to update it` }
        : { id: "plugin", level: "ok", message: `the localMLX plugin is installed and current (${PLUGIN_DIR}).` },
    );
  }
  const client = resolveClientFrom(pluginDir);
  findings.push(
    client
      ? { id: "package", level: "ok", message: `@localmlx/client ${client.version} resolves from the plugin folder (${client.path}).` }
      : { id: "package", level: "fail", message: "@localmlx/client does not resolve from the plugin folder: Wooster cannot load the plugin.", fix: `run \`${installer}\` (it installs the package and checks it resolves)` },
  );
  return findings;
}

// ---- the endpoints ---------------------------------------------------------------------------

export interface WoosterEndpointOptions {
  /** Ends the checks early. */
  signal?: AbortSignal;
  /** How long to wait for an embedding (ms); a model may have to load first. Default 30 s, Wooster's. */
  embeddingTimeoutMs?: number;
}

interface Answer {
  status?: number;
  servedBy?: string | null;
  body?: unknown;
  ms: number;
  error?: string;
}

async function ask(url: string, timeoutMs: number, signal: AbortSignal | undefined, body?: unknown): Promise<Answer> {
  const started = Date.now();
  const timeout = AbortSignal.timeout(timeoutMs);
  try {
    const response = await fetch(url, {
      method: body === undefined ? "GET" : "POST",
      signal: signal ? AbortSignal.any([timeout, signal]) : timeout,
      ...(body === undefined ? {} : { headers: { "content-type": "application/json" }, body: JSON.stringify(body) }),
    });
    const text = await response.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON: kept as text
    }
    return { status: response.status, servedBy: response.headers.get("x-localmlx-served-by"), body: parsed, ms: Date.now() - started };
  } catch (error) {
    const cause = (error as { cause?: { code?: string; message?: string } }).cause;
    const reason = (error as Error).name === "TimeoutError" ? `no answer within ${timeoutMs} ms` : cause?.code ?? cause?.message ?? (error as Error).message;
    return { ms: Date.now() - started, error: reason };
  }
}

function modelIds(body: unknown): string[] | undefined {
  const data = (body as { data?: unknown } | undefined)?.data;
  return Array.isArray(data) ? data.map((m) => String((m as { id?: unknown }).id)) : undefined;
}

function errorText(answer: Answer): string {
  const message = (answer.body as { error?: { message?: string } } | undefined)?.error?.message;
  return `HTTP ${answer.status}${message ? `: ${message}` : ""}`;
}

/** What happens when this tier does not answer. */
function consequence(tier: WoosterTier): string {
  if (tier.name === "local") return "Wooster's agent falls back to OpenAI for the whole session";
  if (tier.name === "embeddings") return "Wooster's embeddings fail";
  return `Wooster's ${tier.name}-tier calls fail`;
}

async function checkTier(tier: WoosterTier, timeoutMs: number, signal?: AbortSignal): Promise<ReadinessFinding> {
  const id = `endpoint:${tier.name}`;
  // Generous first: a sidecar may be starting; then held to Wooster's own timeout.
  let answer = await ask(tier.healthUrl, Math.max(timeoutMs, 10_000), signal);
  let warmed = false;
  if (answer.error === undefined && answer.ms > timeoutMs) {
    warmed = true;
    answer = await ask(tier.healthUrl, Math.max(timeoutMs, 10_000), signal);
  }
  if (answer.error !== undefined) {
    return { id, level: "fail", message: `nothing answers at ${tier.healthUrl} (${answer.error}): ${consequence(tier)}.`, fix: SERVICE_FIX };
  }
  const ids = modelIds(answer.body);
  if (answer.status !== 200 || !ids) {
    const hint = tier.name !== "embeddings" && /\/v1\/?$/.test(tier.url) ? `set ${tier.variable}=${tier.url.replace(/\/v1\/?$/, "")}` : `point ${tier.variable} at the localmlx endpoint (${defaultUrlOf(tier)}) and ${SERVICE_FIX}`;
    return { id, level: "fail", message: `${tier.healthUrl} answers ${answer.status === 200 ? "without a model list" : errorText(answer)}: Wooster counts it down, so ${consequence(tier)}.`, fix: hint };
  }
  if (answer.ms > timeoutMs) {
    return { id, level: "fail", message: `${tier.healthUrl} answered in ${answer.ms} ms, twice: Wooster gives up after ${timeoutMs} ms (ROUTING_HEALTH_TIMEOUT), so ${consequence(tier)}.`, fix: "find why the endpoint is slow to list its models, or raise ROUTING_HEALTH_TIMEOUT" };
  }
  if (answer.servedBy === "remote") {
    return { id, level: "fail", message: `${tier.healthUrl} is a localmlx endpoint answering from its remote fallback: its local models are not serving.`, fix: "see the endpoint's log for why local cannot serve (LOCALMLX_PYTHON, the model)" };
  }
  if (answer.servedBy !== "local") {
    return { id, level: "warn", message: `${tier.healthUrl} answers, but is not localmlx (no x-localmlx-served-by header): another OpenAI-compatible server serves ${tier.usedBy}.`, fix: `if that is not meant, stop it and ${SERVICE_FIX}` };
  }
  const note = warmed ? " (its first answer was slow: it was starting)" : "";
  return { id, level: "ok", message: `${tier.healthUrl} is localmlx, answering in ${answer.ms} ms${note} (models: ${ids.join(", ") || "none listed"}).` };
}

/** Embeds one text as Wooster does (model and dimensions in the request) and compares the vector's size with MLX_EMBEDDINGS_DIMENSIONS. */
async function checkEmbeddingModel(tier: WoosterTier, dims: number, timeoutMs: number, signal?: AbortSignal): Promise<ReadinessFinding> {
  const id = "embedding-model";
  const url = `${v1Base(tier.url)}/embeddings`;
  const request = { input: ["Will Wooster stay local?"], model: tier.model };
  const vectorOf = (answer: Answer): number[] | undefined => {
    const vector = (answer.body as { data?: Array<{ embedding?: unknown }> } | undefined)?.data?.[0]?.embedding;
    return answer.status === 200 && Array.isArray(vector) ? (vector as number[]) : undefined;
  };
  const answer = await ask(url, timeoutMs, signal, { ...request, dimensions: dims });
  const vector = vectorOf(answer);
  if (answer.servedBy === "remote") {
    return { id, level: "fail", message: `${url} embedded ${tier.model} through its remote fallback, not locally.`, fix: "see the endpoint's log for why the local embedding model cannot serve" };
  }
  if (vector && vector.length === dims) {
    return { id, level: "ok", message: `${tier.model} gives ${dims}-dimensional vectors, as MLX_EMBEDDINGS_DIMENSIONS says.` };
  }
  // Not the size asked for: learn the model's own size.
  const plain = vector ? answer : await ask(url, timeoutMs, signal, request);
  const size = vectorOf(plain)?.length;
  if (size !== undefined) {
    return {
      id,
      level: "fail",
      message: `${tier.model} gives ${size}-dimensional vectors, and Wooster asks for ${dims} (MLX_EMBEDDINGS_DIMENSIONS): ${vector ? "its vector stores get vectors of the wrong size" : `the endpoint refuses (${errorText(answer)})`}.`,
      fix: `set MLX_EMBEDDINGS_DIMENSIONS=${size}${vector ? "" : ` (or less)`}, then run \`rebuild embeddings\` in Wooster`,
    };
  }
  const why = answer.error ?? errorText(answer);
  return { id, level: "fail", message: `${url} does not embed with ${tier.model} (${why}): ${consequence(tier)}.`, fix: "serve an embedding model on the embeddings endpoint and name it in MLX_EMBEDDINGS_MODEL (the endpoint's embeddings tier answers whatever name is asked)" };
}

/** Findings from asking each endpoint Wooster will call: its health URL, and an embedding as Wooster requests one. */
export async function checkWoosterEndpoints(env: WoosterEnv, options: WoosterEndpointOptions = {}): Promise<ReadinessFinding[]> {
  const routing = woosterRouting(env);
  const usable = routing.tiers.filter((tier) => URL.canParse(tier.url));
  const findings = await Promise.all(usable.map((tier) => checkTier(tier, routing.healthTimeoutMs, options.signal)));
  const embeddings = usable.find((tier) => tier.name === "embeddings");
  const embeddingsUp = findings.find((f) => f.id === "endpoint:embeddings" && f.level !== "fail");
  if (embeddings && embeddingsUp && Number.isFinite(routing.embeddingDimensions) && routing.embeddingDimensions > 0) {
    findings.push(await checkEmbeddingModel(embeddings, routing.embeddingDimensions, options.embeddingTimeoutMs ?? 30_000, options.signal));
  }
  return findings;
}

export interface WoosterReadiness {
  /** True when no finding fails: Wooster's agent and embeddings stay on this machine. */
  staysLocal: boolean;
  findings: ReadinessFinding[];
}

export interface CheckWoosterOptions extends WoosterInstallOptions, WoosterEndpointOptions {
  /** The checkout; omit to check the settings and endpoints only. */
  dir?: string;
  /** Wooster's environment (default: `readWoosterEnv(dir)`, else this process's). */
  env?: WoosterEnv;
  /** Ask the endpoints (default true). */
  network?: boolean;
}

/** Every check, in order: the checkout, the settings, the endpoints. */
export async function checkWooster(options: CheckWoosterOptions = {}): Promise<WoosterReadiness> {
  const env = options.env ?? (options.dir ? readWoosterEnv(options.dir).env : process.env);
  const findings = [
    ...(options.dir ? checkWoosterInstall(options.dir, options) : []),
    ...checkWoosterEnv(env),
    ...(options.network === false ? [] : await checkWoosterEndpoints(env, options)),
  ];
  return { staysLocal: findings.every((f) => f.level !== "fail"), findings };
}

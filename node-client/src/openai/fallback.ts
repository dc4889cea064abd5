/**
 * Fallback to a remote OpenAI-compatible server when the local sidecar cannot serve: it is not
 * installed or failed to start, its crash budget is spent, the model is missing (and not
 * downloadable), it stayed busy past a deadline, or memory ran out. After a failure of the whole
 * sidecar, requests go straight to the remote for a cool-down; the first request after it tries
 * local again.
 *
 * Small and reusable: the OpenAI endpoint uses it for every route, and `chatWithFallback()` /
 * `embedWithFallback()` give the same behaviour to code that calls models directly (the Wooster
 * plugin's tools).
 *
 * Never silent: every request that leaves the machine goes through `Fallback.request()`, which
 * logs it at warning level with its reason. `LOCALMLX_FALLBACK_TO_OPENAI=false` is a guarantee:
 * no fallback is made from options then, and `request()` refuses to send anything.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { RpcError } from "../errors";
import { retry } from "../retry";
import { readSetting, type SettingsEnv } from "../settings";
import { isFallbackWorthy, isSidecarDown, OpenAIHttpError, toOpenAIError } from "./errors";
import type { LocalMLX, Logger } from "../client";
import { LocalBackend } from "../backend";
import { embedLocal, gather, resolveModel, startChat, type ModelRouting } from "./local";
import {
  chatCompletionOf,
  chatParamsOf,
  embedParamsOf,
  embeddingsOf,
  requestedModel,
  requireObject,
  responseMeta,
  type ChatCompletion,
  type EmbeddingsResponse,
  type JsonObject,
} from "./translate";

/** Who answered: the local sidecar, or the remote OpenAI-compatible server. */
export type ServedBy = "local" | "remote";

export interface FallbackOptions {
  /** The remote's base URL, `/v1` included. Default `OPENAI_BASE_URL`, else `https://api.openai.com/v1`. */
  baseURL?: string;
  /** Sent as `Authorization: Bearer …`. Default `OPENAI_API_KEY`. */
  apiKey?: string;
  /**
   * The model to ask the remote for: a name, or a function of the name the client asked for.
   * Default `LOCALMLX_FALLBACK_MODEL`, else the name the client asked for.
   */
  model?: string | ((requested: string | undefined) => string | undefined);
  /** After the sidecar failed as a whole, requests go to the remote for this long. Default 30000. */
  cooldownMs?: number;
  /** A busy sidecar (-32015) is retried until this deadline, then the remote serves. Default 10000. */
  busyDeadlineMs?: number;
  /** Timeout of a remote request (until its headers arrive). Default 600000. */
  timeoutMs?: number;
  /** Extra headers for the remote. */
  headers?: Record<string, string>;
  /** The fetch to use. Default: node's global `fetch`. */
  fetch?: typeof fetch;
  /** Where the warning about each request sent to the remote goes (`warn`). Default: stderr. */
  logger?: Logger;
}

/** True when `LOCALMLX_FALLBACK_TO_OPENAI` says no (`false`, `0`, `no`, `off`): nothing may go remote. */
export function remoteForbidden(env: SettingsEnv = process.env): boolean {
  return readSetting(env, "fallbackToOpenAI") === false;
}

/** Why the request in progress goes remote: set by `runWithFallback`, read by `Fallback.request`. */
const remoteReason = new AsyncLocalStorage<string>();

const stderrLogger: Logger = { warn: (message) => void process.stderr.write(`${message}\n`) };

/**
 * Fallback settings from the environment: enabled by `LOCALMLX_FALLBACK_TO_OPENAI=true`, with
 * `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `LOCALMLX_FALLBACK_MODEL` and
 * `LOCALMLX_FALLBACK_COOLDOWN_MS`. Undefined when it is off.
 */
export function fallbackOptionsFromEnv(env: SettingsEnv = process.env): FallbackOptions | undefined {
  if (readSetting(env, "fallbackToOpenAI") !== true) return undefined;
  return remoteOptionsFromEnv(env);
}

/** The remote's address, key, model and cool-down from the environment, whether the fallback is on or not. */
export function remoteOptionsFromEnv(env: SettingsEnv = process.env): FallbackOptions {
  const baseURL = readSetting(env, "openAIBaseURL");
  const apiKey = readSetting(env, "openAIApiKey");
  const model = readSetting(env, "fallbackModel");
  const cooldownMs = readSetting(env, "fallbackCooldownMs");
  return {
    ...(baseURL !== undefined ? { baseURL } : {}),
    ...(apiKey !== undefined ? { apiKey } : {}),
    ...(model !== undefined ? { model } : {}),
    ...(cooldownMs !== undefined ? { cooldownMs } : {}),
  };
}

/** `LOCALMLX_FALLBACK_TO_OPENAI=false`, yet something asked to send a request remote: refused (503). */
export class RemoteForbiddenError extends OpenAIHttpError {
  override name = "RemoteForbiddenError";

  constructor(baseURL: string, path: string) {
    super(503, `Not sent to ${baseURL}${path}: LOCALMLX_FALLBACK_TO_OPENAI=false keeps every request on this machine`, "server_error", null, "fallback_forbidden");
  }
}

/** The remote could not be reached (network, DNS, refused): the request fails with 502. */
export class RemoteUnreachableError extends OpenAIHttpError {
  override name = "RemoteUnreachableError";

  constructor(baseURL: string, cause: unknown) {
    super(502, `The fallback server ${baseURL} could not be reached: ${(cause as Error)?.message ?? String(cause)}`, "server_error", null, "fallback_unreachable");
  }
}

/**
 * The fallback's state (the cool-down) and the remote's address. Share one instance between
 * calls so the cool-down holds across them. What `options` leave out comes from `env`, read once
 * here; `LOCALMLX_FALLBACK_TO_OPENAI=false` there makes every `request()` refuse.
 */
export class Fallback {
  readonly baseURL: string;
  readonly cooldownMs: number;
  readonly busyDeadlineMs: number;
  /** Gets one warning per request sent to the remote (its method, URL, model and reason). */
  logger: Logger;
  private downUntil = 0;
  private readonly apiKey: string | undefined;
  private readonly model: FallbackOptions["model"];
  private readonly forbidden: boolean;

  constructor(
    readonly options: FallbackOptions = {},
    env: SettingsEnv = process.env,
  ) {
    const fromEnv = remoteOptionsFromEnv(env);
    this.baseURL = (options.baseURL ?? fromEnv.baseURL ?? "https://api.openai.com/v1").replace(/\/+$/, "");
    this.apiKey = options.apiKey ?? fromEnv.apiKey;
    this.model = options.model ?? fromEnv.model;
    this.forbidden = remoteForbidden(env);
    this.cooldownMs = options.cooldownMs ?? 30_000;
    this.busyDeadlineMs = options.busyDeadlineMs ?? 10_000;
    this.logger = options.logger ?? stderrLogger;
  }

  /** True while the sidecar is cooling down after failing as a whole: requests go straight to the remote. */
  get coolingDown(): boolean {
    return Date.now() < this.downUntil;
  }

  /** The remote may serve a request that failed locally this way. */
  canServe(error: unknown): boolean {
    return isFallbackWorthy(error);
  }

  /** A local failure: one of the whole sidecar starts the cool-down. */
  noteLocalFailure(error: unknown): void {
    if (isSidecarDown(error)) this.downUntil = Date.now() + this.cooldownMs;
  }

  /** Local served: the cool-down is over. */
  noteLocalSuccess(): void {
    this.downUntil = 0;
  }

  /** Ends the cool-down now: the next request tries local. */
  reset(): void {
    this.downUntil = 0;
  }

  /** The model name to send the remote. */
  remoteModel(requested: string | undefined): string | undefined {
    const model = this.model;
    if (typeof model === "function") return model(requested);
    return model || requested;
  }

  /**
   * A request to the remote (`path` under the base URL, e.g. `/chat/completions`), logged at
   * warning level with `reason` (default: the one `runWithFallback` gave). Rejects when it is
   * unreachable, and with `RemoteForbiddenError` under `LOCALMLX_FALLBACK_TO_OPENAI=false`.
   */
  async request(method: "GET" | "POST", path: string, body?: JsonObject, signal?: AbortSignal, reason?: string): Promise<Response> {
    if (this.forbidden) throw new RemoteForbiddenError(this.baseURL, path);
    const why = reason ?? remoteReason.getStore() ?? "no reason given";
    const model = typeof body?.model === "string" ? ` (model ${body.model})` : "";
    this.logger.warn?.(`localmlx fallback: sending ${method} ${this.baseURL}${path}${model} off this machine: ${why}`);
    const headers: Record<string, string> = { accept: "application/json, text/event-stream", ...this.options.headers };
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const timeout = AbortSignal.timeout(this.options.timeoutMs ?? 600_000);
    const fetchImpl = this.options.fetch ?? fetch;
    try {
      return await fetchImpl(`${this.baseURL}${path}`, {
        method,
        headers,
        body: body === undefined ? null : JSON.stringify(body),
        signal: signal ? anySignal(signal, timeout) : timeout,
      });
    } catch (error) {
      if (signal?.aborted) throw error;
      throw new RemoteUnreachableError(this.baseURL, error);
    }
  }

  /** A body for the remote: the client's own, with the remote's model name. */
  remoteBody(body: JsonObject): JsonObject {
    const model = this.remoteModel(requestedModel(body));
    return model === undefined ? body : { ...body, model };
  }
}

/** The default fallback of `chatWithFallback()`: from the environment, one per process (so its cool-down holds). */
let envFallback: Fallback | false | undefined;
function defaultFallback(env: SettingsEnv): Fallback | undefined {
  if (env !== process.env) return fallbackFromEnv(env);
  envFallback ??= fallbackFromEnv(env) ?? false;
  return envFallback || undefined;
}

function fallbackFromEnv(env: SettingsEnv): Fallback | undefined {
  const options = fallbackOptionsFromEnv(env);
  return options ? new Fallback(options, env) : undefined;
}

/** `Fallback`, options for one, `false` (off), or undefined (from the environment). */
export type FallbackSetting = Fallback | FallbackOptions | false | undefined;

/** The fallback a setting means, under the environment's word (`LOCALMLX_FALLBACK_TO_OPENAI=false`: none). */
export function fallbackOf(setting: FallbackSetting, env: SettingsEnv = process.env): Fallback | undefined {
  if (setting === false || remoteForbidden(env)) return undefined;
  if (setting === undefined) return defaultFallback(env);
  return setting instanceof Fallback ? setting : new Fallback(setting, env);
}

/** `AbortSignal.any` (Node 20.3+), with a fallback for older Node 20 releases. */
function anySignal(a: AbortSignal, b: AbortSignal): AbortSignal {
  if (typeof AbortSignal.any === "function") return AbortSignal.any([a, b]);
  const controller = new AbortController();
  for (const signal of [a, b]) {
    if (signal.aborted) controller.abort(signal.reason);
    else signal.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
  }
  return controller.signal;
}

/** Worth trying again shortly: the sidecar is busy, or the model is still loading (`RpcError.retryable`). */
function isRetryable(error: unknown): boolean {
  return error instanceof RpcError && error.retryable;
}

/** The wait between tries of a busy sidecar: 100 ms, doubling, at most 2 s. */
const BUSY_BACKOFF = { initialMs: 100, maxMs: 2_000 };

/**
 * Runs `local`, and `remote` instead when local cannot serve and a fallback is set. A busy
 * sidecar (or a model still loading) is retried (with backoff) until the fallback's
 * `busyDeadlineMs`. Errors that a remote could not fix either (bad requests) are thrown as they are.
 */
export async function runWithFallback<T>(options: {
  fallback: Fallback | undefined;
  backend?: LocalBackend;
  local: () => Promise<T>;
  remote: () => Promise<T>;
  signal?: AbortSignal;
}): Promise<{ servedBy: ServedBy; value: T; localError?: unknown }> {
  const { fallback, backend } = options;
  const remote = (reason: string): Promise<T> => remoteReason.run(reason, options.remote);
  if (fallback?.coolingDown) return { servedBy: "remote", value: await remote("the local sidecar failed and is cooling down") };
  const local = (): Promise<T> =>
    options.local().catch((error: unknown) => {
      backend?.noteFailure(error);
      throw error;
    });
  try {
    const value = await retry(local, {
      backoff: BUSY_BACKOFF,
      // Without a fallback the caller hears of a busy sidecar at once (and may retry itself).
      retryable: (error) => fallback !== undefined && isRetryable(error),
      deadline: Date.now() + (fallback?.busyDeadlineMs ?? 0),
      ...(options.signal ? { signal: options.signal } : {}),
    });
    fallback?.noteLocalSuccess();
    backend?.noteSuccess();
    return { servedBy: "local", value };
  } catch (error) {
    if (!fallback || options.signal?.aborted || !fallback.canServe(error)) throw error;
    fallback.noteLocalFailure(error);
    return { servedBy: "remote", value: await remote(localFailureReason(error)), localError: error };
  }
}

/** Why local did not serve, in one line: `local could not serve (model_not_found): Model not found…`. */
export function localFailureReason(error: unknown): string {
  const failure = toOpenAIError(error);
  const message = (error instanceof Error ? error.message : String(error)).split("\n")[0];
  return `local could not serve (${failure.code ?? failure.status}): ${message}`;
}

/** A remote answer that is not 2xx, as the error the client gets (its status and message kept). */
export async function remoteError(response: Response): Promise<OpenAIHttpError> {
  const text = await response.text().catch(() => "");
  let message = `The fallback server answered ${response.status}`;
  let type = response.status >= 500 ? "server_error" : "invalid_request_error";
  let param: string | null = null;
  let code: string | null = null;
  try {
    const body = JSON.parse(text) as { error?: { message?: unknown; type?: unknown; param?: unknown; code?: unknown } | string };
    const error = body.error;
    if (typeof error === "string") message = error;
    else if (error && typeof error === "object") {
      if (typeof error.message === "string") message = error.message;
      if (typeof error.type === "string") type = error.type;
      if (typeof error.param === "string") param = error.param;
      if (typeof error.code === "string") code = error.code;
    }
  } catch {
    // not JSON: keep the generic message
  }
  return new OpenAIHttpError(response.status, message, type, param, code);
}

export interface WithFallbackOptions extends ModelRouting {
  /** The local sidecar: a running client, or a `LocalBackend` (which also brings a failed sidecar back). */
  local: LocalMLX | LocalBackend;
  /** The fallback: an instance (share one so its cool-down holds), options, `false`, or undefined: from the environment. */
  fallback?: FallbackSetting;
  signal?: AbortSignal;
  /** Timeout of the local call. */
  timeoutMs?: number;
}

export interface ChatWithFallbackResult {
  servedBy: ServedBy;
  completion: ChatCompletion;
  /** Why local did not serve, when the remote did. */
  localError?: unknown;
}

export interface EmbedWithFallbackResult {
  servedBy: ServedBy;
  response: EmbeddingsResponse;
  localError?: unknown;
}

function backendOf(local: LocalMLX | LocalBackend): LocalBackend {
  return local instanceof LocalBackend ? local : new LocalBackend(local);
}

/**
 * A request served by `local` on the backend's client (with the routed model), or by the remote at
 * `path` with the body `remoteBody` makes (the client's, with the remote's model name).
 */
function serveWithFallback<T>(
  options: WithFallbackOptions,
  requested: string | undefined,
  local: (client: LocalMLX, model: string | undefined) => Promise<T>,
  remote: { path: string; body: (fallback: Fallback) => JsonObject },
): Promise<{ servedBy: ServedBy; value: T; localError?: unknown }> {
  const model = resolveModel(requested, options);
  const backend = backendOf(options.local);
  const fallback = fallbackOf(options.fallback);
  return runWithFallback<T>({
    fallback,
    backend,
    signal: options.signal,
    local: async () => local(await backend.acquire(), model),
    remote: async () => {
      const response = await fallback!.request("POST", remote.path, remote.body(fallback!), options.signal);
      if (!response.ok) throw await remoteError(response);
      return (await response.json()) as T;
    },
  });
}

/**
 * One chat completion (an OpenAI Chat Completions request body, `stream` ignored), served locally
 * or, when the sidecar cannot serve it, by the remote. Rejects with `OpenAIHttpError` (status,
 * OpenAI error body) for bad requests and for errors neither side could get past.
 */
export async function chatWithFallback(request: JsonObject, options: WithFallbackOptions): Promise<ChatWithFallbackResult> {
  const body = requireObject(request);
  const requested = requestedModel(body);
  const params = chatParamsOf(body);
  const { servedBy, value, localError } = await serveWithFallback<ChatCompletion>(
    options,
    requested,
    async (client, model) => {
      const started = await startChat(client, { ...params, ...(model !== undefined ? { model } : {}) }, options);
      const result = await gather(started.prediction, started.iterator, started.first);
      return chatCompletionOf(result, responseMeta("chatcmpl", requested ?? result.model));
    },
    { path: "/chat/completions", body: (fallback) => ({ ...fallback.remoteBody(body), stream: false }) },
  );
  return { servedBy, completion: value, ...(localError !== undefined ? { localError } : {}) };
}

/** Embeddings (an OpenAI Embeddings request body), served locally or by the remote. */
export async function embedWithFallback(request: JsonObject, options: WithFallbackOptions): Promise<EmbedWithFallbackResult> {
  const body = requireObject(request);
  const requested = requestedModel(body);
  const { params, encoding } = embedParamsOf(body);
  const { servedBy, value, localError } = await serveWithFallback<EmbeddingsResponse>(
    options,
    requested,
    async (client, model) => {
      const result = await embedLocal(client, { ...params, ...(model !== undefined ? { model } : {}) }, options);
      return embeddingsOf(result, encoding, requested ?? result.model);
    },
    { path: "/embeddings", body: (fallback) => fallback.remoteBody(body) },
  );
  return { servedBy, response: value, ...(localError !== undefined ? { localError } : {}) };
}

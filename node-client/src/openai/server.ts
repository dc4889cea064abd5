/**
 * A local OpenAI-compatible HTTP endpoint (node's `http` only), backed by one sidecar: `/v1/models`,
 * `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, streamed (SSE) or not. It can
 * listen on several ports at once (Wooster's tiers), each with its own model routing, all served
 * by the one sidecar under its one memory budget. A client that disconnects cancels its
 * generation. Errors use OpenAI's shape. With a fallback, requests the sidecar cannot serve go to
 * a remote OpenAI-compatible server (`x-localmlx-served-by: local | remote`). A profile's name
 * works as a model's, and `auto` routes among the profiles (`x-localmlx-profile`, `x-localmlx-routed-by`).
 *
 * Hostile input: every request, however malformed, is answered in OpenAI's shape with a 4xx, and
 * nothing a client sends can crash the process. The key is checked before any other work; the
 * body's size and nesting before it is parsed; counts and schema sizes before the sidecar sees it.
 * Each request has one error boundary; slow clients meet header and body timeouts.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex, Readable } from "node:stream";
import type { LocalMLX, LocalMLXOptions, Logger } from "../client";
import { TypedEmitter } from "../events";
import type { Prediction } from "../prediction";
import { ErrorCode, RpcError } from "../errors";
import type { EmbedResult, FinishReason, RoutedBy } from "../protocol";
import { OpenAIHttpError, badRequest, toOpenAIError } from "./errors";
import { badTarget, clientErrorOf, decodeSegment, logValue, pathOfTarget, rawResponse } from "./http-edges";
import { limitsOf, nestingPastLimit, tooDeep, type RequestLimits } from "./limits";
import { Fallback, fallbackOf, remoteError, runWithFallback, type FallbackSetting, type ServedBy } from "./fallback";
import { LocalBackend } from "../backend";
import { embedLocal, gather, pieceOf, resolveModel, startChat, startGenerate, type ModelRouting } from "./local";
import {
  ChatDeltaStream,
  chatCompletionOf,
  chatParamsOf,
  chatUsageChunkOf,
  completionChunkOf,
  completionOf,
  completionParamsOf,
  embedParamsOf,
  embeddingsOf,
  includeUsage,
  isStreaming,
  requestedModel,
  requireObject,
  responseMeta,
  type JsonObject,
} from "./translate";

/** One listening address. */
export interface OpenAIListen extends ModelRouting {
  port: number;
  /** Default: the server's `host` (127.0.0.1). */
  host?: string;
}

export interface OpenAIServerOptions extends ModelRouting {
  /**
   * A running client to serve with, or the `LocalBackend` that holds one for others too (both are
   * left open by `close()`). Default: one is started with `localmlx`.
   */
  client?: LocalMLX | LocalBackend;
  /** Options of the client started when `client` is not given (it is closed by `close()`). */
  localmlx?: LocalMLXOptions;
  /** The port (0: any free one). Default 8080. Ignored when `listen` is given. */
  port?: number;
  /** Several ports at once, each with its own routing (merged over the server's). */
  listen?: Array<number | OpenAIListen>;
  /** The interface to bind. Default `127.0.0.1` (loopback only). */
  host?: string;
  /** Require `Authorization: Bearer <apiKey>` (401 otherwise). Default: no key. */
  apiKey?: string;
  /** The largest request body accepted (413 past it). Default 16 MiB. */
  maxBodyBytes?: number;
  /** The largest request line and headers accepted (431 past it). Default 16 KiB. */
  maxHeaderBytes?: number;
  /**
   * Limits on what one request holds, checked before any work (a 400 naming the param past one):
   * `maxDepth` 64, `maxMessages` 2048, `maxTools` 128, `maxSchemaBytes` 64 KiB, `maxStopStrings` 16,
   * `maxEmbeddingInputs` 2048.
   */
  limits?: Partial<RequestLimits>;
  /** Time a request's headers may take to arrive (408 after). Default 10 s. */
  headersTimeoutMs?: number;
  /** Time a whole request, headers and body, may take to arrive (408 after). Default 30 s; never under `headersTimeoutMs`. */
  bodyTimeoutMs?: number;
  /** How long a kept-alive connection may sit idle between requests. Default 5 s. */
  keepAliveTimeoutMs?: number;
  /** Timeout of one local call (a generation, an embedding). Default: the client's `requestTimeoutMs`. */
  requestTimeoutMs?: number;
  /** Remote fallback: an instance, options, `false` (off), or undefined: `LOCALMLX_FALLBACK_TO_OPENAI` and friends. */
  fallback?: FallbackSetting;
  /** One line per request (method, path, status, model, who served it, duration); never prompt text. */
  logger?: Logger;
  /**
   * More of `GET /health` for the listener on `port` (a service adds its tiers and its sidecar's
   * state). A `status` other than `"ok"` answers 503.
   */
  health?: (port: number) => Record<string, unknown>;
  /** `false`: listen even when the sidecar cannot start (requests get 503 and try it again). Default true: `start()` rejects. */
  requireSidecar?: boolean;
}

/** What the `request` event reports for each request (never any prompt or output text). */
export interface OpenAIRequestInfo {
  method: string;
  path: string;
  port: number;
  status: number;
  model?: string;
  servedBy?: ServedBy;
  /** The profile that served (the model named one, or `auto` chose it). */
  profile?: string;
  stream?: boolean;
  /** The sidecar's finish reason (`"cancelled"` when the client went away). */
  finishReason?: FinishReason;
  /** The OpenAI error code, for failures. */
  errorCode?: string | null;
  durationMs: number;
}

export interface OpenAIServerEvents {
  request: [info: OpenAIRequestInfo];
}

/** Where one listener is: `url` is the base URL for OpenAI clients (with `/v1`). */
export interface OpenAIAddress {
  host: string;
  port: number;
  url: string;
}

const DEFAULT_PORT = 8080;
const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_MAX_BODY = 16 * 1024 * 1024;
const DEFAULT_MAX_HEADER = 16 * 1024;
// Loopback clients send a whole request in milliseconds: these only bound slow or stalled ones.
const DEFAULT_HEADERS_TIMEOUT_MS = 10_000;
const DEFAULT_BODY_TIMEOUT_MS = 30_000;
const DEFAULT_KEEP_ALIVE_TIMEOUT_MS = 5_000;
/** How long a connection answered on a client error may linger before it is destroyed. */
const CLOSE_GRACE_MS = 1_000;

interface Listener {
  server: Server;
  spec: OpenAIListen;
  routing: ModelRouting;
  address?: OpenAIAddress;
}

interface RequestContext {
  req: IncomingMessage;
  res: ServerResponse;
  routing: ModelRouting;
  port: number;
  signal: AbortSignal;
  info: OpenAIRequestInfo;
}

/** A local generation that has produced its first chunk (or ended). */
type Started = Awaited<ReturnType<typeof startChat>>;

/** One route's handler; `id` is the raw (still percent-encoded) model id of `/models/{id}`. */
type Handler = (context: RequestContext, id: string) => Promise<void> | void;

/** Starts the endpoint: `await startOpenAIServer({ port: 8080 })`. */
export function startOpenAIServer(options: OpenAIServerOptions = {}): Promise<OpenAIServer> {
  return OpenAIServer.start(options);
}

export class OpenAIServer extends TypedEmitter<OpenAIServerEvents> {
  /** The sidecar side (the client, started and brought back as needed). */
  readonly local: LocalBackend;
  /** The remote fallback, when one is set. */
  readonly fallback: Fallback | undefined;
  /** False when `local` was given (shared with others): `close()` leaves it open. */
  private readonly ownsLocal: boolean;
  private listeners: Listener[];
  /** Listeners `setListeners()` took away, still finishing their requests (until the promise resolves). */
  private readonly retired = new Map<Listener, Promise<void>>();
  private readonly options: OpenAIServerOptions;
  private readonly base: ModelRouting;
  private readonly limits: RequestLimits;
  private closing: Promise<void> | undefined;
  /** While closing: ends the wait for requests in flight. */
  private endDrain: (() => void) | undefined;
  private readonly open = new Set<ServerResponse>();
  /** The unfinished response on each connection: a client error mid-request answers through it. */
  private readonly inFlight = new WeakMap<object, RequestContext>();

  /**
   * Path (without `/v1`) → method → handler, and whether a request there only polls (health
   * checks, model lists: a service logs them quietly). An unknown path (404), a wrong method (405,
   * with `Allow`) and what CONNECT is told all fall out of this one table.
   */
  private readonly routes = new Map<string, { methods: Map<string, Handler>; poll?: boolean }>([
    ["/models", { methods: new Map([["GET", (context) => this.listModels(context)]]), poll: true }],
    ["/models/{id}", { methods: new Map([["GET", (context, id) => this.getModel(context, id)]]) }],
    ["/health", { methods: new Map([["GET", (context) => this.sendHealth(context)]]), poll: true }],
    ["/chat/completions", { methods: new Map([["POST", async (context) => this.chat(context, await this.readJson(context))]]) }],
    ["/completions", { methods: new Map([["POST", async (context) => this.completions(context, await this.readJson(context))]]) }],
    ["/embeddings", { methods: new Map([["POST", async (context) => this.embeddings(context, await this.readJson(context))]]) }],
  ]);

  /**
   * Starts the client (unless given one) and listens. When the sidecar cannot start, it rejects,
   * unless a fallback is set: then it serves through the remote and tries local again later.
   */
  static async start(options: OpenAIServerOptions = {}): Promise<OpenAIServer> {
    const server = new OpenAIServer(options);
    try {
      try {
        await server.local.acquire();
      } catch (error) {
        server.local.noteFailure(error);
        if (!server.fallback) {
          if (options.requireSidecar !== false) throw error;
          options.logger?.error?.(`localmlx openai: the sidecar did not start; requests will try it again: ${logValue(messageOf(error))}`);
        } else {
          server.fallback.noteLocalFailure(error);
          options.logger?.warn?.(`localmlx openai: the sidecar did not start, serving through the fallback: ${logValue(messageOf(error))}`);
        }
      }
      await server.listen();
    } catch (error) {
      await server.close();
      throw error;
    }
    return server;
  }

  private constructor(options: OpenAIServerOptions) {
    super();
    this.options = options;
    this.limits = limitsOf(options.limits);
    this.ownsLocal = !(options.client instanceof LocalBackend);
    this.local = options.client instanceof LocalBackend ? options.client : new LocalBackend(options.client ?? options.localmlx ?? {});
    this.fallback = fallbackOf(options.fallback);
    this.base = { aliases: options.aliases ?? {}, ...(options.defaultModel !== undefined ? { defaultModel: options.defaultModel } : {}) };
    this.listeners = (options.listen ?? [options.port ?? DEFAULT_PORT]).map((spec) => this.createListener(spec));
  }

  private routingOf(listen: OpenAIListen): ModelRouting {
    const base = this.base;
    return {
      aliases: { ...base.aliases, ...listen.aliases },
      ...((listen.defaultModel ?? base.defaultModel) !== undefined ? { defaultModel: listen.defaultModel ?? base.defaultModel } : {}),
    };
  }

  private createListener(spec: number | OpenAIListen): Listener {
    const listen: OpenAIListen = typeof spec === "number" ? { port: spec } : spec;
    const listener: Listener = { server: this.createHttpServer(), spec: listen, routing: this.routingOf(listen) };
    listener.server.on("request", (req, res) => this.serve(req, res, listener));
    // An `Expect` other than 100-continue: 417, through the same boundary as every request.
    listener.server.on("checkExpectation", (req, res) => this.serve(req, res, listener, expectationFailed()));
    listener.server.on("clientError", (error: NodeJS.ErrnoException, socket: Duplex) => this.clientError(error, socket, listener));
    listener.server.on("connect", (req: IncomingMessage, socket: Duplex) => this.refuseTunnel(req, socket, listener));
    // Once it stops listening, a connection whose last request ended is closed (not kept alive), so a drain ends.
    listener.server.on("request", (_req, res) =>
      res.once("close", () => {
        if (!listener.server.listening) setImmediate(() => listener.server.closeIdleConnections());
      }),
    );
    return listener;
  }

  private hostOf(spec: OpenAIListen): string {
    return spec.host ?? this.options.host ?? DEFAULT_HOST;
  }

  private createHttpServer(): Server {
    const headersTimeout = this.options.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS;
    const requestTimeout = Math.max(this.options.bodyTimeoutMs ?? DEFAULT_BODY_TIMEOUT_MS, headersTimeout);
    const server = createServer({
      maxHeaderSize: this.options.maxHeaderBytes ?? DEFAULT_MAX_HEADER,
      headersTimeout,
      requestTimeout,
      // node checks the two timeouts on this period (default 30 s, which would stretch them).
      connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(headersTimeout / 4))),
    });
    server.keepAliveTimeout = this.options.keepAliveTimeoutMs ?? DEFAULT_KEEP_ALIVE_TIMEOUT_MS;
    return server;
  }

  private async listen(): Promise<void> {
    for (const listener of this.listeners) await this.bind(listener);
  }

  private async bind(listener: Listener): Promise<void> {
    const spec = listener.spec;
    await new Promise<void>((resolve, reject) => {
      listener.server.once("error", reject);
      listener.server.listen(spec.port, this.hostOf(spec), () => {
        listener.server.off("error", reject);
        resolve();
      });
    });
    const address = listener.server.address() as AddressInfo;
    const urlHost = address.family === "IPv6" ? `[${address.address}]` : address.address;
    listener.address = { host: address.address, port: address.port, url: `http://${urlHost}:${address.port}/v1` };
  }

  /**
   * Changes what it listens on, as a reload does: a listener whose host and port stay gets the new
   * routing at once (requests already running keep theirs); one no longer named stops listening
   * and finishes its requests in the background; a new one listens. Rejects with the ports that
   * could not be bound (the others are in place).
   */
  async setListeners(listen: Array<number | OpenAIListen>): Promise<void> {
    const keyOf = (spec: OpenAIListen): string | undefined => (spec.port === 0 ? undefined : `${this.hostOf(spec)}:${spec.port}`);
    const current = new Map(this.listeners.map((listener) => [keyOf(listener.spec), listener] as const));
    const next: Listener[] = [];
    const fresh: Listener[] = [];
    for (const spec of listen.map((s) => (typeof s === "number" ? { port: s } : s))) {
      const kept = keyOf(spec) === undefined ? undefined : current.get(keyOf(spec));
      if (kept && !next.includes(kept)) {
        kept.spec = spec;
        kept.routing = this.routingOf(spec);
        next.push(kept);
      } else {
        const listener = this.createListener(spec);
        next.push(listener);
        fresh.push(listener);
      }
    }
    for (const listener of this.listeners) {
      if (next.includes(listener)) continue;
      this.retired.set(listener, this.drain(listener).then(() => void this.retired.delete(listener)));
    }
    this.listeners = next;
    const failed: string[] = [];
    for (const listener of fresh) {
      await this.bind(listener).catch((error: Error) => {
        failed.push(`${this.hostOf(listener.spec)}:${listener.spec.port} (${error.message})`);
        this.listeners = this.listeners.filter((l) => l !== listener);
      });
    }
    if (failed.length) throw new Error(`could not listen on ${failed.join(", ")}`);
  }

  /** Stops accepting on one listener; resolves once its open connections have ended. */
  private drain(listener: Listener): Promise<void> {
    return new Promise<void>((resolve) => {
      if (!listener.server.listening) return resolve();
      listener.server.close(() => resolve());
      listener.server.closeIdleConnections();
    });
  }

  /** Every listener's address, in the order given. */
  get addresses(): OpenAIAddress[] {
    return this.listeners.flatMap((listener) => (listener.address ? [listener.address] : []));
  }

  /** The first listener's base URL (`http://127.0.0.1:8080/v1`), for OpenAI clients' `baseURL`. */
  get url(): string {
    return this.addresses[0]?.url ?? "";
  }

  /**
   * Stops listening, lets requests in flight finish (for at most `drainMs`, default: no limit),
   * ends the rest, and closes the client if this server started it. Called again while closing,
   * a `drainMs` shortens the wait.
   */
  close(options: { drainMs?: number } = {}): Promise<void> {
    const drainMs = options.drainMs ?? Infinity;
    if (this.closing) {
      if (drainMs <= 0) this.endDrain?.();
      else if (Number.isFinite(drainMs)) setTimeout(() => this.endDrain?.(), drainMs).unref();
      return this.closing;
    }
    this.closing = (async () => {
      const all = [...this.listeners, ...this.retired.keys()];
      const drained = Promise.all([...this.listeners.map((listener) => this.drain(listener)), ...this.retired.values()]);
      const cut = new Promise<void>((resolve) => (this.endDrain = resolve));
      const timer = Number.isFinite(drainMs) ? setTimeout(() => this.endDrain?.(), Math.max(0, drainMs)) : undefined;
      await Promise.race([drained, cut]);
      clearTimeout(timer);
      for (const res of this.open) res.destroy();
      for (const listener of all) listener.server.closeAllConnections();
      if (this.ownsLocal) await this.local.close();
    })();
    return this.closing;
  }

  // ---- requests -------------------------------------------------------------------------

  /** One request inside its error boundary: nothing it throws or rejects with escapes. */
  private serve(req: IncomingMessage, res: ServerResponse, listener: Listener, refusal?: OpenAIHttpError): void {
    this.handle(req, res, listener, refusal).catch((error: unknown) => this.lastResort(res, error));
  }

  private async handle(req: IncomingMessage, res: ServerResponse, listener: Listener, refusal?: OpenAIHttpError): Promise<void> {
    const started = Date.now();
    const target = req.url ?? "/";
    const path = pathOfTarget(target);
    const port = listener.address?.port ?? 0;
    const controller = new AbortController();
    const info: OpenAIRequestInfo = {
      method: req.method ?? "GET",
      path: path === undefined ? target.slice(0, 200) : path.replace(/\/+$/, "") || "/",
      port,
      status: 0,
      durationMs: 0,
    };
    const context: RequestContext = { req, res, routing: listener.routing, port, signal: controller.signal, info };
    this.open.add(res);
    this.inFlight.set(req.socket, context);
    const settled = (): void => {
      if (this.inFlight.get(req.socket) === context) this.inFlight.delete(req.socket);
    };
    res.on("finish", settled);
    res.on("close", () => {
      this.open.delete(res);
      settled();
      if (!res.writableFinished) controller.abort();
    });
    // A write to a connection the client dropped: nothing to answer, and never an uncaught 'error'.
    res.on("error", (error) => this.say("debug", `${logValue(info.path)}: ${logValue(messageOf(error))}`));
    try {
      if (!this.authorized(req)) throw unauthorized();
      if (refusal) throw refusal;
      if (path === undefined) throw badTarget("The request target is not a path (nor an absolute URL with a valid host)");
      await this.route(context);
    } catch (error) {
      this.fail(context, error);
    } finally {
      info.durationMs = Date.now() - started;
      if (info.status === 0) info.status = res.statusCode;
      this.report(info);
    }
  }

  /** The route of a path (`/v1/models/x` → `/models/{id}`, with id `x`), found or not. */
  private routeOf(path: string): { route: { methods: Map<string, Handler>; poll?: boolean } | undefined; id: string } {
    const route = path.startsWith("/v1/") ? path.slice(3) : path;
    const id = route.startsWith("/models/") ? route.slice("/models/".length) : "";
    return { route: this.routes.get(route.startsWith("/models/") ? "/models/{id}" : route), id };
  }

  /** Whether a request to `path` only polls (a health check, the model list). */
  isPoll(path: string): boolean {
    return this.routeOf(path).route?.poll === true;
  }

  private async route(context: RequestContext): Promise<void> {
    const { path, method } = context.info;
    const { route, id } = this.routeOf(path);
    const methods = route?.methods;
    if (!methods) throw new OpenAIHttpError(404, `Unknown path ${path}`, "invalid_request_error", null, "unknown_url");
    const handler = methods.get(method);
    if (!handler) {
      const allow = [...methods.keys()].join(", ");
      throw new OpenAIHttpError(405, `${method} is not allowed on ${path} (only ${allow})`, "invalid_request_error", null, "method_not_allowed", { allow });
    }
    await handler(context, id);
  }

  /**
   * An error node's HTTP parser or timers raised on a connection: a request line or header that
   * is not HTTP, headers past the limit, a client too slow. Answered in OpenAI's shape while the
   * socket can still carry it: through the request's response when one is under way, else
   * straight on the socket; then the connection closes.
   */
  private clientError(error: NodeJS.ErrnoException, socket: Duplex, listener: Listener): void {
    try {
      this.answerClientError(error, socket, listener);
    } catch (failure) {
      socket.destroy();
      this.say("error", `unexpected failure on a client error: ${logValue(messageOf(failure))}`);
    }
  }

  private answerClientError(error: NodeJS.ErrnoException, socket: Duplex, listener: Listener): void {
    const context = this.inFlight.get(socket);
    if (!socket.writable || error.code === "ECONNRESET" || error.code === "EPIPE" || context?.res.headersSent) {
      socket.destroy();
      return;
    }
    const failure = clientErrorOf(error.code);
    if (context) {
      this.fail(context, failure); // its handler logs it when it ends
    } else {
      socket.end(rawResponse(failure));
      const port = listener.address?.port ?? 0;
      this.report({ method: "-", path: "-", port, status: failure.status, errorCode: failure.code, durationMs: 0 });
    }
    setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
  }

  /** Every method some route takes: `GET, POST`. */
  private allMethods(): string {
    return [...new Set([...this.routes.values()].flatMap((route) => [...route.methods.keys()]))].sort().join(", ");
  }

  /** CONNECT (a proxy tunnel) has no route here: 405 (401 first without the key), then the connection closes. */
  private refuseTunnel(req: IncomingMessage, socket: Duplex, listener: Listener): void {
    socket.on("error", () => socket.destroy());
    try {
      const failure = this.authorized(req)
        ? new OpenAIHttpError(405, "CONNECT is not supported", "invalid_request_error", null, "method_not_allowed", { allow: this.allMethods() })
        : unauthorized();
      socket.end(rawResponse(failure));
      const path = req.url ?? "";
      this.report({ method: "CONNECT", path: path.slice(0, 200), port: listener.address?.port ?? 0, status: failure.status, errorCode: failure.code, durationMs: 0 });
    } finally {
      setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
    }
  }

  /** A bug of this server (never client input): logged, and a 500 if nothing was sent yet. */
  private lastResort(res: ServerResponse, error: unknown): void {
    this.say("error", `unexpected failure: ${logValue(messageOf(error))}`);
    try {
      if (!res.headersSent && !res.destroyed) {
        const failure = new OpenAIHttpError(500, "Internal error", "server_error", null, "internal_error");
        res.writeHead(500, { "content-type": "application/json" }).end(JSON.stringify(failure.body));
      } else if (!res.writableEnded) {
        res.destroy();
      }
    } catch {
      res.destroy();
    }
  }

  private authorized(req: IncomingMessage): boolean {
    const key = this.options.apiKey;
    if (!key) return true;
    const header = req.headers.authorization ?? "";
    const match = /^Bearer\s+(.+)$/i.exec(header);
    if (!match) return false;
    // Digests of equal length: the comparison takes the same time whatever the key's length.
    return timingSafeEqual(digest(match[1]!.trim()), digest(key));
  }

  /** The body as a JSON object: its size and nesting are checked before it is parsed. */
  private async readJson(context: RequestContext): Promise<JsonObject> {
    const text = await this.readBody(context.req, context.res);
    const deep = nestingPastLimit(text, this.limits.maxDepth);
    if (deep) throw tooDeep(deep.param, this.limits.maxDepth);
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      throw badRequest("The request body is not valid JSON", null, "invalid_json");
    }
    return requireObject(body);
  }

  /** The body as text, refused (413) as soon as it passes `maxBodyBytes`. */
  private readBody(req: IncomingMessage, res: ServerResponse): Promise<string> {
    const limit = this.options.maxBodyBytes ?? DEFAULT_MAX_BODY;
    return new Promise((resolve, reject) => {
      // node's parser has checked Content-Length: a number, and the body will hold exactly that.
      const declared = req.headers["content-length"] === undefined ? undefined : Number(req.headers["content-length"]);
      if (declared !== undefined && declared > limit) {
        reject(tooLarge(limit));
        req.resume();
        return;
      }
      // With a declared length, one buffer filled in place: no second copy to join the chunks.
      const whole = declared !== undefined ? Buffer.allocUnsafe(declared) : undefined;
      const parts: Buffer[] = [];
      let size = 0;
      let settled = false;
      const settle = (error?: OpenAIHttpError): void => {
        if (settled) return;
        settled = true;
        if (error) {
          parts.length = 0;
          reject(error);
          return;
        }
        resolve((whole ?? Buffer.concat(parts, size)).toString("utf8", 0, size));
      };
      req.on("data", (chunk: Buffer) => {
        if (settled) return;
        if (size + chunk.length > limit || (whole && size + chunk.length > whole.length)) return settle(tooLarge(limit));
        if (whole) chunk.copy(whole, size);
        else parts.push(chunk);
        size += chunk.length;
      });
      req.on("end", () => settle());
      req.on("error", () => settle(incompleteBody()));
      req.on("close", () => settle(incompleteBody()));
      // Answered before the body came (a timeout), or the connection went: the body is not wanted.
      res.on("finish", () => settle(incompleteBody()));
      res.on("close", () => settle(incompleteBody()));
    });
  }

  private timeoutOptions(signal: AbortSignal): { signal: AbortSignal; timeoutMs?: number } {
    return this.options.requestTimeoutMs !== undefined ? { signal, timeoutMs: this.options.requestTimeoutMs } : { signal };
  }

  // ---- /v1/models -----------------------------------------------------------------------

  private async localModelIds(context: RequestContext): Promise<string[]> {
    const client = await this.local.acquire();
    const models = await client.models.list({ signal: context.signal });
    const adapters = await client.models.adapters({ signal: context.signal });
    const ids = new Set<string>();
    for (const name of Object.keys(context.routing.aliases ?? {})) if (name !== "*") ids.add(name);
    for (const model of models) ids.add(model.model);
    // An adapter is served as <base>+<adapter>: on the base it was trained on, and wherever it is loaded.
    for (const adapter of adapters) {
      if (adapter.base !== null) ids.add(`${adapter.base}+${adapter.name}`);
      for (const variant of adapter.loadedAs) ids.add(variant);
    }
    // A profile is asked for by its name; `auto` routes among them (so it is listed only beside one).
    const profiles = await profileNames(client, context.signal);
    for (const name of profiles) ids.add(name);
    if (profiles.length > 0) ids.add(AUTO);
    return [...ids];
  }

  private async listModels(context: RequestContext): Promise<void> {
    const { servedBy, value } = await runWithFallback<{ status: number; body: unknown }>({
      fallback: this.fallback,
      backend: this.local,
      signal: context.signal,
      local: async () => ({
        status: 200,
        body: { object: "list", data: (await this.localModelIds(context)).map((id) => modelObject(id)) },
      }),
      remote: async () => this.remoteJson(context, "GET", "/models"),
    });
    context.info.servedBy = servedBy;
    this.sendJson(context, value.status, value.body, servedBy);
  }

  private async getModel(context: RequestContext, encoded: string): Promise<void> {
    const id = decodeSegment(encoded);
    if (id === undefined) throw badTarget("The model id in the path has a broken percent-encoding", "model");
    const { servedBy, value } = await runWithFallback<{ status: number; body: unknown }>({
      fallback: this.fallback,
      backend: this.local,
      signal: context.signal,
      local: async () => {
        if (Object.hasOwn(context.routing.aliases ?? {}, id)) return { status: 200, body: modelObject(id) };
        const client = await this.local.acquire();
        const target = resolveModel(id, context.routing) ?? id;
        if (target === AUTO) {
          if ((await profileNames(client, context.signal)).length > 0) return { status: 200, body: modelObject(id) };
          throw new OpenAIHttpError(404, "The model auto routes among profiles, and there are none", "invalid_request_error", "model", "model_not_found");
        }
        await client.models.status(target, { signal: context.signal }); // -32010: 404 (a profile's name resolves to its model)
        return { status: 200, body: modelObject(id) };
      },
      remote: async () => this.remoteJson(context, "GET", `/models/${encodeURIComponent(id)}`),
    });
    context.info.servedBy = servedBy;
    this.sendJson(context, value.status, value.body, servedBy);
  }

  // ---- /v1/chat/completions -------------------------------------------------------------

  /**
   * What chat and completions share: route the model name, then start the generation locally
   * or on the remote (`Response`, relayed as it is).
   */
  private async startGeneration<P extends object>(
    context: RequestContext,
    body: JsonObject,
    params: P,
    path: string,
    start: (client: LocalMLX, params: P & { model?: string }, options: { signal?: AbortSignal; timeoutMs?: number }) => Promise<Started>,
  ): Promise<{ requested?: string; model?: string; stream: boolean; usage: boolean; value: Started | Response }> {
    const requested = requestedModel(body);
    const model = resolveModel(requested, context.routing);
    const stream = isStreaming(body);
    context.info.stream = stream;
    if (model !== undefined) context.info.model = model;
    const task = taskOf(body);
    const fullParams = { ...params, ...(model !== undefined ? { model } : {}), ...(task !== undefined ? { task } : {}) };
    const { servedBy, value } = await runWithFallback<Started | Response>({
      fallback: this.fallback,
      backend: this.local,
      signal: context.signal,
      local: async () => start(await this.local.acquire(), fullParams, this.timeoutOptions(context.signal)),
      remote: async () => this.remote(context, path, body),
    });
    context.info.servedBy = servedBy;
    return { requested, model, stream, usage: stream && includeUsage(body), value };
  }

  /** The whole result of an unstreamed generation, noted in the request's log record. */
  private async gathered(context: RequestContext, { prediction, iterator, first }: Started) {
    const result = await gather(prediction, iterator, first);
    context.info.finishReason = result.finishReason;
    context.info.model = result.model;
    if (result.profile !== undefined) context.info.profile = result.profile;
    return result;
  }

  private async chat(context: RequestContext, body: JsonObject): Promise<void> {
    const { requested, model, stream, usage, value } =
      await this.startGeneration(context, body, chatParamsOf(body, this.limits), "/chat/completions", startChat);
    if (value instanceof Response) return this.relay(context, value);
    const { prediction, iterator, first } = value;
    if (!stream) {
      const result = await this.gathered(context, value);
      this.sendJson(context, 200, chatCompletionOf(result, responseMeta("chatcmpl", requested ?? result.model)), "local", profileHeaders(result));
      return;
    }
    const deltas = new ChatDeltaStream(responseMeta("chatcmpl", requested ?? model ?? "localmlx"));
    this.startEvents(context, "local");
    this.sendEvent(context, deltas.start());
    await this.streamPieces(context, prediction, iterator, first, (piece) => {
      for (const chunk of deltas.piece(piece)) this.sendEvent(context, chunk);
    }, (result) => {
      this.sendEvent(context, deltas.finish(result.finishReason));
      if (usage) this.sendEvent(context, chatUsageChunkOf(deltas.meta, result.usage));
    });
  }

  // ---- /v1/completions ------------------------------------------------------------------

  private async completions(context: RequestContext, body: JsonObject): Promise<void> {
    const { params, echo } = completionParamsOf(body, this.limits);
    const { requested, model, stream, usage, value } =
      await this.startGeneration(context, body, params, "/completions", startGenerate);
    if (value instanceof Response) return this.relay(context, value);
    const { prediction, iterator, first } = value;
    if (!stream) {
      const result = await this.gathered(context, value);
      const text = (echo ? params.prompt : "") + result.text;
      this.sendJson(context, 200, completionOf(text, result, responseMeta("cmpl", requested ?? result.model)), "local", profileHeaders(result));
      return;
    }
    const meta = responseMeta("cmpl", requested ?? model ?? "localmlx");
    this.startEvents(context, "local");
    if (echo && params.prompt) this.sendEvent(context, completionChunkOf(meta, params.prompt));
    await this.streamPieces(context, prediction, iterator, first, (piece) => {
      if (piece.text) this.sendEvent(context, completionChunkOf(meta, piece.text));
    }, (result) => {
      this.sendEvent(context, completionChunkOf(meta, "", result.finishReason === "length" ? "length" : "stop"));
      if (usage) this.sendEvent(context, completionChunkOf(meta, "", null, result.usage));
    });
  }

  // ---- /v1/embeddings -------------------------------------------------------------------

  private async embeddings(context: RequestContext, body: JsonObject): Promise<void> {
    const requested = requestedModel(body);
    const { params, encoding } = embedParamsOf(body, this.limits);
    const model = resolveModel(requested, context.routing);
    if (model !== undefined) context.info.model = model;
    const { servedBy, value } = await runWithFallback<EmbedResult | Response>({
      fallback: this.fallback,
      backend: this.local,
      signal: context.signal,
      local: async () =>
        embedLocal(await this.local.acquire(), { ...params, ...(model !== undefined ? { model } : {}) }, this.timeoutOptions(context.signal)),
      remote: async () => this.remote(context, "/embeddings", body),
    });
    context.info.servedBy = servedBy;
    if (value instanceof Response) return this.relay(context, value);
    context.info.model = value.model;
    this.sendJson(context, 200, embeddingsOf(value, encoding, requested ?? value.model), "local");
  }

  // ---- streaming --------------------------------------------------------------------------

  /** Pieces to `onPiece`, then the result to `onEnd` and `[DONE]`; an error mid-stream is an SSE error event. */
  private async streamPieces(
    context: RequestContext,
    prediction: Prediction,
    iterator: AsyncIterator<unknown>,
    first: IteratorResult<unknown>,
    onPiece: (piece: ReturnType<typeof pieceOf>) => void,
    onEnd: (result: Awaited<Prediction["result"]>) => void,
  ): Promise<void> {
    try {
      let next = first;
      while (!next.done) {
        onPiece(pieceOf(next.value));
        next = await iterator.next();
      }
      const result = await prediction.result;
      context.info.finishReason = result.finishReason;
      context.info.model = result.model;
      if (result.profile !== undefined) context.info.profile = result.profile;
      if (context.signal.aborted) return;
      onEnd(result);
      context.res.end("data: [DONE]\n\n");
    } catch (error) {
      const failure = toOpenAIError(error);
      context.info.status = failure.status;
      context.info.errorCode = failure.code;
      if (!context.res.destroyed) {
        this.sendEvent(context, failure.body);
        context.res.end();
      }
    }
  }

  private startEvents(context: RequestContext, servedBy: ServedBy): void {
    context.res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
      "x-localmlx-served-by": servedBy,
    });
    context.res.flushHeaders();
  }

  private sendEvent(context: RequestContext, data: unknown): void {
    if (!context.res.destroyed && !context.res.writableEnded) context.res.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  // ---- remote -------------------------------------------------------------------------

  private remote(context: RequestContext, path: string, body: JsonObject): Promise<Response> {
    return this.fallback!.request("POST", path, this.fallback!.remoteBody(body), context.signal);
  }

  private async remoteJson(context: RequestContext, method: "GET" | "POST", path: string): Promise<{ status: number; body: unknown }> {
    const response = await this.fallback!.request(method, path, undefined, context.signal);
    if (!response.ok) throw await remoteError(response);
    try {
      return { status: response.status, body: await response.json() };
    } catch {
      throw new OpenAIHttpError(502, `The fallback server ${this.fallback!.baseURL} sent a broken answer to ${method} ${path}`, "server_error", null, "bad_gateway");
    }
  }

  /** The remote's answer, passed through (status, content type, body streamed as it comes). */
  private async relay(context: RequestContext, response: Response): Promise<void> {
    const { res } = context;
    context.info.status = response.status;
    if (!response.ok) {
      const error = await remoteError(response);
      context.info.errorCode = error.code;
      this.sendJson(context, error.status, error.body, "remote");
      return;
    }
    res.writeHead(response.status, {
      "content-type": response.headers.get("content-type") ?? "application/json",
      "cache-control": "no-cache",
      "x-localmlx-served-by": "remote",
    });
    res.flushHeaders();
    if (response.body) {
      try {
        for await (const chunk of response.body as unknown as Readable) {
          if (res.destroyed) break;
          res.write(chunk);
        }
      } catch (error) {
        if (!context.signal.aborted) this.say("warn", `the fallback's stream broke: ${logValue(messageOf(error))}`);
      }
    }
    if (!res.destroyed) res.end();
  }

  // ---- responses ------------------------------------------------------------------------

  private sendJson(context: RequestContext, status: number, body: unknown, servedBy?: ServedBy, headers: Record<string, string> = {}): void {
    const { res } = context;
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    res.writeHead(status, {
      "content-type": "application/json",
      "content-length": Buffer.byteLength(text),
      ...(servedBy ? { "x-localmlx-served-by": servedBy } : {}),
      ...headers,
    });
    res.end(text);
    context.info.status = status;
  }

  private sendHealth(context: RequestContext): void {
    const body = { status: "ok", ...this.options.health?.(context.port) };
    this.sendJson(context, body.status === "ok" ? 200 : 503, body);
  }

  private fail(context: RequestContext, error: unknown): void {
    const { res, info } = context;
    if (res.writableEnded) return; // answered already: a client error (timeout) answered mid-request
    const failure = toOpenAIError(error);
    if (!(error instanceof OpenAIHttpError) && failure.status >= 500) {
      this.say("error", `${logValue(info.method)} ${logValue(info.path)}: ${logValue(messageOf(error))}`);
    }
    info.errorCode = failure.code;
    info.status = failure.status;
    if (res.headersSent) {
      if (!res.destroyed) {
        this.sendEvent(context, failure.body);
        res.end();
      }
      return;
    }
    this.sendJson(context, failure.status, failure.body, info.servedBy, failure.headers);
  }

  /** The request's log line and `request` event. */
  private report(info: OpenAIRequestInfo): void {
    this.log(info);
    this.emit("request", info);
  }

  /** One line per request; every value escaped, so none can end the line or forge another. */
  private log(info: OpenAIRequestInfo): void {
    const parts = [`${logValue(info.method)} ${logValue(info.path)}`, `${info.status}`, `port=${info.port}`];
    if (info.model) parts.push(`model=${logValue(info.model)}`);
    if (info.profile) parts.push(`profile=${logValue(info.profile)}`);
    if (info.servedBy) parts.push(`served-by=${logValue(info.servedBy)}`);
    if (info.stream) parts.push("stream");
    if (info.finishReason) parts.push(`finish=${logValue(info.finishReason)}`);
    if (info.errorCode) parts.push(`error=${logValue(info.errorCode)}`);
    parts.push(`${info.durationMs}ms`);
    this.say("info", parts.join(" "));
  }

  /** A line to the logger, whose own failure (a closed stream…) never reaches a request. */
  private say(level: keyof Logger, line: string): void {
    try {
      this.options.logger?.[level]?.(`localmlx openai: ${line}`);
    } catch {
      // nowhere left to report it
    }
  }
}

/** The model name that routes among the profiles. */
const AUTO = "auto";

/** The profiles' names; none from a sidecar that predates profiles (it has no profiles/list). */
async function profileNames(client: LocalMLX, signal: AbortSignal): Promise<string[]> {
  try {
    return (await client.request("profiles/list", {}, { signal })).profiles.map((profile) => profile.name);
  } catch (error) {
    if (error instanceof RpcError && error.code === ErrorCode.MethodNotFound) return [];
    throw error;
  }
}

/** `task` (a localmlx extension, as the sidecar's param: chat, code, summarize…): what `auto` routes by. */
function taskOf(body: JsonObject): string | undefined {
  const task = body.task;
  if (task === undefined || task === null) return undefined;
  if (typeof task !== "string" || task === "") throw badRequest("task must be a string: chat, code, summarize, reasoning or extraction", "task");
  return task;
}

/**
 * Which profile served an unstreamed generation, and for `auto` why (its reason, in a header's
 * characters). A streamed one has none: its headers go before the sidecar says which served.
 */
function profileHeaders(result: { profile?: string; routedBy?: RoutedBy }): Record<string, string> {
  const headers: Record<string, string> = {};
  if (result.profile !== undefined) headers["x-localmlx-profile"] = headerText(result.profile);
  if (result.routedBy !== undefined) headers["x-localmlx-routed-by"] = headerText(result.routedBy.reason);
  return headers;
}

function headerText(text: string): string {
  return text.replace(/[^\x20-\x7e]/g, "?").slice(0, 200);
}

function modelObject(id: string): { id: string; object: "model"; created: number; owned_by: string } {
  return { id, object: "model", created: 0, owned_by: "localmlx" };
}

function tooLarge(limit: number): OpenAIHttpError {
  return new OpenAIHttpError(413, `The request body is larger than ${limit} bytes`, "invalid_request_error", null, "request_too_large");
}

function unauthorized(): OpenAIHttpError {
  return new OpenAIHttpError(401, "Incorrect or missing API key: send Authorization: Bearer <key>", "invalid_request_error", null, "invalid_api_key");
}

function incompleteBody(): OpenAIHttpError {
  return new OpenAIHttpError(400, "The request body did not arrive whole", "invalid_request_error", null, "incomplete_body");
}

function expectationFailed(): OpenAIHttpError {
  return new OpenAIHttpError(417, "Only Expect: 100-continue is supported", "invalid_request_error", null, "expectation_failed");
}

function digest(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

/** An error's first line (anything thrown, not only Errors). */
function messageOf(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  return message.split("\n")[0]!;
}

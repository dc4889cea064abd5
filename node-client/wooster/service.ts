/**
 * `LocalMLXService`: what the tools (and other Wooster plugins, through `getService`) call. It
 * starts the sidecar on first use, never before; keeps the active model; answers through the
 * remote fallback when local cannot serve and the fallback is on. The sidecar's client is held by
 * one `LocalBackend` (the client's), shared with the plugin's endpoint, which also stops it when
 * Wooster's event loop drains (Wooster never calls a plugin's shutdown).
 */
import {
  ErrorCode,
  LocalBackend,
  type LocalMLX,
  RpcError,
  SidecarCrashError,
  SidecarStartError,
  TimeoutError,
  imagePart,
  isFallbackWorthy,
  runWithFallback,
  type LoadProgress,
  type LocalModel,
  type Message,
  type ModelDescription,
  type ModelsDownloadResult,
  type PredictionResult,
  type RoutedBy,
  type ServerStatusResult,
  type Task,
} from "@localmlx/client";
import type { LocalMLXPluginSettings } from "./config";
import type { RemoteModel } from "./remote";
import { LogLevel } from "./types";

export type PluginLog = (level: LogLevel, message: string) => void;

/** Where an answer came from, and what it is. */
export interface Answer {
  text: string;
  servedBy: "local" | "remote";
  model: string;
  finishReason?: string;
  usage?: PredictionResult["usage"];
  timings?: PredictionResult["timings"];
  /** Why it was served where it was (a fallback, a route decision). */
  note?: string;
  /** The sidecar profile that served (named, or chosen by model "auto"), and why auto chose it. */
  profile?: string;
  routedBy?: RoutedBy;
}

export interface GenerationOptions {
  model?: string;
  maxTokens?: number;
  temperature?: number;
  stop?: string[];
  /** Draft from n-grams of the prompt (prompt lookup): faster where the answer copies its input. */
  promptLookup?: boolean;
  /** What the request is for: model "auto" picks a profile declaring it. */
  task?: Task;
  signal?: AbortSignal;
  /** Called with each piece of text as it is generated (LOCALMLX_STREAM_RESPONSES). */
  onText?: (text: string) => void;
}

export interface RouteDecision {
  target: "local" | "remote";
  reason: string;
}

/** Local cannot serve (the sidecar cannot start); a message meant for the agent, the client's error as `cause`. */
export class LocalUnavailableError extends Error {
  override name = "LocalUnavailableError";
}

/** The client's own error behind a LocalUnavailableError (what the fallback module classifies). */
function unwrap(error: unknown): unknown {
  return error instanceof LocalUnavailableError && error.cause !== undefined ? error.cause : error;
}

/** The model name that makes the sidecar pick a profile for the request. */
const AUTO = "auto";
/** How long the sidecar's profile names are trusted: an edited profiles dir shows within this. */
const PROFILES_TTL_MS = 10_000;

/** intelligent_route's free-text `task` as a task the sidecar routes by; undefined: let it classify the prompt. */
export function taskNamed(text: string | undefined): Task | undefined {
  const word = text?.trim().toLowerCase();
  if (!word) return undefined;
  const tasks: Record<string, Task> = {
    chat: "chat", conversation: "chat", talk: "chat",
    code: "code", coding: "code", programming: "code", debug: "code", refactor: "code",
    summarize: "summarize", summarise: "summarize", summary: "summarize", summarization: "summarize", tldr: "summarize",
    reasoning: "reasoning", reason: "reasoning", thinking: "reasoning", math: "reasoning", analysis: "reasoning",
    extraction: "extraction", extract: "extraction", json: "extraction", classify: "extraction", classification: "extraction",
  };
  return tasks[word];
}

const SUMMARY_OVERHEAD_TOKENS = 160;
const DEFAULT_CONTEXT = 4096;

function lastLine(text: string): string {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  return lines[lines.length - 1] ?? "";
}

export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** A short, agent-readable sentence for any failure. */
export function describeError(error: unknown): string {
  if (error instanceof LocalUnavailableError) return error.message;
  if (error instanceof RpcError) {
    const text = error.rawMessage;
    switch (error.code) {
      case ErrorCode.ModelNotFound:
        return `${text}. Download it with download_model, or set LOCALMLX_AUTO_DOWNLOAD=true.`;
      case ErrorCode.OutOfMemory:
        return `${text}. Try a smaller (4-bit) model, or unload others.`;
      case ErrorCode.Busy:
        return `${text}. The local model is busy; try again shortly.`;
      case ErrorCode.ContextLengthExceeded:
        return `${text}. The input is too long for the local model; use local_summarize first.`;
      case ErrorCode.RankLost:
        return `${text}. A machine of the local model's group stopped answering; the group restarts on the next call.`;
      default:
        return text;
    }
  }
  if (error instanceof TimeoutError) return `The local model did not answer in time (${error.timeoutMs} ms).`;
  if (error instanceof SidecarCrashError) return `The local model process crashed (${error.message}); it restarts on the next call.`;
  if (error instanceof Error) return error.message;
  return String(error);
}

/** After a failed start, tools get that failure for this long before the sidecar is tried again. */
const START_RETRY = { initialMs: 30_000, maxMs: 30_000 };

export class LocalMLXService {
  static readonly serviceName = "LocalMLXService";

  /**
   * The one owner of the sidecar's client, shared with the plugin's OpenAI endpoint: it starts it
   * on first use, waits out START_RETRY after a failed start, and stops it when Wooster's event
   * loop drains (Wooster never calls a plugin's shutdown).
   */
  readonly backend: LocalBackend;
  private activeModel: string | undefined;
  /** The base model behind the active one, when switch_model chose a profile (what to unload on the next switch). */
  private activeBase: string | undefined;
  /** The sidecar's profile names, and when they were asked for (PROFILES_TTL_MS). */
  private profilesSeen: { names: string[]; at: number } | undefined;
  private readonly contextLengths = new Map<string, number | null>();
  private readonly speeds = new Map<string, { tokensPerSecond: number; promptTokensPerSecond: number; at: string }>();

  constructor(
    readonly settings: LocalMLXPluginSettings,
    private readonly log: PluginLog,
    readonly remote?: RemoteModel,
  ) {
    this.activeModel = settings.defaultModel;
    // Every request that leaves the machine is a warning in Wooster's log, with its reason.
    if (remote) remote.fallback.logger = { warn: (m) => this.log(LogLevel.WARN, m) };
    this.backend = new LocalBackend(
      {
        ...(settings.python ? { python: settings.python } : {}),
        env: settings.sidecarEnv,
        clientInfo: { name: "wooster-localmlx" },
        keepAlive: false,
        logger: {
          debug: (m) => this.log(LogLevel.DEBUG, m),
          info: (m) => this.log(LogLevel.DEBUG, m),
          warn: (m) => this.log(LogLevel.WARN, m),
          error: (m) => this.log(LogLevel.ERROR, m),
        },
      },
      {
        startRetry: START_RETRY,
        stopWhenIdle: true,
        onStart: (client) => {
          this.log(LogLevel.INFO, `sidecar started (pid ${client.pid}, ${client.info?.serverInfo.device ?? "?"}, mlx ${client.info?.serverInfo.mlx ?? "?"})`);
          client.on("unavailable", () => this.log(LogLevel.ERROR, "the local model process crashed too often; local tools are off until Wooster restarts"));
          this.warmUp(client);
        },
        onStartFailure: (error) => this.log(LogLevel.WARN, this.unavailableMessage(error)),
      },
    );
  }

  private get client(): LocalMLX | undefined {
    return this.backend.current;
  }

  /** The sidecar's process id, once started. */
  get pid(): number | undefined {
    return this.client?.pid;
  }

  get isRunning(): boolean {
    return this.client !== undefined || this.backend.status.state === "starting";
  }

  /**
   * The tools' maxTokens and temperature: the settings' (which the sidecar got too), else the
   * sidecar's own defaults once it has started; undefined before that.
   */
  get generationDefaults(): { maxTokens: number | undefined; temperature: number | undefined } {
    const defaults = this.client?.info?.defaults;
    return { maxTokens: this.settings.maxTokens ?? defaults?.maxTokens, temperature: this.settings.temperature ?? defaults?.temperature };
  }

  /** maxTokens and temperature of a remote request: the call's, else the tools' defaults. */
  private remoteSampling(options: GenerationOptions): { maxTokens?: number; temperature?: number } {
    const maxTokens = options.maxTokens ?? this.generationDefaults.maxTokens;
    const temperature = options.temperature ?? this.generationDefaults.temperature;
    return { ...(maxTokens !== undefined ? { maxTokens } : {}), ...(temperature !== undefined ? { temperature } : {}) };
  }

  /** The model the tools use (undefined: the sidecar's default). */
  get model(): string | undefined {
    return this.activeModel ?? this.client?.info?.defaults.model;
  }

  /** Runs `hook` when the sidecar is stopped (the OpenAI endpoint registers its close here). */
  onStop(hook: () => void | Promise<void>): void {
    this.backend.onStop(hook);
  }

  /** The client, starting the sidecar on first use. Rejects with LocalUnavailableError when it cannot start. */
  async mlx(): Promise<LocalMLX> {
    try {
      return await this.backend.acquire();
    } catch (error) {
      throw new LocalUnavailableError(this.unavailableMessage(error), { cause: error });
    }
  }

  private unavailableMessage(error: unknown): string {
    const orFallback = this.settings.fallbackToOpenAI ? "." : ", or set LOCALMLX_FALLBACK_TO_OPENAI=true to answer through OpenAI instead.";
    // It is installed, and said why it will not start (a setting, a host of its group).
    if (error instanceof SidecarStartError && error.details.refusal) {
      return `Local MLX models are not available: the localmlx sidecar refused to start: ${error.details.refusal}. Fix that${orFallback}`;
    }
    let reason = error instanceof Error ? error.message.split("\n")[0]! : String(error);
    if (error instanceof SidecarStartError) {
      const last = lastLine(error.stderrTail);
      const summary = error.summary.split("\n")[0]!;
      reason = last ? `${summary}: ${last}` : summary;
    }
    return (
      `Local MLX models are not available: the localmlx sidecar could not start (${reason}). ` +
      "Install localmlx's Python environment (an MLX build for this machine) and point LOCALMLX_PYTHON at its interpreter" +
      orFallback
    );
  }

  /** LOCALMLX_PRELOAD_MODELS: load those models in the background once the sidecar runs. */
  private warmUp(client: LocalMLX): void {
    for (const ref of this.settings.preloadModels) {
      const model = ref === "default" ? this.model ?? client.info?.defaults.model : ref;
      if (!model) continue;
      client.models.load(model).then(
        (d) => this.log(LogLevel.INFO, `preloaded ${d.model} (${Math.round(d.loadTimeMs ?? 0)} ms)`),
        (error: unknown) => this.log(LogLevel.WARN, `could not preload ${model}: ${describeError(error)}`),
      );
    }
  }

  /** Starts the sidecar now when it is not running (pre-warming at start-up). */
  async ensureStarted(): Promise<boolean> {
    try {
      await this.mlx();
      return true;
    } catch {
      return false;
    }
  }

  // ---- generation -------------------------------------------------------------------------

  /** A chat completion, locally; through the remote fallback when local cannot serve and it is on. */
  chat(messages: Message[], options: GenerationOptions = {}): Promise<Answer> {
    return this.serve(() => this.localChat(messages, options), messages, options);
  }

  private localChat(messages: Message[], options: GenerationOptions): Promise<Answer> {
    return this.localPredict({ messages }, options);
  }

  /** A raw-prompt completion (no chat template). */
  generate(prompt: string, options: GenerationOptions = {}): Promise<Answer> {
    return this.serve(() => this.localPredict({ prompt }, options), [{ role: "user", content: prompt }], options);
  }

  /** A chat (messages) or a raw completion (prompt) on the local sidecar, with the plugin's defaults. */
  private async localPredict(input: { messages: Message[] } | { prompt: string }, options: GenerationOptions): Promise<Answer> {
    const mlx = await this.mlx();
    const model = options.model ?? this.activeModel;
    const common = {
      ...(model ? { model } : {}),
      // Absent, the sidecar applies its defaults (LOCALMLX_MAX_TOKENS and LOCALMLX_TEMPERATURE reach it as written).
      ...(options.maxTokens !== undefined ? { maxTokens: options.maxTokens } : {}),
      ...(options.temperature !== undefined ? { temperature: options.temperature } : {}),
      ...(options.stop?.length ? { stop: options.stop } : {}),
      ...(options.promptLookup !== undefined ? { promptLookup: options.promptLookup } : {}),
      ...(options.task !== undefined ? { task: options.task } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
    };
    const prediction = "messages" in input ? mlx.chat({ ...input, ...common }) : mlx.generate({ ...input, ...common });
    return this.finish(prediction, options);
  }

  private async finish(prediction: ReturnType<LocalMLX["chat"]>, options: GenerationOptions): Promise<Answer> {
    const stream = options.onText ?? (this.settings.streamResponses ? (text: string) => this.log(LogLevel.DEBUG, `stream: ${text}`) : undefined);
    if (stream) for await (const chunk of prediction) stream(chunk.text);
    const result = await prediction.result;
    this.speeds.set(result.model, {
      tokensPerSecond: result.timings.tokensPerSecond ?? 0,
      promptTokensPerSecond: result.timings.promptTokensPerSecond ?? 0,
      at: new Date().toISOString(),
    });
    return {
      text: result.text,
      servedBy: "local",
      model: result.model,
      finishReason: result.finishReason,
      usage: result.usage,
      timings: result.timings,
      ...(result.profile !== undefined ? { profile: result.profile } : {}),
      ...(result.routedBy !== undefined ? { routedBy: result.routedBy } : {}),
    };
  }

  /**
   * Runs `local`; with LOCALMLX_FALLBACK_TO_OPENAI on, through the client's fallback module: the
   * remote answers when local cannot (sidecar down or cooling down after a failure, model missing,
   * out of memory, busy past the deadline), and the answer says so.
   */
  private async serve(local: () => Promise<Answer>, messages: Message[], options: GenerationOptions): Promise<Answer> {
    if (!this.settings.fallbackToOpenAI) return local();
    if (!this.remote) {
      try {
        return await local();
      } catch (error) {
        if (!isFallbackWorthy(unwrap(error))) throw error;
        throw new LocalUnavailableError(
          `${describeError(error)} (LOCALMLX_FALLBACK_TO_OPENAI is on, but no remote server is configured: set OPENAI_API_KEY, and OPENAI_BASE_URL for a server other than OpenAI.)`,
          { cause: unwrap(error) },
        );
      }
    }
    const remote = this.remote;
    const { servedBy, value, localError } = await runWithFallback<Answer>({
      fallback: remote.fallback,
      local: () => local().catch((error: unknown) => Promise.reject(unwrap(error))),
      remote: async () => {
        const answer = await remote.chat(messages, {
          ...this.remoteSampling(options),
          ...(options.stop?.length ? { stop: options.stop } : {}),
          ...(options.signal ? { signal: options.signal } : {}),
        });
        return { ...answer, servedBy: "remote" };
      },
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (servedBy === "local") return value;
    const why =
      localError === undefined
        ? "local is cooling down after a failure"
        : `local could not serve: ${localError instanceof SidecarStartError ? "the localmlx sidecar could not start" : describeError(localError)}`;
    this.log(LogLevel.INFO, `served by ${remote.label} (${why})`);
    return { ...value, servedBy: "remote", note: why };
  }

  // ---- images -------------------------------------------------------------------------------

  /**
   * Asks a vision model about one image (a file path, which the sidecar reads under
   * LOCALMLX_ALLOWED_ROOTS), on this machine only: the image never goes to the remote fallback.
   */
  async askAboutImage(image: string | Uint8Array, question: string, options: GenerationOptions & { model: string }): Promise<Answer> {
    const messages: Message[] = [{ role: "user", content: [imagePart(image), { type: "text", text: question }] }];
    return this.localChat(messages, options);
  }

  // ---- summarizing ------------------------------------------------------------------------

  /** The context length of a model (loading it if needed); null when its config does not say. */
  async contextLength(model = this.model): Promise<number | null> {
    const mlx = await this.mlx();
    const name = model ?? mlx.info?.defaults.model ?? "default";
    if (!this.contextLengths.has(name)) {
      const description = await mlx.models.load(name);
      this.contextLengths.set(name, description.contextLength);
      this.contextLengths.set(description.model, description.contextLength);
    }
    return this.contextLengths.get(name) ?? null;
  }

  async countTokens(text: string, model = this.model): Promise<number> {
    const mlx = await this.mlx();
    return (await mlx.tokenize(text, { ...(model ? { model } : {}), addSpecialTokens: false })).tokens.length;
  }

  /**
   * Summarizes `text`. Text longer than the model's context is split into parts that fit (counted
   * with the model's tokenizer), the parts are summarized together (one batch on the engine), and
   * the partial summaries are merged — again in parts, if they still do not fit.
   */
  async summarize(
    text: string,
    options: GenerationOptions & { instructions?: string } = {},
  ): Promise<Answer & { parts: number }> {
    const focus = options.instructions ? ` ${options.instructions}` : "";
    const ask = (body: string, what: string): Message[] => [
      { role: "system", content: "You write faithful, concise summaries. Keep names, numbers and decisions." },
      { role: "user", content: `Summarize ${what}.${focus}\n\n${body}` },
    ];
    try {
      const model = options.model ?? this.model;
      const context = (await this.contextLength(model)) ?? DEFAULT_CONTEXT;
      const summaryTokens = Math.min(options.maxTokens ?? this.generationDefaults.maxTokens ?? Infinity, Math.max(32, Math.floor(context / 4)));
      const budget = Math.max(64, context - summaryTokens - SUMMARY_OVERHEAD_TOKENS);
      const generation = { ...options, ...(model ? { model } : {}), maxTokens: summaryTokens };

      let current = text;
      let parts = 1;
      for (let round = 0; round < 4; round++) {
        const chunks = await this.split(current, budget, model);
        if (round === 0) parts = chunks.length;
        if (chunks.length === 1) {
          const answer = await this.localChat(ask(chunks[0]!, round === 0 ? "the following text" : "these partial summaries of one document into one summary"), generation);
          return { ...answer, parts };
        }
        this.log(LogLevel.DEBUG, `summarizing ${chunks.length} parts (${budget} tokens each at most)`);
        const partial = await Promise.all(
          chunks.map((chunk, i) => this.localChat(ask(chunk, `part ${i + 1} of ${chunks.length} of a longer text`), generation)),
        );
        current = partial.map((p, i) => `Part ${i + 1}: ${p.text.trim()}`).join("\n\n");
      }
      throw new Error("the text is too long to summarize");
    } catch (error) {
      // Local could not summarize: with the fallback on, the remote summarizes the whole text.
      if (!this.settings.fallbackToOpenAI) throw error;
      const answer = await this.serve(() => Promise.reject(error), ask(text, "the following text"), options);
      return { ...answer, parts: 1 };
    }
  }

  /** Splits text into pieces of at most `budget` tokens, at paragraph, line, sentence or word ends. */
  private async split(text: string, budget: number, model: string | undefined): Promise<string[]> {
    const total = await this.countTokens(text, model);
    if (total <= budget) return [text];
    const charsPerToken = text.length / Math.max(1, total);
    const target = Math.max(200, Math.floor(budget * charsPerToken * 0.85));
    const pieces: string[] = [];
    let rest = text;
    while (rest.length > target) {
      const window = rest.slice(0, target);
      let cut = -1;
      for (const sep of ["\n\n", "\n", ". ", " "]) {
        const at = window.lastIndexOf(sep);
        if (at > target / 2) {
          cut = at + sep.length;
          break;
        }
      }
      if (cut <= 0) cut = target;
      pieces.push(rest.slice(0, cut));
      rest = rest.slice(cut);
    }
    if (rest.trim()) pieces.push(rest);
    // The estimate can be off (a dense stretch of text): re-split any piece that still does not fit.
    const counted = await Promise.all(pieces.map((piece) => this.countTokens(piece, model)));
    const out: string[] = [];
    for (let i = 0; i < pieces.length; i++) {
      const piece = pieces[i]!;
      if (counted[i]! <= budget || piece.length < 400) out.push(piece);
      else out.push(...(await this.split(piece, budget, model)));
    }
    return out;
  }

  // ---- many items ---------------------------------------------------------------------------

  /**
   * Runs every item through the model concurrently (the sidecar decodes them together, one
   * batch), a pool at most `maxBatchSize` wide; results come back in the items' order.
   */
  async batch(
    items: string[],
    options: GenerationOptions & { instruction?: string; system?: string } = {},
  ): Promise<Array<Answer | { error: string }>> {
    let width = 8;
    try {
      width = (await this.mlx()).info?.limits.maxBatchSize ?? 8;
    } catch (error) {
      if (!this.settings.fallbackToOpenAI) throw error;
    }
    const results: Array<Answer | { error: string }> = new Array(items.length);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < items.length) {
        const index = next++;
        const content = options.instruction ? `${options.instruction}\n\n${items[index]}` : items[index]!;
        const messages: Message[] = [...(options.system ? [{ role: "system" as const, content: options.system }] : []), { role: "user", content }];
        try {
          results[index] = await this.chat(messages, options);
        } catch (error) {
          results[index] = { error: describeError(error) };
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(width, items.length)) }, worker));
    return results;
  }

  // ---- routing ------------------------------------------------------------------------------

  /**
   * Local or remote for one prompt, by task, size and availability: private or routine work
   * (code, summaries, rewriting, extraction) stays local; what needs fresh knowledge or long,
   * deep reasoning goes remote when a remote server is configured; a prompt too long for the
   * local context goes remote; whatever cannot be served where it was sent goes to the other.
   */
  async decideRoute(prompt: string, options: { prefer?: "local" | "remote" | "auto"; task?: string } = {}): Promise<RouteDecision> {
    const remoteReady = this.remote !== undefined;
    if (options.prefer === "remote") {
      return remoteReady ? { target: "remote", reason: "remote was asked for" } : { target: "local", reason: "remote was asked for, but no remote server is configured" };
    }
    if (options.prefer === "local") return { target: "local", reason: "local was asked for" };
    const text = `${options.task ?? ""} ${prompt}`.toLowerCase();
    if (/\b(private|personal|confidential|secret|password|diary|journal|health|medical|salary)\b/.test(text)) {
      return { target: "local", reason: "private content stays on this machine" };
    }
    const localUp = await this.ensureStarted();
    if (!localUp) {
      return remoteReady
        ? { target: "remote", reason: "local models are not available" }
        : { target: "local", reason: "local models are not available and no remote server is configured" };
    }
    if (remoteReady) {
      const tokens = await this.countTokens(prompt).catch(() => Math.ceil(prompt.length / 4));
      const context = (await this.contextLength().catch(() => null)) ?? DEFAULT_CONTEXT;
      if (tokens + (this.generationDefaults.maxTokens ?? 0) > context) {
        return { target: "remote", reason: `the prompt (${tokens} tokens) is too long for the local context (${context})` };
      }
      if (/\b(latest|news|today'?s|current events|this week|stock price|search the web|browse)\b/.test(text)) {
        return { target: "remote", reason: "it needs knowledge newer than a local model has" };
      }
      const deep = /\b(prove|step by step|in depth|architecture|strategy|complex|analy[sz]e thoroughly|research)\b/.test(text);
      if (deep && tokens > 200) return { target: "remote", reason: "long, deep reasoning suits the larger remote model" };
    }
    if (/\b(code|function|bug|refactor|summari[sz]e|rewrite|translate|classify|extract|list|format)\b/.test(text)) {
      return { target: "local", reason: "routine work the local model handles well" };
    }
    return { target: "local", reason: remoteReady ? "local is available and costs nothing" : "local is available (no remote server configured)" };
  }

  async route(
    prompt: string,
    options: Omit<GenerationOptions, "task"> & { prefer?: "local" | "remote" | "auto"; task?: string; system?: string } = {},
  ): Promise<Answer> {
    const decision = await this.decideRoute(prompt, options);
    const messages: Message[] = [...(options.system ? [{ role: "system" as const, content: options.system }] : []), { role: "user", content: prompt }];
    const { task: _task, ...generation } = options;
    this.log(LogLevel.INFO, `intelligent_route: ${decision.target} (${decision.reason})`);
    if (decision.target === "remote" && this.remote) {
      try {
        const answer = await this.remote.chat(messages, { ...this.remoteSampling(generation), reason: `intelligent_route chose remote: ${decision.reason}` });
        return { ...answer, servedBy: "remote", note: decision.reason };
      } catch (error) {
        this.log(LogLevel.WARN, `remote failed (${describeError(error)}); answering locally`);
        const answer = await this.localRouted(messages, generation, taskNamed(options.task));
        return { ...answer, note: `${decision.reason}; remote failed (${describeError(error)})` };
      }
    }
    try {
      return { ...(await this.localRouted(messages, generation, taskNamed(options.task))), note: decision.reason };
    } catch (error) {
      if (!this.remote || !isFallbackWorthy(unwrap(error))) throw error;
      const note = `${decision.reason}, but local could not serve: ${describeError(error)}`;
      const answer = await this.remote.chat(messages, { ...this.remoteSampling(generation), reason: `intelligent_route: ${note}` });
      return { ...answer, servedBy: "remote", note };
    }
  }

  /**
   * intelligent_route's local answer: with profiles on the sidecar (and no model asked for),
   * model "auto" with the task, so the sidecar picks the profile (by task, memory and what it
   * measured); else the active model. When auto finds no profile that can serve, the active model.
   */
  private async localRouted(messages: Message[], options: GenerationOptions, task: Task | undefined): Promise<Answer> {
    if (options.model !== undefined || (await this.profileNames()).length === 0) return this.localChat(messages, options);
    try {
      return await this.localChat(messages, { ...options, model: AUTO, ...(task !== undefined ? { task } : {}) });
    } catch (error) {
      const data = error instanceof RpcError ? (error.data as { routedBy?: RoutedBy } | undefined) : undefined;
      if (!(error instanceof RpcError && error.code === ErrorCode.InvalidParams && data?.routedBy)) throw error;
      this.log(LogLevel.INFO, `intelligent_route: no profile can serve (${data.routedBy.reason}); answering with the active model`);
      return this.localChat(messages, options);
    }
  }

  /**
   * The sidecar's profile names, asked at most every PROFILES_TTL_MS; none when it cannot say
   * (not started, or too old to have profiles).
   */
  async profileNames(): Promise<string[]> {
    const seen = this.profilesSeen;
    if (seen && Date.now() - seen.at < PROFILES_TTL_MS) return seen.names;
    let names: string[] = [];
    try {
      names = (await (await this.mlx()).request("profiles/list", {})).profiles.map((profile) => profile.name);
    } catch (error) {
      this.log(LogLevel.DEBUG, `profiles/list: ${describeError(error)}`);
    }
    this.profilesSeen = { names, at: Date.now() };
    return names;
  }

  // ---- models -------------------------------------------------------------------------------

  async listModels(): Promise<LocalModel[]> {
    return (await this.mlx()).models.list();
  }

  /** Downloads a Hub model, reporting progress to `onProgress`. */
  async download(model: string, options: { revision?: string; onProgress?: (p: LoadProgress) => void } = {}): Promise<ModelsDownloadResult> {
    const mlx = await this.mlx();
    return mlx.request(
      "models/download",
      { model, ...(options.revision ? { revision: options.revision } : {}) },
      {
        timeoutMs: 0,
        ...(options.onProgress ? { onProgress: ({ token: _token, ...p }) => options.onProgress!(p) } : {}),
      },
    );
  }

  /**
   * Loads a model and makes it the one the tools use. A profile's name loads its base model and
   * stays the active name, so the tools' requests keep the profile's template, system prompt and defaults.
   */
  async switchModel(model: string, options: { onProgress?: (p: LoadProgress) => void } = {}): Promise<ModelDescription> {
    const mlx = await this.mlx();
    const previous = this.model;
    const previousBase = this.activeBase ?? previous;
    const description = await mlx.models.load(model, { timeoutMs: 0, ...(options.onProgress ? { onProgress: options.onProgress } : {}) });
    const isProfile = model !== description.model && (await this.profileNames()).includes(model);
    this.activeModel = isProfile ? model : description.model;
    this.activeBase = description.model;
    this.contextLengths.set(description.model, description.contextLength);
    const offload = this.settings.offloadInactive;
    if (previousBase && previousBase !== description.model && offload !== undefined && offload !== "-1") {
      // A profile named by the settings resolves to its base here: never unload what was just loaded.
      const base = (await mlx.models.status(previousBase).catch(() => undefined))?.model ?? previousBase;
      if (base !== description.model) await mlx.models.unload(base).catch(() => undefined);
    }
    return description;
  }

  async status(): Promise<{ status: ServerStatusResult; info: LocalMLX["info"]; pid: number | undefined }> {
    const mlx = await this.mlx();
    return { status: await mlx.status(), info: mlx.info, pid: mlx.pid };
  }

  /** The last measured speed of each model that generated in this session. */
  get measuredSpeeds(): ReadonlyMap<string, { tokensPerSecond: number; promptTokensPerSecond: number; at: string }> {
    return this.speeds;
  }

  // ---- lifetime -----------------------------------------------------------------------------

  /** Stops the sidecar (and the endpoint); a later call starts a new one. */
  stop(): Promise<void> {
    return this.backend.stop();
  }

  /** At `exit`, when nothing async runs any more: signal the sidecar (the client's own exit hook does too). */
  stopNow(): void {
    const pid = this.client?.pid;
    if (pid === undefined) return;
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      // already gone
    }
  }

  /** Forgets this service (tests; a reloaded plugin). */
  dispose(): Promise<void> {
    return this.backend.close();
  }
}

/**
 * `LocalMLX`: the public client. Starts the sidecar, runs every call on a ready session (restarting
 * it after a crash, with the models that were loaded), and closes it without leaving orphans.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { RequestOptions, WireWarning } from "./connection";
import { abortError, SidecarCrashError, SidecarStartError, SidecarUnavailableError, type ExitInfo } from "./errors";
import { TypedEmitter } from "./events";
import { Prediction, type PredictionResult } from "./prediction";
import {
  DEFAULT_SIDECAR_ARGS,
  findSidecar,
  formatLogRecord,
  packageRoot,
  type SidecarCandidate,
  type SidecarLogRecord,
  type SidecarSource,
} from "./process";
import type {
  Adapter,
  AdapterName,
  AdapterRef,
  ChatParams,
  EmbedParams,
  EmbedResult,
  GenerateParams,
  InitializeResult,
  LocalModel,
  MethodName,
  ModelDescription,
  ModelsDeleteResult,
  ModelsFinetuneParams,
  ModelsFinetuneResult,
  ModelsFuseParams,
  ModelsFuseResult,
  ModelsLoadParams,
  ModelsStatusResult,
  ModelsUnloadResult,
  ParamsOf,
  Profile,
  ProfileFields,
  ProfileName,
  ProfilesDeleteResult,
  ProfilesListResult,
  ProgressParams,
  ResultOf,
  ServerStatusResult,
  TokenizeResult,
} from "./protocol";
import type { CloseResult, Session, SessionEnd, SessionOptions, StopTimeouts } from "./session";
import { distributedEnv, draftModelsEnv, profilesDirEnv, type DistributedOptions, type DraftModels } from "./settings";
import { DEFAULT_RESTART_POLICY, Supervisor, type RestartPolicy, type SupervisorHooks } from "./supervisor";

/** Where log lines go: any console-like object (`console`, pino, winston…); every method optional. */
export interface Logger {
  debug?(message: string): void;
  info?(message: string): void;
  warn?(message: string): void;
  error?(message: string): void;
}

/**
 * One `$/progress` report of a long call: `completed` of `total` `unit`s, in `phase`. A download
 * adds `file`, `bytesPerSecond` and `etaSeconds`; a fine-tuning run, see `FinetuneProgress`.
 */
export type Progress = Omit<ProgressParams, "token">;

/** Progress of a model load (or download). */
export type LoadProgress = Progress;

/**
 * Progress of `finetune()`: phases "validate" (the dataset), "load" (the base model), "train" and
 * "save". In "train", `completed` is `iteration` of `total` iterations, with `trainLoss` (mean
 * since the last report), `valLoss` (the last evaluation, once there is one), `tokensPerSecond`,
 * `peakMemoryBytes` (the trainer's) and `etaSeconds`. A base not yet on disk reports its download first.
 */
export type FinetuneProgress = Progress;

export interface LocalMLXOptions {
  /** Loaded by `start()`, reloaded after a restart, and used when a chat or generate names no model. */
  model?: string;
  /** Progress of loading `model` during `start()`. */
  onProgress?: (progress: LoadProgress) => void;
  /**
   * The Python that runs the sidecar (`python -P -m sidecar serve`). Without it the client looks
   * for the sidecar: `LOCALMLX_PYTHON`, then the `localmlx` entry point on PATH, then the private
   * virtualenv of `npx @localmlx/client setup`, then the checkout's `.venv`, then `python3` (see `findSidecar`).
   */
  python?: string;
  /** Replaces the arguments after the program found (`-P -m sidecar serve`, or `serve` for the entry point). */
  args?: readonly string[];
  /** Working directory of the sidecar. Default: the host's, or the localmlx checkout when the package lives in one. */
  cwd?: string;
  /** Extra environment (`LOCALMLX_*` settings), merged over `process.env`. */
  env?: Record<string, string | undefined>;
  /**
   * Serve models sharded over several machines (README "Several Macs"): the `LOCALMLX_HOSTFILE`
   * and `LOCALMLX_DISTRIBUTED_*` settings, merged over `env`. A bad value throws `SettingsError`.
   */
  distributed?: DistributedOptions;
  /**
   * Speculative decoding (README "Speculative decoding"): each target model's default draft
   * model, `{ target: draft }` or `"target=draft,…"`, as `LOCALMLX_DRAFT_MODELS` merged over
   * `env`. A request overrides it with `draftModel` (`null`: none). A bad value throws `SettingsError`.
   */
  draftModels?: DraftModels;
  /**
   * Profiles (README "Profiles"): a directory of `<name>.toml` files, read before the models
   * dir's `profiles/` and written by `profiles.save()`, as `LOCALMLX_PROFILES_DIR` merged over `env`.
   */
  profilesDir?: string;
  /** Sent in `initialize`. Default `{ name: "@localmlx/client", version }`. */
  clientInfo?: { name: string; version?: string };
  /** Spawn + `initialize` must finish within this. Default 60000. */
  startTimeoutMs?: number;
  /** Default timeout of every call (0: none). Default 600000 (10 minutes). */
  requestTimeoutMs?: number;
  /** Longest line accepted from the sidecar. Default 64 MiB. */
  maxMessageBytes?: number;
  /** How much of the sidecar's stderr is kept for error reports. Default 64 KiB. */
  stderrTailBytes?: number;
  /**
   * Unread chunks of one prediction kept apart (at least 1); past it, newly arrived text joins the
   * last unread chunk, so a lagging consumer costs memory in proportion to the text only. It never
   * pauses the wire. Default 64.
   */
  highWaterMark?: number;
  /** Restart after a crash (on the next call), or `false` to stay down. */
  restart?: Partial<RestartPolicy> | false;
  /** Timeouts of the steps of `close()`. */
  closeTimeouts?: Partial<StopTimeouts>;
  /** Keep the host's event loop alive while idle. Default false: an idle sidecar never holds the host open. */
  keepAlive?: boolean;
  /** Receives the sidecar's stderr lines (at their level) and the client's own warnings. */
  logger?: Logger;
}

/** Per-call options. */
export interface CallOptions {
  signal?: AbortSignal;
  /** Overrides `requestTimeoutMs` for this call (0: none). */
  timeoutMs?: number;
}

/** Options of a call that reports `$/progress`. */
export interface ProgressOptions extends CallOptions {
  onProgress?: (progress: Progress) => void;
}

export interface LoadOptions extends ProgressOptions {
  /**
   * A LoRA/DoRA adapter to serve on the model: a name from `models.adapters()` or an adapter
   * directory. The result is the model `<base>+<adapter>`, sharing the base's weights in memory.
   */
  adapter?: AdapterRef;
}

/** `models/finetune`'s parameters (see `ModelsFinetuneParams`): `model` and `dataset` at least. */
export type FinetuneParams = Omit<ModelsFinetuneParams, "_meta">;

/** `finetune()`'s options. `timeoutMs` defaults to none: a run takes what it takes; abort it with `signal`. */
export type FinetuneOptions = ProgressOptions;

/** `models/fuse`'s parameters (see `ModelsFuseParams`): `model` and `adapter` at least. */
export type FuseParams = Omit<ModelsFuseParams, "_meta">;

export interface DeleteOptions extends CallOptions {
  /** Unload it first when loaded (its requests end with -32802); without it a loaded one is refused (-32602). */
  force?: boolean;
}

type StreamingKeys = "stream" | "_meta";
export type ChatOptions = Omit<ChatParams, StreamingKeys> & CallOptions;
export type GenerateOptions = Omit<GenerateParams, StreamingKeys> & CallOptions;
/** `embed` options: `model` (default: the sidecar's choice), `dimensions`, `normalize`, `keepAlive`. */
export type EmbedOptions = Omit<EmbedParams, "input" | "_meta"> & CallOptions;

export interface RestartInfo {
  pid: number | undefined;
  /** 2 for the first restart, and so on. */
  start: number;
  reloaded: string[];
  failed: Array<{ model: string; error: Error }>;
}

/** Events (`mlx.on(name, listener)`); none is needed for normal use. */
export interface LocalMLXEvents {
  /** A sidecar process started: the program (a Python or the `localmlx` entry point), and where it was found. */
  spawn: [info: { pid: number | undefined; python: string; args: readonly string[]; source: SidecarSource | undefined }];
  /** One line the sidecar wrote to stderr, as written (a structured log line is JSON). */
  stderr: [line: string];
  /** One structured log line of the sidecar: `{ time, level, logger, message, exception? }`. */
  log: [record: SidecarLogRecord];
  /** Something odd on stdout was skipped (junk, an oversized line, an unknown id). */
  warning: [warning: WireWarning];
  /** A notification from the sidecar that the client does not handle itself (not a chunk or progress). */
  notification: [method: string, params: unknown];
  /** A sidecar process ended; `expected` when `close()` or `restart()` asked for it. */
  exit: [info: ExitInfo & { expected: boolean }];
  /** The sidecar crashed (or failed to restart); pending calls failed with this error. */
  crash: [error: SidecarCrashError | SidecarStartError];
  /** A restarted sidecar is ready, with the models that were loaded before. */
  restart: [info: RestartInfo];
  /** The restart budget is spent: calls fail with this error until `restart()`. */
  unavailable: [error: SidecarUnavailableError];
}

const DEFAULTS = {
  startTimeoutMs: 60_000,
  requestTimeoutMs: 600_000,
  maxMessageBytes: 64 * 1024 * 1024,
  stderrTailBytes: 64 * 1024,
  highWaterMark: 64,
  closeTimeouts: { gracefulMs: 5_000, terminateMs: 3_000, killMs: 3_000 } satisfies StopTimeouts,
};

/** This package's version (from its package.json). */
export function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(join(packageRoot, "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "0.0.0";
  }
}

/** The model name that routes among the profiles (`routedBy` says which served, and why). */
const AUTO = "auto";

const LEVELS: Record<string, keyof Logger> = {
  DEBUG: "debug",
  INFO: "info",
  WARNING: "warn",
  ERROR: "error",
  CRITICAL: "error",
};

/** Rejects with AbortError when `signal` aborts first. */
function unlessAborted<T>(promise: Promise<T>, signal: AbortSignal | undefined, method: string): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(abortError(signal, method));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(abortError(signal, method));
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/** What a model was loaded by: the reference and, for `<base>+<adapter>`, the adapter asked for. */
type LoadRef = Pick<ModelsLoadParams, "model" | "adapter">;

export class LocalMLX extends TypedEmitter<LocalMLXEvents> {
  /** Models to reload after a restart: sidecar name -> what it was loaded by (least recent first). */
  private readonly loadedModels = new Map<string, LoadRef>();
  private readonly supervisor: Supervisor;
  private readonly options: LocalMLXOptions;
  private readonly closeTimeouts: StopTimeouts;
  /** What the sidecar gets over `process.env`: `env`, then the `distributed`, `draftModels` and `profilesDir` settings. */
  private readonly env: Record<string, string | undefined>;
  private lastId = 0;

  /** Model management. */
  readonly models = {
    /** Loads a model (a name, a local path or a Hub repo id); it is reloaded after a restart. */
    load: (model: string, options: LoadOptions = {}): Promise<ModelDescription> => this.load(model, options),
    /** Unloads a model (a base model with the `<base>+<adapter>` variants on it); `unloaded` is false when it was not loaded. */
    unload: async (model: string, options: CallOptions = {}): Promise<ModelsUnloadResult> => {
      const result = await this.request("models/unload", { model }, options);
      this.forgetModel(result.model);
      return result;
    },
    /** Deletes a model's files (under the models dir or in the Hugging Face cache). */
    delete: async (model: string, options: DeleteOptions = {}): Promise<ModelsDeleteResult> => {
      const { force, ...callOptions } = options;
      const result = await this.request("models/delete", { model, ...(force !== undefined ? { force } : {}) }, callOptions);
      if (result.unloaded) this.forgetModel(result.model);
      return result;
    },
    /** Deletes a stored adapter (`force`: unload the variants that serve it first). */
    deleteAdapter: async (adapter: AdapterName, options: DeleteOptions = {}): Promise<ModelsDeleteResult> => {
      const { force, ...callOptions } = options;
      const result = await this.request("models/delete", { adapter, ...(force !== undefined ? { force } : {}) }, callOptions);
      for (const [name, ref] of [...this.loadedModels]) {
        if (ref.adapter === adapter || name.endsWith(`+${adapter}`)) this.loadedModels.delete(name);
      }
      return result;
    },
    /** Where one model stands: loaded, loading, available on disk, or downloadable. */
    status: (model: string, options: CallOptions = {}): Promise<ModelsStatusResult> =>
      this.request("models/status", { model }, options),
    /** The models available locally (embedded, models dir, Hugging Face cache). */
    list: async (options: CallOptions = {}): Promise<LocalModel[]> =>
      (await this.request("models/list", {}, options)).models,
    /** The adapters on disk: base, rank, size, the training run that made each, and `loadedAs`. */
    adapters: async (options: CallOptions = {}): Promise<Adapter[]> =>
      (await this.request("models/list", {}, options)).adapters,
  };

  /**
   * Profiles: named model setups (base model, chat template, system prompt, default params,
   * context length, keep-alive, draft model, tasks), one TOML file each. A profile's name works
   * wherever a model's does (`chat`, `generate`, `embed`, `models.load`…), and `model: "auto"`
   * routes among them by `task` (the result says `profile` and `routedBy`).
   */
  readonly profiles = {
    /** Every profile that reads, and `errors`: each file that does not, with why (it is skipped, never fatal). */
    list: (options: CallOptions = {}): Promise<ProfilesListResult> => this.request("profiles/list", {}, options),
    /** One profile; `RpcError` -32010 when there is none of that name, -32602 when its file is malformed. */
    get: (name: ProfileName, options: CallOptions = {}): Promise<Profile> => this.request("profiles/get", { name }, options),
    /**
     * Writes `<name>.toml` whole (camelCase fields, as `Profile` has them) and returns it as read
     * back. `overwrite: false` refuses a name already taken (-32602); a bad field is -32602 naming it.
     */
    save: (name: ProfileName, fields: ProfileFields, options: CallOptions & { overwrite?: boolean } = {}): Promise<Profile> => {
      const { overwrite, ...callOptions } = options;
      return this.request("profiles/save", { name, profile: fields, ...(overwrite !== undefined ? { overwrite } : {}) }, callOptions);
    },
    /** Removes the profile's file; `deleted` is false when there was none. */
    delete: (name: ProfileName, options: CallOptions = {}): Promise<ProfilesDeleteResult> =>
      this.request("profiles/delete", { name }, options),
  };

  /** Starts the sidecar (and loads `options.model`); rejects with SidecarStartError when it cannot. */
  static async start(options: LocalMLXOptions = {}): Promise<LocalMLX> {
    const client = new LocalMLX(options);
    try {
      await client.supervisor.start();
      if (options.model !== undefined) {
        await client.load(options.model, options.onProgress ? { onProgress: options.onProgress } : {});
      }
    } catch (error) {
      await client.close();
      throw error;
    }
    return client;
  }

  private constructor(options: LocalMLXOptions) {
    super();
    this.options = options;
    this.closeTimeouts = { ...DEFAULTS.closeTimeouts, ...options.closeTimeouts };
    this.env = {
      ...options.env,
      ...distributedEnv(options.distributed),
      ...draftModelsEnv(options.draftModels),
      ...profilesDirEnv(options.profilesDir),
    };
    const candidates = findSidecar({
      python: options.python,
      args: options.args,
      cwd: options.cwd,
      env: { ...process.env, ...this.env },
    });
    this.supervisor = new Supervisor(
      this.sessionOptions(candidates.find((candidate) => candidate.command)),
      options.restart === false ? false : { ...DEFAULT_RESTART_POLICY, ...options.restart },
      this.supervisorHooks(),
      candidates,
    );
  }

  /** How each sidecar is spawned and spoken to: the first candidate found, the client's options. */
  private sessionOptions(first: SidecarCandidate | undefined): SessionOptions {
    const { options } = this;
    const logger = options.logger;
    return {
      spawn: {
        python: first?.command ?? "python3",
        args: first?.args ?? options.args ?? DEFAULT_SIDECAR_ARGS,
        cwd: first?.cwd ?? options.cwd,
        // Structured log lines (one JSON object each); the host's own env setting wins.
        env: { LOCALMLX_LOG_FORMAT: "json", ...this.env },
        stderrTailBytes: options.stderrTailBytes ?? DEFAULTS.stderrTailBytes,
        onStderrLine: (line, record) => {
          if (record) {
            logger?.[LEVELS[record.level] ?? "info"]?.(`localmlx: ${formatLogRecord(record, { time: false, level: false })}`);
          } else {
            logger?.info?.(`localmlx: ${line}`);
          }
          this.emit("stderr", line);
          if (record) this.emit("log", record);
        },
      },
      clientInfo: options.clientInfo ?? { name: "@localmlx/client", version: packageVersion() },
      startTimeoutMs: options.startTimeoutMs ?? DEFAULTS.startTimeoutMs,
      maxMessageBytes: options.maxMessageBytes ?? DEFAULTS.maxMessageBytes,
      keepAlive: options.keepAlive ?? false,
      nextId: () => ++this.lastId,
      onWarning: (warning) => {
        logger?.warn?.(`localmlx client: ${warning.message}${warning.line ? `: ${warning.line}` : ""}`);
        this.emit("warning", warning);
      },
      onNotification: (method, params) => this.emit("notification", method, params),
    };
  }

  /** What the supervisor tells the client: each spawn, end, crash and restart, as events and log lines. */
  private supervisorHooks(): SupervisorHooks {
    const logger = this.options.logger;
    return {
      restore: (session) => this.restore(session),
      onSpawn: (session) =>
        this.emit("spawn", {
          pid: session.pid,
          python: session.process.spec.python,
          args: session.process.spec.args,
          source: this.supervisor.chosen?.source,
        }),
      onEnd: (_session: Session, end: SessionEnd) => {
        if (!end.expected) logger?.error?.(`localmlx client: ${end.error.message}`);
        this.emit("exit", { ...end.info, expected: end.expected });
      },
      onCrash: (error) => this.emit("crash", error),
      onUnavailable: (error) => {
        logger?.error?.(`localmlx client: ${error.message}`);
        this.emit("unavailable", error);
      },
    };
  }

  // ---- generation ----------------------------------------------------------------------

  /**
   * A chat completion, streamed. Iterate it for chunks, or await `.result` (or the prediction
   * itself) for `{ text, finishReason, usage, timings }`. Through a profile (its name as `model`,
   * or `"auto"` with an optional `task`), the result adds `profile`, and `routedBy` for `"auto"`.
   */
  chat(options: ChatOptions): Prediction {
    return this.predict("chat", options);
  }

  /** A raw-prompt completion (no chat template), streamed like `chat`. */
  generate(options: GenerateOptions): Prediction {
    return this.predict("generate", options);
  }

  private predict(method: "chat" | "generate", options: ChatOptions | GenerateOptions): Prediction {
    const { signal, timeoutMs, ...params } = options;
    if (params.model === undefined && this.options.model !== undefined) params.model = this.options.model;
    const prediction = new Prediction({
      method,
      model: params.model,
      signal,
      timeoutMs: timeoutMs ?? this.options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs,
      highWaterMark: Math.max(1, this.options.highWaterMark ?? DEFAULTS.highWaterMark),
      onWarning: (warning) => this.emit("warning", warning),
      // Reloaded after a restart by the name it was asked for; "auto" by the profile it chose.
      onResult: (result: PredictionResult) =>
        this.touchModel(result.model, { model: params.model === AUTO ? result.profile ?? result.model : params.model ?? result.model }),
    });
    this.supervisor.acquire().then(
      (session) => prediction.start(session.connection, params as Record<string, unknown>),
      (error: unknown) => prediction.fail(error),
    );
    return prediction;
  }

  // ---- other calls ---------------------------------------------------------------------

  /**
   * Embedding vectors of one text or several (one vector per text, in order): `{ model, vectors,
   * dimensions, usage, timings }`. Unit length unless `normalize: false`; `dimensions` keeps the
   * first n components. Without `model`, the sidecar chooses (see PROTOCOL.md, `embed`).
   */
  async embed(input: string | string[], options: EmbedOptions = {}): Promise<EmbedResult> {
    const { signal, timeoutMs, ...params } = options;
    const result = await this.request("embed", { ...params, input: typeof input === "string" ? [input] : input }, { signal, timeoutMs });
    this.touchModel(result.model, { model: params.model ?? result.model });
    return result;
  }

  /**
   * Fine-tunes a LoRA (or DoRA) adapter on `params.model` with a dataset (a JSONL file, a folder of
   * train.jsonl/valid.jsonl, or a folder of notes), in a worker process while the sidecar keeps
   * serving. Resolves when the adapter is written: serve it at once as `result.model`
   * (`<base>+<adapter>`). Aborting `signal` stops the run within seconds and rejects with
   * `AbortError`, leaving no adapter (or only its last checkpoint, with `keepCheckpoint`). A bad
   * dataset is `RpcError` -32602 with `data.file`, `data.line` and `data.reason`, before any training;
   * a run that does not fit the memory budget -32014; a trainer that fails -32020 (TrainingFailed).
   */
  finetune(params: FinetuneParams, options: FinetuneOptions = {}): Promise<ModelsFinetuneResult> {
    return this.requestWithProgress("models/finetune", params, { ...options, timeoutMs: options.timeoutMs ?? 0 });
  }

  /**
   * Fuses an adapter into its base and writes a standalone model (optionally quantized) that loads
   * like any other, as `result.model`.
   */
  fuse(params: FuseParams, options: ProgressOptions = {}): Promise<ModelsFuseResult> {
    return this.requestWithProgress("models/fuse", params, options);
  }

  /** Server state: loaded models, active and queued requests, memory. */
  status(options: CallOptions = {}): Promise<ServerStatusResult> {
    return this.request("server/status", {}, options);
  }

  /** Token ids of `text` for a model (default: the current one). */
  tokenize(text: string, options: CallOptions & { model?: string; addSpecialTokens?: boolean } = {}): Promise<TokenizeResult> {
    const { signal, timeoutMs, ...rest } = options;
    const model = rest.model ?? this.options.model;
    return this.request("tokenize", { text, ...rest, ...(model !== undefined ? { model } : {}) }, { signal, timeoutMs });
  }

  /** A round trip to the sidecar. */
  async ping(options: CallOptions = {}): Promise<void> {
    await this.request("ping", {}, options);
  }

  /**
   * Any method of the protocol, typed from the schema. Use `chat()`/`generate()` for
   * generation: this form does not stream.
   */
  async request<M extends MethodName>(
    method: M,
    params: ParamsOf<M>,
    options: CallOptions & { onProgress?: (progress: ProgressParams) => void } = {},
  ): Promise<ResultOf<M>> {
    // Aborting also stops waiting for a sidecar that is (re)starting.
    const session = await unlessAborted(this.supervisor.acquire(), options.signal, method);
    const requestOptions: RequestOptions = {
      signal: options.signal,
      timeoutMs: options.timeoutMs ?? this.options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs,
      onProgress: options.onProgress,
    };
    return session.connection.request(method, params, requestOptions);
  }

  /** `request`, with progress reports as `Progress` (the wire's token left out). */
  private requestWithProgress<M extends "models/load" | "models/finetune" | "models/fuse">(
    method: M,
    params: ParamsOf<M>,
    options: ProgressOptions,
  ): Promise<ResultOf<M>> {
    const { onProgress, ...callOptions } = options;
    return this.request(method, params, {
      ...callOptions,
      ...(onProgress ? { onProgress: ({ token: _token, ...progress }: ProgressParams) => onProgress(progress) } : {}),
    });
  }

  private async load(model: string, options: LoadOptions): Promise<ModelDescription> {
    const { adapter, ...progressOptions } = options;
    const ref: LoadRef = adapter !== undefined ? { model, adapter } : { model };
    const description = await this.requestWithProgress("models/load", ref, progressOptions);
    this.touchModel(description.model, ref);
    return description;
  }

  /** Remembers a loaded model, most recent last, as many as the sidecar keeps. */
  private touchModel(name: string, ref: LoadRef): void {
    const known = this.loadedModels.get(name);
    this.loadedModels.delete(name);
    this.loadedModels.set(name, known ?? ref);
    const keep = this.supervisor.current?.info?.limits.maxLoadedModels ?? Infinity;
    while (this.loadedModels.size > keep) this.loadedModels.delete(this.loadedModels.keys().next().value!);
  }

  /** Forgets an unloaded model, and the `<base>+<adapter>` variants that went with it (the sidecar unloads those too). */
  private forgetModel(name: string): void {
    for (const loaded of [...this.loadedModels.keys()]) {
      if (loaded === name || loaded.startsWith(`${name}+`)) this.loadedModels.delete(loaded);
    }
  }

  /** After a restart: reload the models that were loaded, in the order they were last used. */
  private async restore(session: Session): Promise<void> {
    const info: RestartInfo = { pid: session.pid, start: this.supervisor.starts, reloaded: [], failed: [] };
    for (const [name, ref] of [...this.loadedModels]) {
      try {
        await session.connection.request("models/load", { ...ref }, { timeoutMs: this.options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs });
        info.reloaded.push(name);
      } catch (error) {
        info.failed.push({ model: name, error: error as Error });
        this.options.logger?.warn?.(`localmlx client: could not reload ${name} after a restart: ${(error as Error).message}`);
      }
    }
    this.options.logger?.info?.(`localmlx client: sidecar restarted (pid ${session.pid}); reloaded ${info.reloaded.join(", ") || "no models"}`);
    this.emit("restart", info);
  }

  // ---- state and lifetime --------------------------------------------------------------

  /** The `initialize` result of the running sidecar (server info, limits, defaults). */
  get info(): InitializeResult | undefined {
    return this.supervisor.current?.info;
  }

  /** How the sidecar was found and started: `{ source, label, command, args, cwd }`. */
  get sidecar(): SidecarCandidate | undefined {
    return this.supervisor.chosen;
  }

  /** The running sidecar's process id. */
  get pid(): number | undefined {
    return this.supervisor.current?.pid;
  }

  /** Models the client will reload after a restart (least recently used first). */
  get trackedModels(): string[] {
    return [...this.loadedModels.keys()];
  }

  /** Stops the sidecar gracefully and starts a new one now; also resets the crash budget. */
  async restart(): Promise<void> {
    await this.supervisor.restartNow(this.closeTimeouts);
  }

  /**
   * Stops the sidecar: `shutdown` then `exit` and EOF, then SIGTERM, then SIGKILL, each after a
   * timeout. Pending calls fail with ClientClosedError. Safe to call more than once.
   */
  close(timeouts: Partial<StopTimeouts> = {}): Promise<CloseResult> {
    return this.supervisor.close({ ...this.closeTimeouts, ...timeouts });
  }

  /** `await using mlx = await LocalMLX.start()`: closes the sidecar when the scope ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

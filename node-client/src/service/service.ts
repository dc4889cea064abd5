/**
 * The OpenAI-compatible endpoint as a long-running service (`localmlx-client serve`): every tier
 * of the config on its own port, all served by one sidecar. `GET /health` on any port says what
 * runs; `reload()` (SIGHUP) applies a changed config without dropping requests in flight;
 * `stop()` (SIGTERM) lets them finish up to a deadline and leaves no sidecar behind.
 */
import { packageVersion, type LocalMLXOptions, type Logger } from "../client";
import { Fallback, fallbackOptionsFromEnv } from "../openai/fallback";
import { readSetting } from "../settings";
import { startOpenAIServer, type OpenAIListen, type OpenAIRequestInfo, type OpenAIServer } from "../openai/server";
import { loadServiceConfig, type LoadedServiceConfig, type ServiceConfig, type ServiceLogFormat } from "./config";
import { ServiceLog } from "./log";

export interface EndpointServiceOptions {
  /** The config file (it must exist). Default: `LOCALMLX_SERVE_CONFIG`, the default path, or the defaults. `reload()` reads it again. */
  configPath?: string;
  /** The environment it reads (`LOCALMLX_SERVE_CONFIG`, the fallback's settings). Default `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** Overrides the config's `log.format` (the `--log-format` flag). */
  logFormat?: ServiceLogFormat;
  /** Where log lines go. Default: stderr. */
  write?: (line: string) => void;
}

/** One tier as `/health` reports it. */
export interface TierStatus {
  name: string;
  host: string;
  port: number;
  url: string;
  model: string;
  /** Whether the model is on this machine (checked at start and reload); undefined until checked. */
  available?: boolean;
}


export function startEndpointService(options: EndpointServiceOptions = {}): Promise<EndpointService> {
  return EndpointService.start(options);
}

export class EndpointService {
  readonly log: ServiceLog;
  private loaded: LoadedServiceConfig;
  private server!: OpenAIServer;
  private readonly env: NodeJS.ProcessEnv;
  private readonly startedAt = Date.now();
  private readonly available = new Map<string, boolean>();
  private reloads: Promise<unknown> = Promise.resolve();
  private stopping: Promise<void> | undefined;

  /** Reads the config (rejects with `ServiceConfigError` on a bad one), starts the sidecar and listens. */
  static async start(options: EndpointServiceOptions = {}): Promise<EndpointService> {
    const env = options.env ?? process.env;
    const service = new EndpointService(options, loadServiceConfig({ ...(options.configPath ? { path: options.configPath } : {}), env }));
    await service.open();
    return service;
  }

  private constructor(
    private readonly options: EndpointServiceOptions,
    loaded: LoadedServiceConfig,
  ) {
    this.env = options.env ?? process.env;
    this.loaded = loaded;
    this.log = new ServiceLog(this.formatOf(loaded.config), loaded.config.log.level, options.write);
  }

  private formatOf(config: ServiceConfig): ServiceLogFormat {
    return this.options.logFormat ?? config.log.format ?? (process.stderr.isTTY ? "text" : "json");
  }

  get config(): ServiceConfig {
    return this.loaded.config;
  }

  /** The file the config came from (undefined: the built-in defaults). */
  get configPath(): string | undefined {
    return this.loaded.path;
  }

  /** The OpenAI endpoint behind it (its addresses, its sidecar). */
  get endpoint(): OpenAIServer {
    return this.server;
  }

  private async open(): Promise<void> {
    const { config } = this.loaded;
    const fallbackOptions = fallbackOptionsFromEnv(this.env); // none unless LOCALMLX_FALLBACK_TO_OPENAI=true
    const fallback = fallbackOptions ? new Fallback({ ...fallbackOptions, logger: this.log.logger("fallback", ["warn"]) }, this.env) : false;
    this.server = await startOpenAIServer({
      localmlx: this.sidecarOptions(config),
      listen: listenersOf(config),
      host: config.host,
      ...(config.apiKey ? { apiKey: config.apiKey } : {}),
      fallback,
      // Requests are logged from the `request` event, with their fields; the text lines are not needed.
      logger: this.log.logger("endpoint", ["warn", "error"]),
      health: (port) => this.health(port),
      requireSidecar: false,
    });
    this.server.on("request", (info) => this.logRequest(info));
    await this.checkModels();
    const sidecar = this.server.local.status;
    this.log.info("serving", {
      config: this.loaded.path ?? "(built-in defaults)",
      sidecar: sidecar.state,
      sidecarPid: sidecar.pid,
      fallback: this.server.fallback ? this.server.fallback.baseURL : "off",
      pid: process.pid,
    });
    for (const tier of this.tiers()) this.log.info("tier", { tier: tier.name, url: tier.url, model: tier.model });
  }

  private sidecarOptions(config: ServiceConfig): LocalMLXOptions {
    const env: Record<string, string> = { ...config.sidecar.env };
    // Every tier's model may stay loaded (the sidecar's default is 2), unless told otherwise.
    if (env.LOCALMLX_MAX_LOADED_MODELS === undefined && this.env.LOCALMLX_MAX_LOADED_MODELS === undefined) {
      env.LOCALMLX_MAX_LOADED_MODELS = String(Math.max(2, new Set(Object.values(config.tiers).map((tier) => tier.model)).size));
    }
    return {
      env,
      ...(config.sidecar.python ? { python: config.sidecar.python } : {}),
      clientInfo: { name: "localmlx-serve", version: packageVersion() },
      logger: this.sidecarLogger(),
    };
  }

  /** The sidecar's lines (`localmlx: localmlx.engine: message`), with its logger as a field. */
  private sidecarLogger(): Logger {
    const out: Logger = {};
    for (const level of ["debug", "info", "warn", "error"] as const) {
      out[level] = (line: string) => {
        const match = /^localmlx: (localmlx[\w.]*): ([^]*)$/.exec(line);
        this.log.log(level, match ? match[2]! : line, { source: "sidecar", ...(match ? { logger: match[1] } : {}) });
      };
    }
    return out;
  }

  /** Each tier with where it listens (the bound port when the config said 0). */
  tiers(): TierStatus[] {
    const addresses = this.server.addresses;
    return Object.entries(this.config.tiers).map(([name, tier], index) => {
      const address = tier.port === 0 ? addresses[index] : addresses.find((a) => a.port === tier.port);
      const host = address?.host ?? tier.host ?? this.config.host;
      const port = address?.port ?? tier.port;
      const available = this.available.get(tier.model);
      return {
        name,
        host,
        port,
        url: address?.url ?? `http://${host.includes(":") ? `[${host}]` : host}:${port}/v1`,
        model: tier.model,
        ...(available !== undefined ? { available } : {}),
      };
    });
  }

  /** What `GET /health` answers on `port`: `status` `ok`, or `degraded` (503) while the sidecar is down. */
  health(port: number): Record<string, unknown> {
    const tiers = this.tiers();
    const sidecar = this.server.local.status;
    const fallback = this.server.fallback;
    return {
      status: sidecar.state === "down" ? "degraded" : "ok",
      service: "localmlx",
      version: packageVersion(),
      pid: process.pid,
      uptimeS: Math.round((Date.now() - this.startedAt) / 1000),
      config: this.loaded.path ?? null,
      tier: tiers.find((tier) => tier.port === port)?.name ?? null,
      tiers,
      sidecar,
      fallback: fallback ? { enabled: true, baseURL: fallback.baseURL, coolingDown: fallback.coolingDown } : { enabled: false },
    };
  }

  private logRequest(info: OpenAIRequestInfo): void {
    const tier = this.tiers().find((t) => t.port === info.port)?.name;
    // Requests that only poll (health checks, model lists) are logged at debug level.
    const level = this.server.isPoll(info.path) && info.status < 400 ? "debug" : info.status >= 500 ? "warn" : "info";
    this.log.log(level, "request", { tier, ...info });
  }

  /** Which tier models are on this machine; a missing one gets a warning that says how to get it. Then preloads. */
  private async checkModels(): Promise<void> {
    const client = this.server.local.current;
    if (!client || client.pid === undefined) return;
    let names: Set<string>;
    try {
      const models = await client.models.list();
      // A tier may name a profile (README "Wooster's tiers as profiles"); a sidecar without profiles/list has none.
      const profiles = await client.request("profiles/list", {}).then((listed) => listed.profiles.map((profile) => profile.name), () => []);
      names = new Set([...models.flatMap((model) => [model.model, ...(model.repo ? [model.repo] : [])]), ...profiles]);
    } catch (error) {
      this.log.warn("could not list the sidecar's models", { error: (error as Error).message });
      return;
    }
    // The sidecar's environment: the config's over the service's (it started, so the value parsed there too).
    const autoDownload = readSetting({ ...this.env, ...this.config.sidecar.env }, "autoDownload") === true;
    for (const [name, tier] of Object.entries(this.config.tiers)) {
      const available = names.has(tier.model) || /^[/~.]/.test(tier.model);
      this.available.set(tier.model, available);
      if (!available) {
        this.log.warn(
          autoDownload
            ? "the tier's model is not on this machine yet; it downloads on first use (LOCALMLX_AUTO_DOWNLOAD)"
            : "the tier's model is not on this machine: download it (localmlx models pull <model>), or set LOCALMLX_AUTO_DOWNLOAD=true in the config's sidecar.env",
          { tier: name, model: tier.model },
        );
      } else if (tier.preload) {
        const started = Date.now();
        client.models.load(tier.model).then(
          () => this.log.info("preloaded", { tier: name, model: tier.model, ms: Date.now() - started }),
          (error: unknown) => this.log.warn("could not preload", { tier: name, model: tier.model, error: (error as Error).message }),
        );
      }
    }
  }

  /**
   * Reads the config again and applies it: tiers' models at once (requests in flight keep
   * theirs), ports that changed are listened on anew, the old ones finish their requests. A
   * config with an error changes nothing. Sidecar settings and `apiKey` apply at the next start.
   * Resolves false when nothing could be applied.
   */
  reload(): Promise<boolean> {
    const run = async (): Promise<boolean> => {
      if (this.stopping) return false;
      let next: LoadedServiceConfig;
      try {
        next = loadServiceConfig({ ...(this.options.configPath ? { path: this.options.configPath } : {}), env: this.env });
      } catch (error) {
        this.log.error("reload refused: the config has an error; the running one stays", { error: (error as Error).message });
        return false;
      }
      const before = this.config;
      const pending = [
        ...(JSON.stringify(before.sidecar) !== JSON.stringify(next.config.sidecar) ? ["sidecar"] : []),
        ...(before.apiKey !== next.config.apiKey ? ["apiKey"] : []),
      ];
      if (pending.length) this.log.warn("these settings apply when the service restarts", { keys: pending });
      // What runs keeps the settings that apply only at a restart, so /health says what is in force.
      this.loaded = { config: { ...next.config, sidecar: before.sidecar, apiKey: before.apiKey }, path: next.path };
      this.log.format = this.formatOf(next.config);
      this.log.level = next.config.log.level;
      try {
        await this.server.setListeners(listenersOf(next.config));
      } catch (error) {
        this.log.error("reload: some tiers are not listening", { error: (error as Error).message });
      }
      this.log.info("reloaded", { config: next.path ?? "(built-in defaults)", tiers: this.tiers().map((t) => `${t.name}=${t.port}:${t.model}`) });
      await this.checkModels();
      return true;
    };
    const result = this.reloads.then(run, run);
    this.reloads = result;
    return result;
  }

  /** Stops listening, lets requests in flight finish for up to `drainMs` (default the config's), then stops the sidecar. */
  stop(drainMs: number = this.config.drainTimeoutMs): Promise<void> {
    if (this.stopping) {
      void this.server.close({ drainMs }); // stopping already: a shorter deadline
      return this.stopping;
    }
    this.stopping = (async () => {
      this.log.info("stopping", { drainMs });
      await this.server.close({ drainMs });
      this.log.info("stopped", { sidecar: this.server.local.status.state });
    })();
    return this.stopping;
  }
}

/** The endpoint's listeners: each tier's port, serving its model whatever name is asked for. */
export function listenersOf(config: ServiceConfig): OpenAIListen[] {
  return Object.values(config.tiers).map((tier) => ({ port: tier.port, ...(tier.host ? { host: tier.host } : {}), aliases: { "*": tier.model } }));
}

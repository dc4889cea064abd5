/**
 * localMLX: a Wooster plugin that runs MLX language models locally through `@localmlx/client`.
 *
 * Drop this folder into Wooster's `src/plugins/localMLX/` (or run
 * `npx @localmlx/client wooster-install <wooster-dir>`), and enable it with
 * `PLUGIN_LOCALMLX_ENABLED=true`. Loading the plugin starts nothing heavy: the sidecar (the
 * Python process holding the models) starts on the first tool call, and stops when Wooster exits.
 * With `LOCALMLX_AUTO_START_SERVER=true` it also serves the loopback OpenAI-compatible endpoint,
 * so Wooster's own agent, router and embeddings can run on the same local models.
 *
 * At start-up it says, as warnings in Wooster's log, what will keep Wooster from staying local
 * (the checks `npx @localmlx/client wooster-doctor` makes): the settings at once, the endpoints
 * Wooster calls in the background, after a short grace, so Wooster's start waits for nothing.
 */
import { setTimeout as delay } from "node:timers/promises";
import type { DynamicTool } from "@langchain/core/tools";
import {
  checkWoosterEndpoints,
  checkWoosterEnv,
  startOpenAIServer,
  type OpenAIListen,
  type OpenAIServer,
  type ReadinessFinding,
} from "@localmlx/client";
import { readSettings, type LocalMLXPluginSettings } from "./config";
import { createRemote } from "./remote";
import { LocalMLXService, type PluginLog } from "./service";
import { createTools } from "./tools";
import { LogLevel, type AppConfig, type CoreServices, type WoosterPlugin } from "./types";

export { LocalMLXService } from "./service";
export type { LocalMLXPluginSettings } from "./config";

/** How long after start-up the plugin asks Wooster's endpoints (ms): Wooster is done starting by then. */
const ENDPOINT_CHECK_GRACE_MS = 1500;

export class LocalMLXPlugin implements WoosterPlugin {
  static readonly pluginName = "localMLX";
  static readonly version = "0.1.0";
  static readonly description =
    "Local MLX language models (chat, generation, code help, summaries, batches, images, model management) through the localmlx sidecar, " +
    "with an optional OpenAI-compatible endpoint and remote fallback.";

  readonly name = LocalMLXPlugin.pluginName;
  readonly version = LocalMLXPlugin.version;
  readonly description = LocalMLXPlugin.description;

  private services: CoreServices | undefined;
  private config: AppConfig | undefined;
  private settings: LocalMLXPluginSettings | undefined;
  private service: LocalMLXService | undefined;
  private server: OpenAIServer | undefined;
  private readonly checks = new AbortController();
  /** The readiness findings logged so far: the settings' at start-up, then the endpoints'. */
  private readonly findings: ReadinessFinding[] = [];
  private endpointsChecked: Promise<ReadinessFinding[]> = Promise.resolve([]);

  /** Wooster's log, or the console when Wooster gives none. */
  private readonly log: PluginLog = (level, message) => {
    const line = `[${LocalMLXPlugin.pluginName}] ${message}`;
    // Wooster's log util.format()s the message with the metadata argument, which its
    // CoreServices always passes (undefined prints as " undefined"): give it an empty string,
    // and keep a literal % from reading as a format specifier.
    if (this.services?.log) this.services.log(level, line.replace(/%/g, "%%"), "" as unknown as object);
    else if (level === LogLevel.ERROR || level === LogLevel.WARN) console.error(`[${level}] ${line}`);
  };

  async initialize(config: AppConfig, services: CoreServices): Promise<void> {
    this.services = services;
    const appConfig = config ?? services.getConfig?.();
    this.config = appConfig;
    const settings = readSettings(appConfig);
    this.settings = settings;
    const remote = createRemote(settings.fallbackToOpenAI, appConfig);
    if (settings.fallbackToOpenAI && !remote) {
      this.log(LogLevel.WARN, "LOCALMLX_FALLBACK_TO_OPENAI is on, but there is no remote to fall back to: set OPENAI_API_KEY (and OPENAI_BASE_URL for a server other than OpenAI).");
    }
    this.service = new LocalMLXService(settings, this.log, remote);
    services.registerService(LocalMLXService.serviceName, this.service);
    this.log(
      LogLevel.INFO,
      `initialized (model ${settings.defaultModel ?? "sidecar default"}, tools ${settings.toolsEnabled ? "on" : "off"}, ` +
        `fallback ${remote ? remote.label : "off"}); the sidecar starts on first use`,
    );
    this.warnAbout(checkWoosterEnv(process.env));
    if (settings.autoStartServer) await this.startServer(settings);
    else if (settings.preloadModels.length) void this.service.ensureStarted();
    this.service.onStop(() => this.checks.abort());
    this.endpointsChecked = this.checkEndpointsLater();
  }

  /** Each problem as a WARN line with its fix (Wooster shows WARN lines even in its quiet mode). */
  private warnAbout(findings: ReadinessFinding[]): void {
    this.findings.push(...findings);
    for (const finding of findings) {
      if (finding.level === "ok") continue;
      this.log(LogLevel.WARN, `${finding.level === "fail" ? "not local" : "check"} (${finding.id}): ${finding.message}${finding.fix ? ` Fix: ${finding.fix}.` : ""}`);
    }
  }

  /** The endpoint checks, after the grace, in the background; a timer that keeps no process alive. */
  private async checkEndpointsLater(): Promise<ReadinessFinding[]> {
    const signal = this.checks.signal;
    try {
      await delay(ENDPOINT_CHECK_GRACE_MS, undefined, { ref: false, signal });
      const findings = await checkWoosterEndpoints(process.env, { signal });
      if (signal.aborted) return [];
      this.warnAbout(findings);
      if (this.findings.some((f) => f.level === "fail")) {
        this.log(LogLevel.WARN, "Wooster is not fully local (see the warnings above); `npx @localmlx/client wooster-doctor .` checks it all.");
      }
      return findings;
    } catch (error) {
      if (!signal.aborted) this.log(LogLevel.DEBUG, `the endpoint checks stopped: ${(error as Error).message}`);
      return [];
    }
  }

  /** Resolves with the endpoints' findings once checked (the settings' are in `readiness` at once). */
  get endpointChecks(): Promise<ReadinessFinding[]> {
    return this.endpointsChecked;
  }

  /** The readiness findings so far (see the plugin's doc comment). */
  get readiness(): readonly ReadinessFinding[] {
    return this.findings;
  }

  /** LOCALMLX_AUTO_START_SERVER: the OpenAI-compatible endpoint on LOCALMLX_SERVER_URL, sharing the plugin's sidecar. */
  private async startServer(settings: LocalMLXPluginSettings): Promise<void> {
    const service = this.service!;
    let url: URL;
    try {
      url = new URL(settings.serverUrl);
    } catch {
      this.log(LogLevel.ERROR, `LOCALMLX_SERVER_URL is not a URL: ${settings.serverUrl}; the OpenAI endpoint is not started`);
      return;
    }
    const listen: OpenAIListen[] = settings.serveTiers ? this.tierListeners() : [];
    if (!listen.some((l) => l.port === Number(url.port || 80) && l.port !== 0)) {
      listen.unshift({ port: Number(url.port || 80), host: url.hostname.replace(/^\[|\]$/g, "") });
    }
    const logger = {
      info: (m: string) => this.log(LogLevel.DEBUG, m),
      warn: (m: string) => this.log(LogLevel.WARN, m),
      error: (m: string) => this.log(LogLevel.ERROR, m),
    };
    try {
      const common = {
        listen,
        logger,
        ...(settings.defaultModel ? { defaultModel: settings.defaultModel } : {}),
        fallback: service.remote?.fallback ?? (false as const),
      };
      // One sidecar for the tools and the endpoint: the service's backend. When it cannot start
      // but the fallback is on, the endpoint still starts (serving remotely) and tries local again later.
      await service.mlx().catch((error: unknown) => {
        if (!service.remote) throw error;
      });
      this.server = await startOpenAIServer({ ...common, client: service.backend });
      const server = this.server;
      service.onStop(() => server.close());
      this.log(LogLevel.INFO, `OpenAI-compatible endpoint listening at ${server.url}`);
    } catch (error) {
      this.log(LogLevel.ERROR, `could not start the OpenAI-compatible endpoint on ${settings.serverUrl}: ${(error as Error).message.split("\n")[0]}`);
    }
  }

  /**
   * LOCALMLX_SERVE_TIERS: one listener per Wooster routing tier whose URL is on this machine
   * (ROUTING_ROUTER_URL :8080, ROUTING_FAST_URL :8081, ROUTING_THINKING_URL :8083, and
   * MLX_EMBEDDINGS_URL :8084), each serving its tier's model whatever name is asked for.
   */
  private tierListeners(): OpenAIListen[] {
    const routing = this.config?.routing;
    const tiers: Array<[string, string | undefined, string | undefined]> = Object.entries(routing?.tiers ?? {}).map(([name, tier]) => [name, tier?.serverUrl, tier?.model]);
    const embeddings = routing?.providers?.local?.embeddings;
    if (embeddings?.enabled) tiers.push(["embeddings", embeddings.serverUrl, embeddings.projects?.model]);
    const out: OpenAIListen[] = [];
    for (const [name, serverUrl, model] of tiers) {
      if (!serverUrl || !model) continue;
      let url: URL;
      try {
        url = new URL(serverUrl);
      } catch {
        continue;
      }
      const host = url.hostname.replace(/^\[|\]$/g, "");
      if (!["127.0.0.1", "localhost", "::1"].includes(host)) continue; // a tier served elsewhere
      const port = Number(url.port || 80);
      if (out.some((l) => l.port === port)) {
        this.log(LogLevel.WARN, `tier ${name} shares port ${port} with another tier; it is served by that one's model`);
        continue;
      }
      out.push({ port, host, aliases: { "*": model } });
      this.log(LogLevel.INFO, `serving Wooster's ${name} tier (${model}) on ${host}:${port}`);
    }
    return out;
  }

  getAgentTools(): DynamicTool[] {
    if (!this.service || !this.settings?.toolsEnabled) return [];
    return createTools(this.service, this.log);
  }

  getServices(): { [serviceName: string]: unknown } {
    return this.service ? { [LocalMLXService.serviceName]: this.service } : {};
  }

  /** The OpenAI endpoint, when LOCALMLX_AUTO_START_SERVER started it. */
  get openAIServer(): OpenAIServer | undefined {
    return this.server;
  }

  /** Wooster does not call this; exit hooks stop the sidecar. Hosts that unload plugins may. */
  async shutdown(): Promise<void> {
    this.checks.abort();
    await this.service?.dispose();
  }
}

export default LocalMLXPlugin;

/**
 * The part of Wooster's plugin interface this plugin uses, reproduced from Wooster's
 * `src/types/plugin.ts`, `src/logger.ts` and `src/configLoader.ts` (JussaMouse/wooster), so the
 * plugin compiles on its own and inside a Wooster checkout alike. Wooster loads plugins untyped
 * (`PluginClass as any`), but a Wooster developer may check them against its `WoosterPlugin`: so
 * each type here is a structural subset of Wooster's (every member optional or as Wooster has
 * it, no index signatures, which Wooster's interfaces lack), and Wooster's `AppConfig` and
 * `CoreServices` are assignable to them. test/wooster.test.ts checks the plugin against Wooster's
 * own declarations with Wooster's tsconfig.
 */

/** Wooster's `LogLevel` enum: string values, so plain strings are accepted by its `log`. */
export enum LogLevel {
  DEBUG = "DEBUG",
  INFO = "INFO",
  RESPONSE = "RESPONSE",
  WARN = "WARN",
  ERROR = "ERROR",
}

/** A routing tier as Wooster's configLoader builds it (`TierConfig`). */
export interface TierConfig {
  model: string;
  serverUrl: string;
  maxTokens?: number;
}

/** The fields of Wooster's `AppConfig` this plugin reads. */
export interface AppConfig {
  openai?: {
    apiKey?: string;
    modelName?: string;
    temperature?: number;
    maxTokens?: number;
    enabled?: boolean;
  };
  /** Wooster's model routing: the tiers' models and URLs (ROUTING_ROUTER_URL, ROUTING_FAST_URL…). */
  routing?: {
    tiers?: { router?: TierConfig; fast?: TierConfig; thinking?: TierConfig };
    providers?: {
      local?: { embeddings?: { enabled?: boolean; serverUrl?: string; projects?: { model?: string } } };
    };
  };
  /** Per-plugin settings: `plugins.localMLX` may be `true`/`false` or an object of settings. */
  plugins?: { [key: string]: unknown };
}

/** Wooster's `CoreServices` (the members this plugin uses, plus the ones every host passes). */
export interface CoreServices {
  getConfig(): AppConfig;
  log: (level: LogLevel, message: string, metadata?: object) => void;
  registerService: (serviceName: string, serviceInstance: unknown) => void;
  getService: (serviceName: string) => unknown;
  setActiveProject?: (projectName: string) => Promise<void>;
  getActiveProjectPath?: () => string | null;
  getActiveProjectName?: () => string | null;
}

/** Wooster's `WoosterPlugin` contract. */
export interface WoosterPlugin {
  readonly name: string;
  readonly version: string;
  readonly description: string;
  initialize: (config: AppConfig, services: CoreServices) => Promise<void>;
  getAgentTools?: () => unknown[];
  shutdown?: () => Promise<void>;
  getServices?(): { [serviceName: string]: unknown };
}

/**
 * The bin's service commands: `serve`, `install-service`, `uninstall-service`. Each resolves to
 * an exit status: 0 done, 1 failed, 2 a usage or config error.
 */
import { parseArgs } from "node:util";
import { defaultConfigPath, loadServiceConfig, ServiceConfigError, type ServiceLogFormat } from "./config";
import { installService, uninstallService } from "./install";
import { startEndpointService, type EndpointService } from "./service";

export const SERVE_USAGE = `Usage: localmlx-client serve [--config <file>] [--print-config] [--log-format json|text]

Serves the OpenAI-compatible endpoint on every tier's port (default: Wooster's router :8080,
fast :8081, thinking :8083, embeddings :8084), all from one sidecar, until stopped.

Options:
  --config <file>        the config (default: $LOCALMLX_SERVE_CONFIG, else ${defaultConfigPath()}
                         when it exists, else the built-in defaults)
  --print-config         print the config it would use (JSON) and exit
  --log-format <format>  json (one object per line) or text (default: json, text on a terminal)
  -h, --help             this text

Signals: SIGHUP reloads the config (requests in flight go on); SIGTERM or SIGINT stop it after
the requests in flight finish (at most drainTimeoutMs; a second signal stops it at once).
GET /health on any port says what it serves.`;

export const INSTALL_USAGE = `Usage: localmlx-client install-service [--config <file>] [--platform darwin|linux] [--dry-run] [--no-load]
       localmlx-client uninstall-service [--platform darwin|linux] [--dry-run] [--no-load]

install-service writes a launchd agent (macOS: ~/Library/LaunchAgents/localmlx.serve.plist) or a
systemd user unit (Linux: ~/.config/systemd/user/localmlx.service) that runs \`serve\` at login,
writes the config file with the defaults when there is none, and loads the unit.

Options:
  --config <file>      the config the service reads (default: ${defaultConfigPath()})
  --platform <name>    write the unit for darwin or linux (default: this machine's)
  --dry-run            print what it would write and run; change nothing
  --no-load            write the files, do not load them
  -h, --help           this text`;

export interface ServiceCommandContext {
  /** The bin's own path (absolute), which the unit runs. */
  bin: string;
  out?: (line: string) => void;
  err?: (line: string) => void;
}

export async function runServiceCommand(command: string, argv: string[], context: ServiceCommandContext): Promise<number> {
  const out = context.out ?? ((line: string) => console.log(line));
  const err = context.err ?? ((line: string) => console.error(line));
  const usage = command === "serve" ? SERVE_USAGE : INSTALL_USAGE;
  try {
    if (command === "serve") return await serve(argv, out, err);
    if (command === "install-service" || command === "uninstall-service") return install(command, argv, context.bin, out);
    throw new UsageError(`unknown command ${command}`);
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      err(`localmlx-client: ${(error as Error).message}\n\n${usage}`);
      return 2;
    }
    if (error instanceof ServiceConfigError) {
      err(`localmlx-client: ${error.message}`);
      return 2;
    }
    err(`localmlx-client ${command}: ${(error as Error).message}`);
    return 1;
  }
}

class UsageError extends Error {}

async function serve(argv: string[], out: (line: string) => void, err: (line: string) => void): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: "string" },
      "print-config": { type: "boolean" },
      "log-format": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    out(SERVE_USAGE);
    return 0;
  }
  const format = values["log-format"];
  if (format !== undefined && format !== "json" && format !== "text") throw new UsageError(`--log-format is json or text, not ${format}`);
  if (values["print-config"]) {
    const loaded = loadServiceConfig(values.config ? { path: values.config } : {});
    err(`# ${loaded.path ? `from ${loaded.path}` : `the built-in defaults (no file at ${defaultConfigPath()})`}`);
    out(JSON.stringify(loaded.config, null, 2));
    return 0;
  }
  const service = await startEndpointService({
    ...(values.config ? { configPath: values.config } : {}),
    ...(format ? { logFormat: format as ServiceLogFormat } : {}),
  });
  return untilStopped(service);
}

/** Serves until SIGTERM or SIGINT (a second one stops at once); SIGHUP reloads. Resolves to the exit status. */
function untilStopped(service: EndpointService): Promise<number> {
  return new Promise((resolve) => {
    let signals = 0;
    const reload = (): void => {
      service.log.info("signal", { signal: "SIGHUP" });
      void service.reload();
    };
    const stop = (signal: NodeJS.Signals): void => {
      signals++;
      service.log.info("signal", { signal });
      // A second signal: stop now, ending what is in flight.
      void service.stop(signals > 1 ? 0 : undefined).then(() => {
        process.off("SIGHUP", reload);
        process.off("SIGTERM", stop);
        process.off("SIGINT", stop);
        resolve(0);
      });
    };
    process.on("SIGHUP", reload);
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
  });
}

function install(command: string, argv: string[], bin: string, out: (line: string) => void): number {
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: "string" },
      platform: { type: "string" },
      "dry-run": { type: "boolean" },
      "no-load": { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    out(INSTALL_USAGE);
    return 0;
  }
  if (values.config !== undefined && command === "uninstall-service") throw new UsageError("uninstall-service takes no --config (the config file stays)");
  const common = {
    ...(values.platform ? { platform: values.platform } : {}),
    ...(values["dry-run"] ? { dryRun: true } : {}),
    ...(values["no-load"] ? { load: false } : {}),
    out,
  };
  if (command === "install-service") installService({ ...common, bin, ...(values.config ? { configPath: values.config } : {}) });
  else uninstallService(common);
  return 0;
}

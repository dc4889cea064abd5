/** The endpoint as a service: `localmlx-client serve`, its config, its log, and its launchd/systemd units (see README: "The service"). */
export {
  DEFAULT_EMBEDDING_DIMENSIONS,
  DEFAULT_EMBEDDING_MODEL,
  ServiceConfigError,
  defaultConfigPath,
  defaultServiceConfig,
  loadServiceConfig,
  parseServiceConfig,
  type LoadedServiceConfig,
  type ServiceConfig,
  type ServiceLogFormat,
  type ServiceLogLevel,
  type TierConfig,
} from "./config";
export { ServiceLog, type LogFields } from "./log";
export { EndpointService, listenersOf, startEndpointService, type EndpointServiceOptions, type TierStatus } from "./service";
export {
  LAUNCHD_LABEL,
  SYSTEMD_UNIT,
  installService,
  launchdPlist,
  serviceEnvironment,
  systemdUnit,
  uninstallService,
  type CommandRunner,
  type InstallServiceOptions,
  type ServicePlan,
  type ServicePlatform,
} from "./install";
export { INSTALL_USAGE, SERVE_USAGE, runServiceCommand, type ServiceCommandContext } from "./cli";

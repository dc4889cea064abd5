export {
  LocalMLX,
  type CallOptions,
  type ChatOptions,
  type DeleteOptions,
  type EmbedOptions,
  type FinetuneOptions,
  type FinetuneParams,
  type FinetuneProgress,
  type FuseParams,
  type GenerateOptions,
  type LoadOptions,
  type LoadProgress,
  type LocalMLXEvents,
  type LocalMLXOptions,
  type Logger,
  type Progress,
  type ProgressOptions,
  type RestartInfo,
} from "./client";
export {
  Prediction,
  type PredictionChunk,
  type PredictionEvents,
  type PredictionFragment,
  type PredictionResult,
} from "./prediction";
export type { CloseResult, StopTimeouts } from "./session";
export type { RestartPolicy } from "./supervisor";
export type { WireWarning } from "./connection";
export {
  AbortError,
  ClientClosedError,
  ErrorCode,
  LocalMLXError,
  ProtocolVersionError,
  RpcError,
  SidecarCrashError,
  SidecarStartError,
  SidecarUnavailableError,
  TimeoutError,
  type ErrorCodeName,
  type ExitInfo,
  type RpcErrorObject,
  type SidecarAttempt,
} from "./errors";
export {
  findSidecar,
  privateVenvDir,
  resolvePython,
  type FindSidecarOptions,
  type SidecarCandidate,
  type SidecarLogRecord,
  type SidecarSource,
} from "./process";
export * from "./protocol";
export { imagePart, textPart } from "./images";
export {
  SETTINGS,
  SettingsError,
  distributedEnv,
  draftModelsEnv,
  parseBool,
  parseInteger,
  parseNumber,
  readSetting,
  type DistributedOptions,
  type DraftModels,
  type SettingsEnv,
  type Setting,
  type SettingName,
  type SettingValue,
} from "./settings";
export * from "./openai";
export * from "./service";
export {
  PLUGIN_DIR,
  WOOSTER_DEFAULTS,
  checkWooster,
  checkWoosterEndpoints,
  checkWoosterEnv,
  checkWoosterInstall,
  readWoosterEnv,
  resolveClientFrom,
  shippedPluginFiles,
  woosterRouting,
  type CheckWoosterOptions,
  type FindingLevel,
  type ReadinessFinding,
  type WoosterEndpointOptions,
  type WoosterEnv,
  type WoosterInstallOptions,
  type WoosterReadiness,
  type WoosterRouting,
  type WoosterTier,
  type WoosterTierName,
} from "./wooster-readiness";

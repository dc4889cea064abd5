/** The OpenAI-compatible endpoint and the remote fallback (see README: "OpenAI-compatible endpoint"). */
export {
  OpenAIServer,
  startOpenAIServer,
  type OpenAIAddress,
  type OpenAIListen,
  type OpenAIRequestInfo,
  type OpenAIServerEvents,
  type OpenAIServerOptions,
} from "./server";
export {
  Fallback,
  RemoteForbiddenError,
  RemoteUnreachableError,
  chatWithFallback,
  embedWithFallback,
  fallbackOf,
  fallbackOptionsFromEnv,
  localFailureReason,
  remoteForbidden,
  remoteOptionsFromEnv,
  runWithFallback,
  type ChatWithFallbackResult,
  type EmbedWithFallbackResult,
  type FallbackOptions,
  type FallbackSetting,
  type ServedBy,
  type WithFallbackOptions,
} from "./fallback";
export { LocalBackend, resolveModel, type LocalBackendOptions, type LocalSource, type ModelRouting } from "./local";
export { DEFAULT_LIMITS, type RequestLimits } from "./limits";
export { OpenAIHttpError, isFallbackWorthy, isSidecarDown, toOpenAIError, type OpenAIErrorBody } from "./errors";
export {
  chatCompletionOf,
  chatParamsOf,
  completionParamsOf,
  embedParamsOf,
  embeddingsOf,
  type ChatCompletion,
  type ChatCompletionChunk,
  type ChatCompletionMessage,
  type Completion,
  type EmbeddingsResponse,
  type OpenAIToolCall,
  type OpenAIUsage,
} from "./translate";

/**
 * OpenAI's error shape, `{error: {message, type, param, code}}`, and the HTTP status each failure
 * of the sidecar maps to.
 */
import {
  ClientClosedError,
  ErrorCode,
  RpcError,
  SidecarCrashError,
  SidecarStartError,
  SidecarUnavailableError,
  TimeoutError,
  isRecord,
  isSidecarDown,
} from "../errors";

export { isSidecarDown };

/** The body of an OpenAI error response. */
export interface OpenAIErrorBody {
  error: {
    message: string;
    type: string;
    param: string | null;
    code: string | null;
  };
}

/** An error that already knows its HTTP status and OpenAI body (bad requests, auth, limits…). */
export class OpenAIHttpError extends Error {
  override name = "OpenAIHttpError";
  readonly headers: Record<string, string>;

  constructor(
    readonly status: number,
    message: string,
    readonly type: string = status >= 500 ? "server_error" : "invalid_request_error",
    readonly param: string | null = null,
    readonly code: string | null = null,
    headers: Record<string, string> = {},
  ) {
    super(message);
    this.headers = headers;
  }

  get body(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** A 400 for one bad request field. */
export function badRequest(message: string, param: string | null = null, code: string | null = "invalid_value"): OpenAIHttpError {
  return new OpenAIHttpError(400, message, "invalid_request_error", param, code);
}

/** Protocol param names (camelCase) back to the OpenAI request's (snake_case) for error `param`s. */
const PARAM_NAMES: Record<string, string> = {
  maxTokens: "max_tokens",
  topP: "top_p",
  topK: "top_k",
  minP: "min_p",
  presencePenalty: "presence_penalty",
  frequencyPenalty: "frequency_penalty",
  repetitionPenalty: "repetition_penalty",
  logitBias: "logit_bias",
  draftModel: "draft_model",
  numDraftTokens: "num_draft_tokens",
  promptLookup: "prompt_lookup",
  responseFormat: "response_format",
  toolChoice: "tool_choice",
  toolCalls: "tool_calls",
  toolCallId: "tool_call_id",
  input: "input",
  prompt: "prompt",
};

/** `/messages/0/toolCalls` → `messages[0].tool_calls`. */
function paramFromPointer(pointer: string): string | null {
  const parts = pointer.split("/").filter((part) => part !== "").map((part) => part.replace(/~1/g, "/").replace(/~0/g, "~"));
  if (parts.length === 0) return null;
  let out = "";
  for (const part of parts) {
    if (/^\d+$/.test(part)) out += `[${part}]`;
    else out += `${out ? "." : ""}${PARAM_NAMES[part] ?? part}`;
  }
  return out;
}

/**
 * The param, message and code of a -32602: the param from the first error's JSON pointer. An
 * image the sidecar refused (data `{path, reason}`), or images sent to a model without vision
 * (data `{model, capabilities, reason: "no-vision"}`, whose message says which model), carries its
 * reason as the code, in OpenAI's snake_case (`not-an-image` → `not_an_image`).
 */
function invalidParamsOf(error: RpcError): { param: string | null; message: string; code: string } {
  const reason = error.data.reason;
  const code = typeof reason === "string" ? reason.replace(/-/g, "_") : "invalid_value";
  const errors = error.data.errors;
  if (Array.isArray(errors) && errors.length > 0 && isRecord(errors[0])) {
    const first = errors[0];
    const path = typeof first.path === "string" ? first.path : "";
    const param = paramFromPointer(path);
    if (reason === "no-vision") return { param, message: error.rawMessage, code };
    const text = typeof first.message === "string" ? first.message : error.rawMessage;
    return { param, message: param ? `${param}: ${text}` : text, code };
  }
  return { param: null, message: error.rawMessage, code };
}

/** Any failure of a request, as the OpenAI error a client should get. */
export function toOpenAIError(error: unknown): OpenAIHttpError {
  if (error instanceof OpenAIHttpError) return error;
  if (error instanceof RpcError) {
    const message = error.rawMessage;
    switch (error.code) {
      case ErrorCode.ModelNotFound:
        return new OpenAIHttpError(404, message, "invalid_request_error", "model", "model_not_found");
      case ErrorCode.ModelNotLoaded:
        return new OpenAIHttpError(404, message, "invalid_request_error", "model", "model_not_loaded");
      case ErrorCode.InvalidParams: {
        const { param, message: text, code } = invalidParamsOf(error);
        return new OpenAIHttpError(400, text, "invalid_request_error", param, code);
      }
      case ErrorCode.ContextLengthExceeded:
        return new OpenAIHttpError(400, message, "invalid_request_error", "messages", "context_length_exceeded");
      case ErrorCode.Forbidden:
        return new OpenAIHttpError(403, message, "permission_error", "model", "forbidden");
      case ErrorCode.MessageTooLarge:
        return new OpenAIHttpError(413, message, "invalid_request_error", null, "request_too_large");
      case ErrorCode.Busy:
        return new OpenAIHttpError(429, message, "rate_limit_error", null, "busy", { "retry-after": "1" });
      case ErrorCode.ModelLoading:
        return new OpenAIHttpError(503, message, "server_error", "model", "model_loading", { "retry-after": "2" });
      case ErrorCode.OutOfMemory:
        return new OpenAIHttpError(507, message, "server_error", "model", "out_of_memory");
      case ErrorCode.MethodNotFound:
        return new OpenAIHttpError(501, message, "server_error", null, "not_implemented");
      case ErrorCode.ModelLoadFailed:
        return new OpenAIHttpError(500, message, "server_error", "model", "model_load_failed");
      case ErrorCode.RankLost:
        // The sidecar exits after it; the next request restarts it (and its group).
        return new OpenAIHttpError(503, message, "server_error", null, "rank_lost", { "retry-after": "5" });
      case ErrorCode.ServerCancelled:
      case ErrorCode.RequestCancelled:
        return new OpenAIHttpError(503, message, "server_error", null, "cancelled", { "retry-after": "1" });
      default:
        return new OpenAIHttpError(500, message, "server_error", null, "internal_error");
    }
  }
  if (error instanceof TimeoutError) return new OpenAIHttpError(504, error.message, "server_error", null, "timeout");
  if (
    error instanceof SidecarStartError ||
    error instanceof SidecarUnavailableError ||
    error instanceof SidecarCrashError ||
    error instanceof ClientClosedError
  ) {
    // The first line only: stderr tails stay in the server's log.
    return new OpenAIHttpError(503, error.message.split("\n")[0]!, "server_error", null, "sidecar_unavailable", { "retry-after": "5" });
  }
  return new OpenAIHttpError(500, "Internal error", "server_error", null, "internal_error");
}

/**
 * The local side cannot serve this request, but a remote server might: the sidecar is down, the
 * model is missing (and not downloadable) or failed to load, memory is short, it stayed busy past
 * the deadline, or it timed out. Bad requests (400s) are not: the remote would refuse them too.
 */
export function isFallbackWorthy(error: unknown): boolean {
  if (isSidecarDown(error) || error instanceof TimeoutError) return true;
  if (error instanceof RpcError) {
    return (
      [
        ErrorCode.ModelNotFound,
        ErrorCode.ModelNotLoaded,
        ErrorCode.ModelLoading,
        ErrorCode.ModelLoadFailed,
        ErrorCode.OutOfMemory,
        ErrorCode.Busy,
        ErrorCode.Forbidden,
        ErrorCode.ServerCancelled,
        ErrorCode.MethodNotFound,
      ] as number[]
    ).includes(error.code);
  }
  return false;
}

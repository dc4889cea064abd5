/**
 * OpenAI's Chat Completions, Completions and Embeddings shapes ⇄ the sidecar's protocol. Pure
 * functions: requests are checked and turned into `ChatParams` / `GenerateParams` / `EmbedParams`
 * (a bad field is a 400 naming it), results and streamed pieces into OpenAI's objects.
 */
import { randomUUID } from "node:crypto";
import { isRecord } from "../errors";
import type {
  ChatParams,
  ContentPart,
  EmbedParams,
  EmbedResult,
  FinishReason,
  GenerateParams,
  GenerationResult,
  Message,
  ResponseFormat,
  StreamedToolCall,
  Tool,
  ToolCall,
  ToolChoice,
  Usage,
} from "../protocol";
import { badRequest } from "./errors";
import { DEFAULT_LIMITS, checkCount, checkSchemaSize, nestingPastLimit, tooDeep, type RequestLimits } from "./limits";

// ---- OpenAI shapes (the parts this endpoint reads and writes) -----------------------------

export type JsonObject = Record<string, unknown>;

/** An OpenAI tool call as it appears in a message or (with `index`) in a stream delta. */
export interface OpenAIToolCall {
  index?: number;
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

export interface OpenAIUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details?: { cached_tokens: number };
  completion_tokens_details?: { reasoning_tokens: number };
}

export type OpenAIFinishReason = "stop" | "length" | "tool_calls" | "content_filter";

export interface ChatCompletionMessage {
  role: "assistant";
  content: string | null;
  refusal: null;
  reasoning_content?: string;
  tool_calls?: OpenAIToolCall[];
  /** Tool calls the model got wrong (unknown tool, arguments not matching): never passed on as valid. */
  invalid_tool_calls?: Array<OpenAIToolCall & { error: string }>;
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  created: number;
  model: string;
  system_fingerprint: string;
  choices: Array<{ index: number; message: ChatCompletionMessage; logprobs: null; finish_reason: OpenAIFinishReason }>;
  usage: OpenAIUsage;
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  system_fingerprint: string;
  choices: Array<{
    index: number;
    delta: { role?: "assistant"; content?: string; reasoning_content?: string; tool_calls?: OpenAIToolCall[] };
    logprobs: null;
    finish_reason: OpenAIFinishReason | null;
  }>;
  usage?: OpenAIUsage | null;
}

export interface Completion {
  id: string;
  object: "text_completion";
  created: number;
  model: string;
  system_fingerprint: string;
  choices: Array<{ index: number; text: string; logprobs: null; finish_reason: OpenAIFinishReason | null }>;
  usage?: OpenAIUsage | null;
}

export interface EmbeddingsResponse {
  object: "list";
  data: Array<{ object: "embedding"; index: number; embedding: number[] | string }>;
  model: string;
  usage: { prompt_tokens: number; total_tokens: number };
}

/** What the sidecar streams in one chunk (answer text, reasoning, finished tool calls). */
export interface StreamPiece {
  text?: string;
  reasoning?: string;
  toolCalls?: StreamedToolCall[];
}

export const SYSTEM_FINGERPRINT = "localmlx";

// ---- checks ---------------------------------------------------------------------------------

function optionalNumber(body: JsonObject, key: string, range?: [number, number], integer = false): number | undefined {
  const value = body[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value)) throw badRequest(`${key} must be a number`, key);
  if (integer && !Number.isInteger(value)) throw badRequest(`${key} must be an integer`, key);
  if (range && (value < range[0] || value > range[1])) throw badRequest(`${key} must be between ${range[0]} and ${range[1]}`, key);
  return value;
}

function optionalString(body: JsonObject, key: string): string | undefined {
  const value = body[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "string") throw badRequest(`${key} must be a string`, key);
  return value;
}

function optionalBoolean(body: JsonObject, key: string): boolean | undefined {
  const value = body[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "boolean") throw badRequest(`${key} must be a boolean`, key);
  return value;
}

/** The request body must be a JSON object. */
export function requireObject(body: unknown): JsonObject {
  if (!isRecord(body)) throw badRequest("The request body must be a JSON object");
  return body;
}

/** `model` as the client named it (absent or empty: none). */
export function requestedModel(body: JsonObject): string | undefined {
  const model = optionalString(body, "model");
  return model === "" ? undefined : model;
}

/** `stream: true`. */
export function isStreaming(body: JsonObject): boolean {
  return optionalBoolean(body, "stream") === true;
}

/** `stream_options.include_usage: true`. */
export function includeUsage(body: JsonObject): boolean {
  const options = body.stream_options;
  if (options === undefined || options === null) return false;
  if (!isRecord(options)) throw badRequest("stream_options must be an object", "stream_options");
  return options.include_usage === true;
}

/** Text content: a string, or an array of parts of which only text parts are supported. */
function textContent(content: unknown, param: string, allowNull: boolean): string | null | undefined {
  if (content === undefined || content === null) {
    if (allowNull) return content === null ? null : undefined;
    throw badRequest(`${param} is required`, param);
  }
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    let text = "";
    content.forEach((part, i) => {
      if (!isRecord(part)) throw badRequest(`${param}[${i}] must be an object`, `${param}[${i}]`);
      if (part.type === "text" && typeof part.text === "string") text += part.text;
      else if (part.type === "refusal" && typeof part.refusal === "string") text += part.refusal;
      else throw badRequest(`${param}[${i}]: only text content parts are supported (got ${String(part.type)})`, `${param}[${i}].type`);
    });
    return text;
  }
  throw badRequest(`${param} must be a string or an array of content parts`, param);
}

/** An OpenAI `image_url` part's URL (`{url, detail?}`, or the URL alone as some clients send it); `detail` is ignored. */
function imageUrlOf(part: JsonObject, param: string): string {
  const value = part.image_url;
  const url = isRecord(value) ? value.url : value;
  if (typeof url !== "string" || url === "") throw badRequest(`${param}.image_url.url must be a non-empty string`, `${param}.image_url.url`);
  return url;
}

/**
 * A user turn's content: text as `textContent` reads it, or, when it holds `image_url` parts,
 * content parts (text, and images as the sidecar takes them: data: URLs, and http(s) URLs passed
 * on as given, which the sidecar fetches only when LOCALMLX_ALLOW_IMAGE_URLS is set).
 */
function userContent(content: unknown, param: string): string | ContentPart[] {
  if (!Array.isArray(content) || !content.some((part) => isRecord(part) && part.type === "image_url")) {
    return textContent(content, param, false)!;
  }
  return content.map((part, i): ContentPart => {
    const where = `${param}[${i}]`;
    if (!isRecord(part)) throw badRequest(`${where} must be an object`, where);
    if (part.type === "text" && typeof part.text === "string") return { type: "text", text: part.text };
    if (part.type === "refusal" && typeof part.refusal === "string") return { type: "text", text: part.refusal };
    if (part.type === "image_url") return { type: "image", image: imageUrlOf(part, where) };
    throw badRequest(`${where}: only text and image_url content parts are supported (got ${String(part.type)})`, `${where}.type`);
  });
}

function toolCallsOf(value: unknown, param: string, limits: RequestLimits): ToolCall[] {
  if (!Array.isArray(value)) throw badRequest(`${param} must be an array`, param);
  checkCount(value, limits.maxTools, param);
  return value.map((call, i) => {
    const where = `${param}[${i}]`;
    if (!isRecord(call) || !isRecord(call.function)) throw badRequest(`${where} must be a function tool call`, where);
    const { name, arguments: args } = call.function;
    if (typeof name !== "string") throw badRequest(`${where}.function.name must be a string`, `${where}.function.name`);
    // Arguments are JSON text the sidecar parses: they nest within the same limit as a body.
    if (typeof args === "string" && nestingPastLimit(args, limits.maxDepth)) throw tooDeep(`${where}.function.arguments`, limits.maxDepth);
    const argumentsText = typeof args === "string" ? args : args === undefined || args === null ? "{}" : JSON.stringify(args);
    return { id: typeof call.id === "string" ? call.id : `call_${i}`, type: "function" as const, function: { name, arguments: argumentsText } };
  });
}

function messageOf(value: unknown, i: number, limits: RequestLimits): Message {
  const where = `messages[${i}]`;
  if (!isRecord(value)) throw badRequest(`${where} must be an object`, where);
  const role = value.role;
  switch (role) {
    case "system":
    case "developer":
      return { role: "system", content: textContent(value.content, `${where}.content`, false)! };
    case "user":
      return { role: "user", content: userContent(value.content, `${where}.content`) };
    case "assistant": {
      const content = textContent(value.content, `${where}.content`, true);
      const message: Message = { role: "assistant", content: content ?? null };
      if (value.tool_calls !== undefined && value.tool_calls !== null) {
        const calls = toolCallsOf(value.tool_calls, `${where}.tool_calls`, limits);
        if (calls.length > 0) message.toolCalls = calls;
      }
      if (message.toolCalls === undefined && (content === null || content === undefined)) message.content = "";
      const reasoning = value.reasoning_content ?? value.reasoning;
      if (typeof reasoning === "string" && reasoning !== "") message.reasoning = reasoning;
      return message;
    }
    case "tool": {
      const message: Message = { role: "tool", content: textContent(value.content, `${where}.content`, false)! };
      if (typeof value.tool_call_id === "string") message.toolCallId = value.tool_call_id;
      if (typeof value.name === "string") message.name = value.name;
      return message;
    }
    case "function":
      throw badRequest(`${where}: the deprecated "function" role is not supported; use "tool"`, `${where}.role`);
    default:
      throw badRequest(`${where}.role must be system, developer, user, assistant or tool`, `${where}.role`);
  }
}

function toolsOf(value: unknown, limits: RequestLimits): Tool[] {
  if (!Array.isArray(value)) throw badRequest("tools must be an array", "tools");
  checkCount(value, limits.maxTools, "tools");
  return value.map((tool, i) => {
    const where = `tools[${i}]`;
    if (!isRecord(tool) || tool.type !== "function" || !isRecord(tool.function)) {
      throw badRequest(`${where} must be {type: "function", function: {name, …}}`, where);
    }
    const fn = tool.function;
    if (typeof fn.name !== "string" || fn.name === "") throw badRequest(`${where}.function.name must be a string`, `${where}.function.name`);
    const out: Tool = { type: "function", function: { name: fn.name } };
    if (typeof fn.description === "string") out.function.description = fn.description;
    if (fn.parameters !== undefined && fn.parameters !== null) {
      if (!isRecord(fn.parameters) && typeof fn.parameters !== "boolean") {
        throw badRequest(`${where}.function.parameters must be a JSON Schema object`, `${where}.function.parameters`);
      }
      checkSchemaSize(fn.parameters, limits.maxSchemaBytes, `${where}.function.parameters`);
      out.function.parameters = fn.parameters;
    }
    if (typeof fn.strict === "boolean") out.function.strict = fn.strict;
    return out;
  });
}

function toolChoiceOf(value: unknown): ToolChoice {
  if (value === "none" || value === "auto" || value === "required") return value;
  if (isRecord(value) && value.type === "function" && isRecord(value.function) && typeof value.function.name === "string") {
    return { type: "function", function: { name: value.function.name } };
  }
  throw badRequest('tool_choice must be "none", "auto", "required" or {type: "function", function: {name}}', "tool_choice");
}

function responseFormatOf(value: unknown, limits: RequestLimits): ResponseFormat | undefined {
  if (!isRecord(value)) throw badRequest("response_format must be an object", "response_format");
  switch (value.type) {
    case "text":
      return undefined;
    case "json_object":
      return { type: "json_object" };
    case "json_schema": {
      const spec = value.json_schema;
      if (!isRecord(spec)) throw badRequest("response_format.json_schema must be an object", "response_format.json_schema");
      const schema = spec.schema ?? {};
      if (!isRecord(schema) && typeof schema !== "boolean") {
        throw badRequest("response_format.json_schema.schema must be a JSON Schema", "response_format.json_schema.schema");
      }
      checkSchemaSize(schema, limits.maxSchemaBytes, "response_format.json_schema.schema");
      const format: ResponseFormat = { type: "json_schema", schema };
      if (typeof spec.name === "string") format.name = spec.name;
      if (typeof spec.strict === "boolean") format.strict = spec.strict;
      return format;
    }
    default:
      throw badRequest('response_format.type must be "text", "json_object" or "json_schema"', "response_format.type");
  }
}

function stopOf(value: unknown, maxStrings: number): string[] | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === "string") return value === "" ? undefined : [value];
  if (Array.isArray(value) && value.every((s) => typeof s === "string")) {
    const stops = (value as string[]).filter((s) => s !== "");
    if (stops.length > maxStrings) throw badRequest(`stop may hold at most ${maxStrings} strings`, "stop", "too_many_items");
    return stops.length > 0 ? stops : undefined;
  }
  throw badRequest("stop must be a string or an array of strings", "stop");
}

function logitBiasOf(value: unknown): Record<string, number> | undefined {
  if (value === undefined || value === null) return undefined;
  if (!isRecord(value)) throw badRequest("logit_bias must be an object of token id to bias", "logit_bias");
  const out: Record<string, number> = {};
  for (const [key, bias] of Object.entries(value)) {
    if (!/^\d{1,10}$/.test(key)) throw badRequest(`logit_bias: "${key.slice(0, 20)}" is not a token id`, "logit_bias");
    if (typeof bias !== "number" || bias < -100 || bias > 100) throw badRequest("logit_bias values must be numbers from -100 to 100", "logit_bias");
    out[key] = bias;
  }
  return Object.keys(out).length > 0 ? out : undefined;
}

/** The sampling fields chat and completions share, OpenAI names → protocol names. */
function samplingOf(body: JsonObject, limits: RequestLimits): Omit<GenerateParams, "prompt"> {
  const params: Omit<GenerateParams, "prompt"> = {};
  const n = optionalNumber(body, "n", undefined, true);
  if (n !== undefined && n !== 1) throw badRequest("Only n = 1 is supported", "n");
  const maxTokens = optionalNumber(body, "max_completion_tokens", [1, Number.MAX_SAFE_INTEGER], true)
    ?? optionalNumber(body, "max_tokens", [1, Number.MAX_SAFE_INTEGER], true);
  if (maxTokens !== undefined) params.maxTokens = maxTokens;
  const temperature = optionalNumber(body, "temperature", [0, 2]);
  if (temperature !== undefined) params.temperature = temperature;
  const topP = optionalNumber(body, "top_p", [0, 1]);
  if (topP !== undefined) params.topP = topP;
  const presence = optionalNumber(body, "presence_penalty", [-2, 2]);
  if (presence !== undefined && presence !== 0) params.presencePenalty = presence;
  const frequency = optionalNumber(body, "frequency_penalty", [-2, 2]);
  if (frequency !== undefined && frequency !== 0) params.frequencyPenalty = frequency;
  const seed = optionalNumber(body, "seed", [0, Number.MAX_SAFE_INTEGER], true);
  if (seed !== undefined) params.seed = seed;
  const logitBias = logitBiasOf(body.logit_bias);
  if (logitBias) params.logitBias = logitBias;
  const stop = stopOf(body.stop, limits.maxStopStrings);
  if (stop) params.stop = stop;
  // Extensions that mlx_lm.server and vLLM accept too.
  const topK = optionalNumber(body, "top_k", [0, Number.MAX_SAFE_INTEGER], true);
  if (topK !== undefined) params.topK = topK;
  const minP = optionalNumber(body, "min_p", [0, 1]);
  if (minP !== undefined) params.minP = minP;
  const repetition = optionalNumber(body, "repetition_penalty");
  if (repetition !== undefined) params.repetitionPenalty = repetition;
  if (body.logprobs === true || (typeof body.logprobs === "number" && body.logprobs > 0)) {
    throw badRequest("logprobs are not supported by this server", "logprobs");
  }
  return params;
}

/**
 * Speculative decoding, as mlx_lm.server's body names it (`draft_model`, `num_draft_tokens`) plus
 * `prompt_lookup`: `draft_model: null` asks for no draft model even where the target has one.
 */
function speculationOf(body: JsonObject): Pick<GenerateParams, "draftModel" | "numDraftTokens" | "promptLookup"> {
  const params: Pick<GenerateParams, "draftModel" | "numDraftTokens" | "promptLookup"> = {};
  if (body.draft_model === null) params.draftModel = null;
  else if (body.draft_model !== undefined) {
    const draftModel = optionalString(body, "draft_model");
    if (draftModel === "") throw badRequest("draft_model must name a model (or be null: none)", "draft_model");
    params.draftModel = draftModel;
  }
  const numDraftTokens = optionalNumber(body, "num_draft_tokens", [1, 32], true);
  if (numDraftTokens !== undefined) params.numDraftTokens = numDraftTokens;
  const promptLookup = optionalBoolean(body, "prompt_lookup");
  if (promptLookup !== undefined) params.promptLookup = promptLookup;
  return params;
}

/**
 * A `/v1/chat/completions` body → `chat` params (without `model`, which the router resolves).
 * The body's nesting is checked before it was parsed; counts and schema sizes here.
 */
export function chatParamsOf(body: JsonObject, limits: RequestLimits = DEFAULT_LIMITS): Omit<ChatParams, "model"> {
  if (!Array.isArray(body.messages) || body.messages.length === 0) throw badRequest("messages must be a non-empty array", "messages");
  checkCount(body.messages, limits.maxMessages, "messages");
  const params: Omit<ChatParams, "model"> = {
    messages: body.messages.map((message, i) => messageOf(message, i, limits)),
    ...samplingOf(body, limits),
    ...speculationOf(body),
  };
  if (body.tools !== undefined && body.tools !== null) {
    const tools = toolsOf(body.tools, limits);
    if (tools.length > 0) params.tools = tools;
  }
  if (body.tool_choice !== undefined && body.tool_choice !== null) {
    const choice = toolChoiceOf(body.tool_choice);
    if (params.tools) params.toolChoice = choice;
    else if (choice !== "none" && choice !== "auto") throw badRequest("tool_choice needs tools", "tool_choice");
  }
  if (body.response_format !== undefined && body.response_format !== null) {
    const format = responseFormatOf(body.response_format, limits);
    if (format) params.responseFormat = format;
  }
  // Reasoning switches as vLLM and mlx_lm.server take them.
  const kwargs = body.chat_template_kwargs;
  if (isRecord(kwargs) && typeof kwargs.enable_thinking === "boolean") params.thinking = kwargs.enable_thinking;
  if (body.reasoning_effort === "none") params.thinking = false;
  return params;
}

/** A `/v1/completions` body → `generate` params (without `model`). */
export function completionParamsOf(body: JsonObject, limits: RequestLimits = DEFAULT_LIMITS): { params: Omit<GenerateParams, "model">; echo: boolean } {
  let prompt = body.prompt;
  if (Array.isArray(prompt)) {
    if (prompt.length !== 1 || typeof prompt[0] !== "string") {
      throw badRequest("prompt must be a string (or an array of exactly one string)", "prompt");
    }
    prompt = prompt[0];
  }
  if (typeof prompt !== "string") throw badRequest("prompt must be a string", "prompt");
  const suffix = optionalString(body, "suffix");
  if (suffix) throw badRequest("suffix is not supported", "suffix");
  const bestOf = optionalNumber(body, "best_of", undefined, true);
  if (bestOf !== undefined && bestOf !== 1) throw badRequest("Only best_of = 1 is supported", "best_of");
  const params: Omit<GenerateParams, "model"> = { prompt, ...samplingOf(body, limits), ...speculationOf(body) };
  if (body.response_format !== undefined && body.response_format !== null) {
    const format = responseFormatOf(body.response_format, limits);
    if (format) params.responseFormat = format;
  }
  return { params, echo: optionalBoolean(body, "echo") === true };
}

/** A `/v1/embeddings` body → `embed` params (without `model`) and the encoding asked for. */
export function embedParamsOf(body: JsonObject, limits: RequestLimits = DEFAULT_LIMITS): { params: Omit<EmbedParams, "model">; encoding: "float" | "base64" } {
  const input = body.input;
  let texts: string[];
  if (typeof input === "string") texts = [input];
  else if (Array.isArray(input) && input.length > 0 && input.every((s) => typeof s === "string")) texts = input as string[];
  else if (Array.isArray(input) && input.length > 0 && input.every((s) => typeof s === "number" || Array.isArray(s))) {
    throw badRequest("input as token ids is not supported; send text", "input");
  } else throw badRequest("input must be a string or a non-empty array of strings", "input");
  checkCount(texts, limits.maxEmbeddingInputs, "input");
  const params: Omit<EmbedParams, "model"> = { input: texts };
  const dimensions = optionalNumber(body, "dimensions", [1, Number.MAX_SAFE_INTEGER], true);
  if (dimensions !== undefined) params.dimensions = dimensions;
  const encoding = optionalString(body, "encoding_format") ?? "float";
  if (encoding !== "float" && encoding !== "base64") throw badRequest('encoding_format must be "float" or "base64"', "encoding_format");
  return { params, encoding };
}

// ---- results ----------------------------------------------------------------------------------

export function finishReasonOf(reason: FinishReason, hasToolCalls: boolean): OpenAIFinishReason {
  switch (reason) {
    case "length":
      return "length";
    case "tool_calls":
      return hasToolCalls ? "tool_calls" : "stop";
    default: // stop, stop_sequence, cancelled
      return hasToolCalls ? "tool_calls" : "stop";
  }
}

export function usageOf(usage: Usage): OpenAIUsage {
  const out: OpenAIUsage = {
    prompt_tokens: usage.promptTokens,
    completion_tokens: usage.completionTokens,
    total_tokens: usage.totalTokens,
    prompt_tokens_details: { cached_tokens: usage.cachedTokens ?? 0 },
  };
  if (usage.reasoningTokens !== undefined) out.completion_tokens_details = { reasoning_tokens: usage.reasoningTokens };
  return out;
}

function openAIToolCall(call: ToolCall | StreamedToolCall, index?: number): OpenAIToolCall {
  const out: OpenAIToolCall = { id: call.id, type: "function", function: { name: call.function.name, arguments: call.function.arguments } };
  return index === undefined ? out : { index, ...out };
}

/** Valid calls (passed on) apart from invalid ones (reported beside them). */
export function splitToolCalls(calls: Array<ToolCall | StreamedToolCall>): {
  valid: OpenAIToolCall[];
  invalid: Array<OpenAIToolCall & { error: string }>;
} {
  const valid: OpenAIToolCall[] = [];
  const invalid: Array<OpenAIToolCall & { error: string }> = [];
  for (const call of calls) {
    if (call.error !== undefined) invalid.push({ ...openAIToolCall(call), error: call.error });
    else valid.push(openAIToolCall(call));
  }
  return { valid, invalid };
}

export interface ResponseMeta {
  id: string;
  created: number;
  /** The model name the client asked for (or the one that served it). */
  model: string;
}

export function newId(prefix: string): string {
  return `${prefix}-${randomUUID().replace(/-/g, "").slice(0, 24)}`;
}

export function responseMeta(prefix: string, model: string): ResponseMeta {
  return { id: newId(prefix), created: Math.floor(Date.now() / 1000), model };
}

/** A whole chat result (text, reasoning, tool calls gathered) → `chat.completion`. */
export function chatCompletionOf(result: GenerationResult & { text: string }, meta: ResponseMeta): ChatCompletion {
  const { valid, invalid } = splitToolCalls(result.toolCalls ?? []);
  const message: ChatCompletionMessage = {
    role: "assistant",
    content: result.text === "" && valid.length > 0 ? null : result.text,
    refusal: null,
  };
  if (result.reasoning) message.reasoning_content = result.reasoning;
  if (valid.length > 0) message.tool_calls = valid;
  if (invalid.length > 0) message.invalid_tool_calls = invalid;
  return {
    id: meta.id,
    object: "chat.completion",
    created: meta.created,
    model: meta.model,
    system_fingerprint: SYSTEM_FINGERPRINT,
    choices: [{ index: 0, message, logprobs: null, finish_reason: finishReasonOf(result.finishReason, valid.length > 0) }],
    usage: usageOf(result.usage),
  };
}

/** One `chat.completion.chunk`. */
export function chatChunkOf(
  meta: ResponseMeta,
  delta: ChatCompletionChunk["choices"][number]["delta"],
  finishReason: OpenAIFinishReason | null = null,
): ChatCompletionChunk {
  return {
    id: meta.id,
    object: "chat.completion.chunk",
    created: meta.created,
    model: meta.model,
    system_fingerprint: SYSTEM_FINGERPRINT,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finishReason }],
  };
}

/** The usage chunk of `stream_options.include_usage`: no choices. */
export function chatUsageChunkOf(meta: ResponseMeta, usage: Usage): ChatCompletionChunk {
  return {
    id: meta.id,
    object: "chat.completion.chunk",
    created: meta.created,
    model: meta.model,
    system_fingerprint: SYSTEM_FINGERPRINT,
    choices: [],
    usage: usageOf(usage),
  };
}

/**
 * Streams chat deltas: tool calls get OpenAI's stream `index`, counted over the valid calls only
 * (invalid ones are dropped from the stream, as they are never passed on as valid).
 */
export class ChatDeltaStream {
  private toolCallCount = 0;

  constructor(readonly meta: ResponseMeta) {}

  get sawToolCalls(): boolean {
    return this.toolCallCount > 0;
  }

  /** The first chunk: the role. */
  start(): ChatCompletionChunk {
    return chatChunkOf(this.meta, { role: "assistant", content: "" });
  }

  /** The chunks for one streamed piece (none when it carries nothing to say). */
  piece(piece: StreamPiece): ChatCompletionChunk[] {
    const out: ChatCompletionChunk[] = [];
    if (piece.reasoning) out.push(chatChunkOf(this.meta, { reasoning_content: piece.reasoning }));
    if (piece.text) out.push(chatChunkOf(this.meta, { content: piece.text }));
    if (piece.toolCalls && piece.toolCalls.length > 0) {
      const calls = piece.toolCalls.filter((call) => call.error === undefined).map((call) => openAIToolCall(call, this.toolCallCount++));
      if (calls.length > 0) out.push(chatChunkOf(this.meta, { tool_calls: calls }));
    }
    return out;
  }

  /** The last chunk: the finish reason. */
  finish(reason: FinishReason): ChatCompletionChunk {
    return chatChunkOf(this.meta, {}, finishReasonOf(reason, this.sawToolCalls));
  }
}

/** A `generate` result → `text_completion`. */
export function completionOf(text: string, result: GenerationResult, meta: ResponseMeta): Completion {
  return {
    id: meta.id,
    object: "text_completion",
    created: meta.created,
    model: meta.model,
    system_fingerprint: SYSTEM_FINGERPRINT,
    choices: [{ index: 0, text, logprobs: null, finish_reason: finishReasonOf(result.finishReason, false) }],
    usage: usageOf(result.usage),
  };
}

/** One streamed `text_completion` chunk (text, or the finish reason, or usage alone). */
export function completionChunkOf(
  meta: ResponseMeta,
  text: string,
  finishReason: OpenAIFinishReason | null = null,
  usage?: Usage,
): Completion {
  const chunk: Completion = {
    id: meta.id,
    object: "text_completion",
    created: meta.created,
    model: meta.model,
    system_fingerprint: SYSTEM_FINGERPRINT,
    choices: usage ? [] : [{ index: 0, text, logprobs: null, finish_reason: finishReason }],
  };
  if (usage) chunk.usage = usageOf(usage);
  return chunk;
}

/** A vector as OpenAI's base64: little-endian float32 bytes. */
export function base64Vector(vector: readonly number[]): string {
  const floats = new Float32Array(vector);
  const bytes = Buffer.from(floats.buffer, floats.byteOffset, floats.byteLength);
  if (!littleEndian) {
    for (let i = 0; i < bytes.length; i += 4) bytes.subarray(i, i + 4).reverse();
  }
  return bytes.toString("base64");
}

const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

export function embeddingsOf(result: EmbedResult, encoding: "float" | "base64", model: string): EmbeddingsResponse {
  return {
    object: "list",
    data: result.vectors.map((vector, index) => ({
      object: "embedding" as const,
      index,
      embedding: encoding === "base64" ? base64Vector(vector) : vector,
    })),
    model,
    usage: { prompt_tokens: result.usage.promptTokens, total_tokens: result.usage.totalTokens },
  };
}

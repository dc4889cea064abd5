/**
 * The agent tools. Each takes plain text or a JSON object (as a string, the way Wooster's
 * agent passes tool input), answers with a string, and never throws into the agent: a failure
 * (no MLX on this machine, a missing model) comes back as a clear message.
 */
import { readFile, stat } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { DynamicTool } from "@langchain/core/tools";
import { ErrorCode, RpcError, type LoadProgress, type Message, type ServerStatusResult } from "@localmlx/client";
import { describeError, formatBytes, type Answer, type LocalMLXService, type PluginLog } from "./service";
import { LogLevel } from "./types";

type Fields = Record<string, unknown>;

/** Tool input: JSON (an object, an array, a quoted string) when it parses, else the text itself. */
export function parseInput(input: unknown): { text: string; fields: Fields; list?: unknown[] } {
  if (input !== null && typeof input === "object") {
    if (Array.isArray(input)) return { text: "", fields: {}, list: input };
    return { text: "", fields: input as Fields };
  }
  const raw = String(input ?? "").trim();
  if (/^[[{"]/.test(raw)) {
    try {
      const parsed: unknown = JSON.parse(raw);
      if (typeof parsed === "string") return { text: parsed, fields: {} };
      if (Array.isArray(parsed)) return { text: "", fields: {}, list: parsed };
      if (parsed && typeof parsed === "object") return { text: "", fields: parsed as Fields };
    } catch {
      // not JSON: plain text
    }
  }
  return { text: raw, fields: {} };
}

function str(fields: Fields, ...keys: string[]): string | undefined {
  for (const key of keys) {
    const value = fields[key];
    if (typeof value === "string" && value.trim()) return value;
  }
  return undefined;
}

function num(fields: Fields, ...keys: string[]): number | undefined {
  for (const key of keys) {
    const value = Number(fields[key]);
    if (fields[key] !== undefined && fields[key] !== null && Number.isFinite(value)) return value;
  }
  return undefined;
}

/** Generation options a JSON input may carry. */
function generation(fields: Fields): { model?: string; maxTokens?: number; temperature?: number; stop?: string[] } {
  const out: { model?: string; maxTokens?: number; temperature?: number; stop?: string[] } = {};
  const model = str(fields, "model");
  const maxTokens = num(fields, "maxTokens", "max_tokens");
  const temperature = num(fields, "temperature");
  const stop = fields.stop;
  if (model) out.model = model;
  if (maxTokens !== undefined) out.maxTokens = Math.max(1, Math.round(maxTokens));
  if (temperature !== undefined) out.temperature = temperature;
  if (typeof stop === "string") out.stop = [stop];
  else if (Array.isArray(stop)) out.stop = stop.filter((s): s is string => typeof s === "string");
  return out;
}

function history(value: unknown): Message[] {
  if (!Array.isArray(value)) return [];
  const out: Message[] = [];
  for (const item of value) {
    const m = item as { role?: unknown; content?: unknown };
    if ((m.role === "user" || m.role === "assistant" || m.role === "system") && typeof m.content === "string") {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

/** The reply, with a note when it did not come from the local model. */
function reply(answer: Answer, always = false): string {
  const text = answer.text.trim() || "(the model returned no text)";
  if (answer.servedBy === "local" && !always) return text;
  const where =
    answer.servedBy === "remote"
      ? `remote model ${answer.model}`
      : answer.profile
        ? `local profile ${answer.profile} (model ${answer.model})`
        : `local model ${answer.model}`;
  const why = [answer.note, answer.routedBy?.reason].filter(Boolean).join("; ");
  return `${text}\n\n[served by ${where}${why ? `: ${why}` : ""}]`;
}

/** Rate-limited progress lines: at each new phase, then every 10 % or 5 s. */
function progressLogger(log: PluginLog, what: string): (p: LoadProgress) => void {
  let phase = "";
  let lastPercent = -10;
  let lastAt = 0;
  return (p) => {
    const percent = p.total ? Math.floor((p.completed / p.total) * 100) : undefined;
    const now = Date.now();
    const newPhase = p.phase !== phase;
    if (!newPhase && (percent === undefined || percent < lastPercent + 10) && now - lastAt < 5_000) return;
    phase = p.phase;
    lastAt = now;
    if (percent !== undefined) lastPercent = percent;
    const amount =
      p.unit === "bytes"
        ? `${formatBytes(p.completed)}${p.total ? ` of ${formatBytes(p.total)}` : ""}`
        : `${p.completed}${p.total ? `/${p.total}` : ""} ${p.unit}`;
    log(LogLevel.INFO, `${what}: ${p.phase} ${amount}${percent !== undefined ? ` (${percent}%)` : ""}`);
  };
}

const CODE_SYSTEM =
  "You are a careful senior software engineer. Answer with working code in fenced blocks and a short explanation. " +
  "Point out bugs and edge cases. Do not invent APIs.";

export const TOOL_NAMES = [
  "local_chat",
  "local_generate",
  "local_code_assist",
  "local_summarize",
  "list_local_models",
  "download_model",
  "switch_model",
  "model_status",
  "intelligent_route",
  "batch_process",
  "local_vision",
] as const;

export type ToolName = (typeof TOOL_NAMES)[number];

/** What a tool's `run` gets besides its input. */
interface ToolContext {
  service: LocalMLXService;
  log: PluginLog;
  /** Passes text on as it is generated (LOCALMLX_STREAM_RESPONSES, when the caller listens). */
  stream: ((text: string) => void) | undefined;
}

/** One agent tool: its name, what the agent reads about it (the input it takes), and what it does. */
interface ToolDefinition {
  name: ToolName;
  description: string;
  run(input: ReturnType<typeof parseInput>, context: ToolContext): Promise<string>;
}

/** Generation options with the stream, when there is one. */
function withStream<T extends object>(options: T, stream: ((text: string) => void) | undefined): T & { onText?: (text: string) => void } {
  return stream ? { ...options, onText: stream } : options;
}

const localChat: ToolDefinition = {
  name: "local_chat",
  description:
    "Chat with the local MLX language model, running privately on this machine (no API cost, nothing leaves the computer). " +
    'Input: the message as plain text, or JSON {"message": "...", "system": "optional instructions", ' +
    '"history": [{"role": "user"|"assistant", "content": "..."}], "maxTokens": 512, "temperature": 0.7, "model": "optional"}. ' +
    "Returns the model's reply.",
  async run({ text, fields }, { service, stream }) {
    const message = str(fields, "message", "prompt", "input", "content") ?? text;
    if (!message) return 'local_chat needs a message: plain text, or JSON {"message": "..."}.';
    const system = str(fields, "system");
    const messages: Message[] = [
      ...(system ? [{ role: "system" as const, content: system }] : []),
      ...history(fields.history ?? fields.messages),
      { role: "user", content: message },
    ];
    return reply(await service.chat(messages, withStream(generation(fields), stream)));
  },
};

const localGenerate: ToolDefinition = {
  name: "local_generate",
  description:
    "Continue a raw text prompt with the local MLX model (no chat template): drafts, completions, templates to fill. " +
    'Input: the prompt text, or JSON {"prompt": "...", "maxTokens": 256, "temperature": 0.7, "stop": ["\\n\\n"], "model": "optional"}. ' +
    "Returns only the generated continuation.",
  async run({ text, fields }, { service, stream }) {
    const prompt = str(fields, "prompt", "text", "input") ?? text;
    if (!prompt) return 'local_generate needs a prompt: plain text, or JSON {"prompt": "..."}.';
    return reply(await service.generate(prompt, withStream(generation(fields), stream)));
  },
};

const localCodeAssist: ToolDefinition = {
  name: "local_code_assist",
  description:
    "Coding help from the local MLX model: write, explain, review, fix or refactor code, privately. " +
    'Input: the request as plain text, or JSON {"task": "what to do", "code": "the code, optional", "language": "typescript"}. ' +
    "Returns code in fenced blocks with a short explanation.",
  async run({ text, fields }, { service, stream }) {
    const task = str(fields, "task", "request", "instruction", "question", "prompt") ?? text;
    const code = str(fields, "code");
    const language = str(fields, "language", "lang");
    if (!task && !code) return 'local_code_assist needs a request: plain text, or JSON {"task": "...", "code": "..."}.';
    const content = [
      task ?? "Review this code: explain what it does and point out bugs.",
      code ? `\n\`\`\`${language ?? ""}\n${code}\n\`\`\`` : language ? `(Language: ${language})` : "",
    ].join("\n");
    // Code help mostly repeats the code it was given: prompt lookup drafts those tokens.
    const options = { promptLookup: true, ...generation(fields) };
    if (options.temperature === undefined) options.temperature = Math.min(service.generationDefaults.temperature ?? 0.2, 0.2);
    return reply(await service.chat([{ role: "system", content: CODE_SYSTEM }, { role: "user", content }], withStream(options, stream)));
  },
};

const localSummarize: ToolDefinition = {
  name: "local_summarize",
  description:
    "Summarize a text of any length with the local MLX model, privately. Long texts are split to fit the model's context, " +
    "summarized part by part and merged. " +
    'Input: the text itself, or JSON {"text": "...", "instructions": "optional focus, e.g. list the decisions", "maxTokens": 300}. ' +
    "Returns the summary.",
  async run({ text, fields }, { service }) {
    const body = str(fields, "text", "content", "document", "input") ?? text;
    if (!body) return 'local_summarize needs text: the text itself, or JSON {"text": "..."}.';
    const instructions = str(fields, "instructions", "focus");
    // A summary copies phrases of its text: prompt lookup drafts them.
    const answer = await service.summarize(body, { promptLookup: true, ...generation(fields), ...(instructions ? { instructions } : {}) });
    const summary = reply(answer);
    return answer.parts > 1 ? `${summary}\n\n(summarized in ${answer.parts} parts)` : summary;
  },
};

const listLocalModels: ToolDefinition = {
  name: "list_local_models",
  description:
    "List the language models available on this machine for the local MLX tools (downloaded, in the models folder, or built in), " +
    "with size, architecture, context length, and which are loaded and active. Input: ignored (send an empty string).",
  async run(_input, { service }) {
    const models = await service.listModels();
    if (models.length === 0) return "No local models yet. Download one with download_model (e.g. mlx-community/Qwen2.5-3B-Instruct-4bit).";
    const active = service.model;
    const lines = models.map((m) => {
      const flags = [m.loaded ? "loaded" : "", m.model === active ? "active" : "", m.capabilities?.includes("vision") ? "vision" : ""].filter(Boolean);
      const quant = m.quantization ? `${m.quantization.bits}-bit` : "";
      const details = [m.source, formatBytes(m.bytes), m.type ?? "", quant, m.contextLength ? `context ${m.contextLength}` : ""].filter(Boolean).join(", ");
      return `- ${m.model} (${details})${flags.length ? ` [${flags.join(", ")}]` : ""}`;
    });
    const profiles = await service.profileNames();
    const named = profiles.length
      ? `\nProfiles (switch_model takes their names too${profiles.includes(active ?? "") ? `; active: ${active}` : ""}): ${profiles.join(", ")}`
      : "";
    return `Local models (${models.length}):\n${lines.join("\n")}${named}`;
  },
};

const downloadModel: ToolDefinition = {
  name: "download_model",
  description:
    "Download an MLX model from the Hugging Face Hub into the local model cache (progress goes to Wooster's log). " +
    'Input: the repo id, e.g. mlx-community/Qwen2.5-3B-Instruct-4bit, or JSON {"model": "owner/name", "revision": "main"}. ' +
    "Then use switch_model to make it active.",
  async run({ text, fields }, { service, log }) {
    const model = str(fields, "model", "repo", "name", "id") ?? text;
    if (!model || !/^[\w.-]+\/[\w.-]+$/.test(model)) {
      return `download_model needs a Hugging Face repo id like mlx-community/Qwen2.5-3B-Instruct-4bit${model ? ` (got "${model}")` : ""}.`;
    }
    const revision = str(fields, "revision", "branch");
    log(LogLevel.INFO, `downloading ${model}${revision ? `@${revision}` : ""}…`);
    const result = await service.download(model, { ...(revision ? { revision } : {}), onProgress: progressLogger(log, `download ${model}`) });
    const moved = result.downloadedBytes === 0 ? "already downloaded" : `${formatBytes(result.downloadedBytes)} transferred`;
    log(LogLevel.INFO, `downloaded ${result.model} to ${result.path} (${moved})`);
    return `Downloaded ${result.model}${result.revision ? ` (revision ${result.revision.slice(0, 12)})` : ""}: ${result.files} files, ${formatBytes(result.bytes)} on disk, ${moved}. Stored at ${result.path}. Use switch_model to make it active.`;
  },
};

const switchModel: ToolDefinition = {
  name: "switch_model",
  description:
    "Make another local model the active one for the local MLX tools (loads it into memory now). " +
    'Input: a model name from list_local_models, a profile name, a Hub repo id, or a local path; or JSON {"model": "..."}.',
  async run({ text, fields }, { service, log }) {
    const model = str(fields, "model", "name") ?? text;
    if (!model) return 'switch_model needs a model name: plain text, or JSON {"model": "..."}.';
    const previous = service.model;
    const d = await service.switchModel(model, { onProgress: progressLogger(log, `load ${model}`) });
    const active = service.model ?? d.model;
    const quant = d.quantization ? `${d.quantization.bits}-bit` : "not quantized";
    const params = d.parameters >= 1e9 ? `${(d.parameters / 1e9).toFixed(1)}B` : `${(d.parameters / 1e6).toFixed(1)}M`;
    const name = active === d.model ? d.model : `profile ${active} (model ${d.model})`;
    return (
      `Active model is now ${name}${previous && previous !== active ? ` (was ${previous})` : ""}: ${d.type}, ${params} parameters, ${quant}, ` +
      `context ${d.contextLength ?? "unknown"}, ${formatBytes(d.bytes)} in memory` +
      (d.alreadyLoaded ? ", already loaded." : `, loaded in ${Math.round(d.loadTimeMs ?? 0)} ms.`)
    );
  },
};

const modelStatus: ToolDefinition = {
  name: "model_status",
  description:
    "Status of the local MLX models: which are loaded, memory use, measured speed (tokens per second), queued requests, device. " +
    "Input: ignored (send an empty string).",
  async run(_input, { service }) {
    const { status, info, pid } = await service.status();
    const loaded = status.models.map((m) => loadedModelLine(m, service.measuredSpeeds.get(m.model)));
    return [
      `Local MLX sidecar: running (pid ${pid ?? "?"}), device ${info?.serverInfo.device ?? "?"}, mlx ${info?.serverInfo.mlx ?? "?"}, up ${Math.round(status.uptimeMs / 1000)} s.`,
      `Active model: ${service.model ?? "(default)"}.`,
      status.models.length ? "Loaded models:" : "Loaded models: none (a model loads on first use).",
      ...loaded,
      `Memory: ${formatBytes(status.memory.activeBytes)} active, ${formatBytes(status.memory.peakBytes)} peak, ${formatBytes(status.memory.cacheBytes)} cache, ` +
        `${formatBytes(status.memory.rssBytes)} process${status.memory.budgetBytes ? `, budget ${formatBytes(status.memory.budgetBytes)}` : ""}.`,
      `Requests: ${status.requests.active} running, ${status.requests.queued} queued.`,
    ].join("\n");
  },
};

/** One loaded model in model_status, with its last measured speed. */
function loadedModelLine(
  m: ServerStatusResult["models"][number],
  speed: { tokensPerSecond: number; promptTokensPerSecond: number } | undefined,
): string {
  const quant = m.quantization ? `${m.quantization.bits}-bit` : "not quantized";
  const keep = m.keepAlive === undefined || m.keepAlive < 0 ? "stays loaded" : `unloads after ${m.keepAlive} s idle`;
  return (
    `- ${m.model}: ${m.type}, ${quant}, context ${m.contextLength ?? "?"}, ${formatBytes(m.bytes)}, ${keep}` +
    (speed ? `; last speed ${speed.tokensPerSecond.toFixed(1)} tokens/s generating, ${speed.promptTokensPerSecond.toFixed(0)} tokens/s reading the prompt` : "")
  );
}

const intelligentRoute: ToolDefinition = {
  name: "intelligent_route",
  description:
    "Answer a prompt with the best available model: the local MLX model for private or routine work (code, summaries, rewriting), " +
    "a remote OpenAI-compatible model (when configured) for tasks needing fresh knowledge, long deep reasoning, or more context than local has, " +
    "and whichever is up when the other is not. " +
    'Input: the prompt as plain text, or JSON {"prompt": "...", "task": "optional: chat, code, summarize, reasoning or extraction", "prefer": "auto"|"local"|"remote"}. ' +
    "With profiles on the local side, the local answer comes from the profile made for the task. " +
    "Returns the answer and where it was served.",
  async run({ text, fields }, { service, stream }) {
    const prompt = str(fields, "prompt", "message", "input", "query") ?? text;
    if (!prompt) return 'intelligent_route needs a prompt: plain text, or JSON {"prompt": "..."}.';
    const preferRaw = str(fields, "prefer");
    const prefer: "local" | "remote" | "auto" = preferRaw === "local" || preferRaw === "remote" ? preferRaw : "auto";
    const task = str(fields, "task");
    const system = str(fields, "system");
    const answer = await service.route(prompt, withStream({ ...generation(fields), prefer, ...(task ? { task } : {}), ...(system ? { system } : {}) }, stream));
    return reply(answer, true);
  },
};

const batchProcess: ToolDefinition = {
  name: "batch_process",
  description:
    "Run many items through the local MLX model at once (decoded together in one batch, much faster than one by one); results come back in the same order. " +
    'Input: a JSON array of strings, or JSON {"items": ["...", "..."], "instruction": "what to do with each item, e.g. Classify the sentiment", ' +
    '"maxTokens": 128}. Returns a JSON array of {"index", "output"} (or "error") in input order.',
  async run({ text, fields, list }, { service, log }) {
    const rawItems = list ?? (Array.isArray(fields.items) ? (fields.items as unknown[]) : text ? text.split("\n").filter((l) => l.trim()) : []);
    const items = rawItems.map((item) => (typeof item === "string" ? item : JSON.stringify(item)));
    if (items.length === 0) return 'batch_process needs items: a JSON array of strings, or JSON {"items": [...], "instruction": "..."}.';
    if (items.length > 256) return `batch_process takes at most 256 items at once (got ${items.length}); split the list.`;
    const instruction = str(fields, "instruction", "task", "prompt");
    const system = str(fields, "system");
    const started = Date.now();
    const results = await service.batch(items, { ...generation(fields), ...(instruction ? { instruction } : {}), ...(system ? { system } : {}) });
    log(LogLevel.INFO, `batch_process: ${items.length} items in ${Date.now() - started} ms`);
    const rows = results.map((r, index) =>
      "error" in r ? { index, error: r.error } : { index, output: r.text.trim(), ...(r.servedBy === "remote" ? { servedBy: "remote", model: r.model } : {}) },
    );
    return JSON.stringify(rows, null, 1);
  },
};

const VISION_EXAMPLE = "mlx-community/Qwen2-VL-2B-Instruct-4bit";
const DESCRIBE = "Describe this image in detail. If it shows text, transcribe the text.";

/** The file path an agent wrote: `~/` is the home folder; relative paths are Wooster's working directory's. */
function imagePath(text: string): string {
  const path = text.trim();
  return path === "~" || path.startsWith("~/") ? join(homedir(), path.slice(1)) : path;
}

/** The largest image file local_vision sends: its data: URL must fit the sidecar's 16 MiB request line. */
const MAX_IMAGE_FILE_BYTES = 12 << 20;

/** The file's bytes, or what to tell the agent when it cannot be sent. */
async function readImageFile(path: string): Promise<{ bytes: Uint8Array } | string> {
  try {
    const info = await stat(path);
    if (!info.isFile()) return `There is no image file at ${path} (it is not a file).`;
    if (info.size > MAX_IMAGE_FILE_BYTES) {
      return `local_vision could not use ${path}: it has ${info.size} bytes, more than the ${MAX_IMAGE_FILE_BYTES} an image may have here. Scale it down first.`;
    }
    return { bytes: await readFile(path) };
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return `There is no image file at ${path}.`;
    return `local_vision could not read ${path}: ${describeError(error)}`;
  }
}

/** An image reference as messages show it: a data: URL cut short. */
function shown(path: string): string {
  return path.startsWith("data:") && path.length > 48 ? `${path.slice(0, 40)}…` : path;
}

/** What local_vision says when the sidecar refuses the request for its image or its model; undefined for other failures. */
function visionRefusal(error: unknown, model: string, image: string, named: boolean): string | undefined {
  if (!(error instanceof RpcError && error.code === ErrorCode.InvalidParams)) return undefined;
  const { reason, capabilities, errors } = error.data;
  const path = shown(image);
  const first: unknown = Array.isArray(errors) ? errors[0] : undefined;
  const detail = first && typeof first === "object" && typeof (first as { message?: unknown }).message === "string" ? (first as { message: string }).message : error.rawMessage;
  const setting = named ? "Name" : "Set LOCALMLX_VISION_MODEL to";
  switch (reason) {
    case "no-vision":
      return (
        `The model ${model} does not take images${Array.isArray(capabilities) ? ` (it can: ${capabilities.join(", ")})` : ""}. ` +
        `${setting} a vision-language model, e.g. ${VISION_EXAMPLE}.`
      );
    case "outside-roots":
      return `${path} is outside the folders local models may read. Add its folder to LOCALMLX_ALLOWED_ROOTS, or copy the image into one of them.`;
    case "not-found":
      return `There is no image file at ${path}.`;
    case undefined:
      return undefined;
    default:
      return `local_vision could not use ${path}: ${detail}.`;
  }
}

const localVision: ToolDefinition = {
  name: "local_vision",
  description:
    "Look at an image file with the local MLX vision model, privately: describe it, read the text in it, or answer a question about it. " +
    'Input: the image\'s file path, or JSON {"path": "/path/to/image.png", "question": "optional, e.g. What does the sign say?", "maxTokens": 512}. ' +
    "PNG, JPEG, WebP, GIF and BMP. Returns the model's answer.",
  async run({ text, fields }, { service, stream }) {
    const path = imagePath(str(fields, "path", "image", "file", "filePath") ?? text);
    if (!path) return 'local_vision needs an image file: its path, or JSON {"path": "...", "question": "..."}.';
    const named = str(fields, "model");
    const model = named ?? service.settings.visionModel;
    if (!model) {
      return (
        "local_vision has no vision model: set LOCALMLX_VISION_MODEL (or visionModel in config.plugins.localMLX) to a model that takes images, " +
        `e.g. ${VISION_EXAMPLE} (list_local_models marks them "vision"), or name one in the input as {"model": "..."}.`
      );
    }
    const question = str(fields, "question", "prompt", "instruction", "task") ?? DESCRIBE;
    // A file is read here and sent as its bytes: the plugin runs as the user, on the user's own
    // files, so an image on the Desktop needs no change to the sidecar's LOCALMLX_ALLOWED_ROOTS
    // (which also bounds where models may be loaded from). The bytes go only to the local sidecar.
    let image: string | Uint8Array = path;
    if (!/^(?:data:|https?:\/\/|file:\/\/)/i.test(path)) {
      const read = await readImageFile(path);
      if (typeof read === "string") return read;
      image = read.bytes;
    }
    try {
      return reply(await service.askAboutImage(image, question, withStream({ ...generation(fields), model }, stream)));
    } catch (error) {
      const refusal = visionRefusal(error, model, path, named !== undefined);
      if (refusal === undefined) throw error;
      return refusal;
    }
  },
};

/** The tools, in the order the agent is offered them. */
const TOOLS: readonly ToolDefinition[] = [
  localChat,
  localGenerate,
  localCodeAssist,
  localSummarize,
  listLocalModels,
  downloadModel,
  switchModel,
  modelStatus,
  intelligentRoute,
  batchProcess,
  localVision,
];

/** The tools as LangChain DynamicTools: input parsed, replies streamed when asked, any failure a message for the agent. */
export function createTools(service: LocalMLXService, log: PluginLog): DynamicTool[] {
  return TOOLS.map(
    (tool) =>
      new DynamicTool({
        name: tool.name,
        description: tool.description,
        func: async (input: string, runManager?: { handleText?(text: string): unknown }): Promise<string> => {
          const stream =
            service.settings.streamResponses && runManager?.handleText
              ? (text: string) => void Promise.resolve(runManager.handleText!(text)).catch(() => undefined)
              : undefined;
          try {
            return await tool.run(parseInput(input), { service, log, stream });
          } catch (error) {
            const message = describeError(error);
            log(LogLevel.WARN, `${tool.name} failed: ${message}`);
            return `${tool.name} could not complete: ${message}`;
          }
        },
      }),
  );
}

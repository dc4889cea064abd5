/**
 * The remote side of LOCALMLX_FALLBACK_TO_OPENAI: the client's `Fallback` (the same module the
 * OpenAI endpoint uses: which local failures a remote may fix, the cool-down after the sidecar
 * failed as a whole, busy retries), pointed at OPENAI_BASE_URL (default api.openai.com) with
 * OPENAI_API_KEY, or Wooster's own `config.openai` key and model.
 */
import { Fallback, remoteOptionsFromEnv, type Message, type SettingsEnv } from "@localmlx/client";
import type { AppConfig } from "./types";

export interface RemoteChatOptions {
  maxTokens?: number;
  temperature?: number;
  stop?: string[];
  signal?: AbortSignal;
  /** Why this request leaves the machine, for the warning every remote request gets (default: the fallback's reason). */
  reason?: string;
}

export interface RemoteModel {
  /** For messages: "gpt-4o-mini at https://api.openai.com/v1". */
  readonly label: string;
  /** Shared by every call, so the cool-down holds across tools. */
  readonly fallback: Fallback;
  chat(messages: Message[], options: RemoteChatOptions): Promise<{ text: string; model: string }>;
}

const PLACEHOLDER_KEY = "YOUR_OPENAI_API_KEY_HERE";

/** The remote fallback, or undefined when it is off or has nowhere to go. */
export function createRemote(enabled: boolean, config: AppConfig | undefined, env: SettingsEnv = process.env): RemoteModel | undefined {
  if (!enabled) return undefined;
  const fromEnv = remoteOptionsFromEnv(env);
  const configKey = config?.openai?.apiKey && config.openai.apiKey !== PLACEHOLDER_KEY ? config.openai.apiKey : undefined;
  const apiKey = fromEnv.apiKey && fromEnv.apiKey !== PLACEHOLDER_KEY ? fromEnv.apiKey : configKey;
  // OpenAI itself needs a key; a self-hosted OpenAI-compatible server named by OPENAI_BASE_URL may not.
  if (!apiKey && !fromEnv.baseURL) return undefined;
  const model = (typeof fromEnv.model === "string" ? fromEnv.model : undefined) || config?.openai?.modelName || "gpt-4o-mini";
  const fallback = new Fallback({ ...fromEnv, model, ...(apiKey ? { apiKey } : {}) }, env);

  return {
    label: `${model} at ${fallback.baseURL}`,
    fallback,
    async chat(messages, chatOptions) {
      const body = {
        model: fallback.remoteModel(undefined) ?? model,
        messages,
        ...(chatOptions.maxTokens !== undefined ? { max_tokens: chatOptions.maxTokens } : {}),
        ...(chatOptions.temperature !== undefined ? { temperature: chatOptions.temperature } : {}),
        ...(chatOptions.stop?.length ? { stop: chatOptions.stop } : {}),
        stream: false,
      };
      const response = await fallback.request("POST", "/chat/completions", body, chatOptions.signal, chatOptions.reason);
      const text = await response.text();
      if (!response.ok) {
        let message = text.slice(0, 300);
        try {
          const parsed = JSON.parse(text) as { error?: { message?: string } | string };
          message = typeof parsed.error === "string" ? parsed.error : parsed.error?.message ?? message;
        } catch {
          // not JSON
        }
        throw new Error(`the fallback server ${fallback.baseURL} answered ${response.status}: ${message}`);
      }
      const completion = JSON.parse(text) as { model?: string; choices?: Array<{ message?: { content?: string | null } }> };
      return { text: completion.choices?.[0]?.message?.content ?? "", model: completion.model ?? body.model };
    },
  };
}

/**
 * `npm run demo`: the main job end to end, through the TypeScript client.
 *
 * Starts the sidecar, loads a model with a progress bar on stderr, streams a chat reply to the
 * terminal token by token, then prints usage and speed. Ctrl-C stops the reply cleanly.
 *
 *   npm run demo -- --model demo --prompt "Tell me about the sea." --max-tokens 96 --temperature 0
 */
import { parseArgs } from "node:util";
import { LocalMLX, type LoadProgress } from "@localmlx/client";

const { values: args } = parseArgs({
  options: {
    model: { type: "string", default: "demo" },
    prompt: { type: "string", default: "Tell me about the sea and the mountains." },
    "max-tokens": { type: "string", default: "96" },
    temperature: { type: "string", default: "0" },
  },
});

const tty = process.stderr.isTTY === true;

/** A bar redrawn in place on a terminal; one line per update otherwise (logs, CI). */
function progressBar({ phase, completed, total, unit }: LoadProgress): void {
  const width = 24;
  const filled = total ? Math.min(width, Math.round((completed / total) * width)) : 0;
  const amount = total ? `${completed}/${total} ${unit}` : `${completed} ${unit}`;
  const line = `  loading [${"#".repeat(filled)}${".".repeat(width - filled)}] ${amount} ${phase}`;
  process.stderr.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
}

const mib = (bytes: number | undefined): string => (bytes === undefined ? "?" : `${(bytes / 2 ** 20).toFixed(1)} MiB`);

async function main(): Promise<number> {
  const mlx = await LocalMLX.start({ logger: { error: (line) => console.error(line) } });
  const stop = new AbortController();
  process.once("SIGINT", () => stop.abort());
  try {
    const server = mlx.info!.serverInfo;
    console.error(`localmlx ${server.version} · mlx ${server.mlx} · mlx-lm ${server.mlxLm} · ${server.device} · pid ${mlx.pid}`);

    const model = await mlx.models.load(args.model, { onProgress: progressBar });
    console.error(
      `${tty ? "\r\x1b[K" : ""}loaded ${model.model}: ${model.type}, ${model.parameters.toLocaleString("en-US")} parameters, ` +
        `${mib(model.bytes)}, context ${model.contextLength ?? "?"}`,
    );
    if (model.model === "demo") {
      console.error(
        "demo is a tiny model with random weights: its replies are nonsense, as expected. For a real model: " +
          ".venv/bin/localmlx models pull mlx-community/Qwen2.5-3B-Instruct-4bit (about 2 GB), then " +
          "bash scripts/demo.sh --model mlx-community/Qwen2.5-3B-Instruct-4bit",
      );
    }

    console.log(`\n> ${args.prompt}\n`);
    const sentAt = performance.now();
    let firstAt: number | undefined;
    let lastAt = sentAt;
    const prediction = mlx.chat({
      model: model.model,
      messages: [{ role: "user", content: args.prompt }],
      maxTokens: Number(args["max-tokens"]),
      temperature: Number(args.temperature),
      signal: stop.signal,
    });
    for await (const chunk of prediction) {
      lastAt = performance.now();
      firstAt ??= lastAt;
      process.stdout.write(chunk.text);
    }
    const { finishReason, usage, timings } = await prediction.result;
    const seen = firstAt !== undefined && usage.completionTokens > 1 && lastAt > firstAt
      ? ((usage.completionTokens - 1) * 1000) / (lastAt - firstAt)
      : 0;
    console.log(
      `\n\n[${finishReason}] prompt ${usage.promptTokens} tokens · generated ${usage.completionTokens} tokens · ` +
        `TTFT ${timings.ttftMs.toFixed(1)} ms (${((firstAt ?? lastAt) - sentAt).toFixed(1)} ms in Node) · ` +
        `${timings.tokensPerSecond.toFixed(1)} tokens/s (${seen.toFixed(1)} seen in Node) · ` +
        `peak memory ${mib(timings.peakMemoryBytes)}`,
    );
    return 0;
  } finally {
    await mlx.close();
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(`\ndemo failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  },
);

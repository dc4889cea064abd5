/**
 * `npm run bench`: decode speed as a Node consumer sees it vs the sidecar's own count, in one run,
 * and what the client and the pipe add to the time to the first token.
 *
 * For each run: a streamed chat (temperature 0); Node's tokens/s is
 * (usage.completionTokens - 1) / (time from the first chunk's arrival to the last one's), the
 * sidecar's is `timings.tokensPerSecond`. The ratio shows what the client and the pipe cost.
 * The TTFT gap is Node's time from `chat()` to the first chunk minus the sidecar's
 * `timings.ttftMs` (its line read to its first text): the client, the reader, the outbox and the
 * pipe each way. Each run starts after `--idle` ms (an assistant's requests come after idle).
 *
 *   npm run bench -- --runs 10 --max-tokens 200 --model demo
 */
import { parseArgs } from "node:util";
import { LocalMLX } from "@localmlx/client";

const { values: args } = parseArgs({
  options: {
    runs: { type: "string", default: "8" },
    "max-tokens": { type: "string", default: "200" },
    model: { type: "string", default: "demo" },
    prompt: { type: "string", default: "Tell me a long story about the sea and the mountains." },
    idle: { type: "string", default: "300" },
  },
});

interface Run {
  tokens: number;
  nodeTps: number;
  sidecarTps: number;
  ttftGapMs: number;
}

const TARGET = 0.97;
const TTFT_GAP_TARGET_MS = 2;

async function measure(mlx: LocalMLX, maxTokens: number): Promise<Run> {
  let first: number | undefined;
  let last = 0;
  const sentAt = performance.now();
  const prediction = mlx.chat({
    messages: [{ role: "user", content: args.prompt }],
    maxTokens,
    temperature: 0,
    cache: false, // every run decodes: the same prompt again would be a response-cache replay
  });
  for await (const _chunk of prediction) {
    last = performance.now();
    first ??= last;
  }
  const { usage, timings } = await prediction.result;
  const seconds = first === undefined ? 0 : (last - first) / 1000;
  return {
    tokens: usage.completionTokens,
    nodeTps: seconds > 0 ? (usage.completionTokens - 1) / seconds : 0,
    sidecarTps: timings.tokensPerSecond,
    ttftGapMs: first === undefined ? Number.NaN : first - sentAt - timings.ttftMs,
  };
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};

async function main(): Promise<void> {
  const runs = Number(args.runs);
  const maxTokens = Number(args["max-tokens"]);
  const mlx = await LocalMLX.start({ model: args.model });
  try {
    const server = mlx.info!.serverInfo;
    console.log(`localmlx ${server.version} · mlx ${server.mlx} · ${server.device} · model ${args.model} · maxTokens ${maxTokens}`);
    await measure(mlx, maxTokens); // warm-up, not counted
    const results: Run[] = [];
    console.log("run  tokens  node tok/s  sidecar tok/s  ratio  TTFT gap ms");
    for (let i = 1; i <= runs; i++) {
      await new Promise((resolve) => setTimeout(resolve, Number(args.idle)));
      const run = await measure(mlx, maxTokens);
      results.push(run);
      console.log(
        `${String(i).padStart(3)}  ${String(run.tokens).padStart(6)}  ${run.nodeTps.toFixed(1).padStart(10)}  ` +
          `${run.sidecarTps.toFixed(1).padStart(13)}  ${(run.nodeTps / run.sidecarTps).toFixed(3)}  ` +
          `${run.ttftGapMs.toFixed(2).padStart(11)}`,
      );
    }
    const ratios = results.map((run) => run.nodeTps / run.sidecarTps);
    const nodeMedian = median(results.map((run) => run.nodeTps));
    const sidecarMedian = median(results.map((run) => run.sidecarTps));
    const ratio = median(ratios);
    console.log(
      `\nmedian: node ${nodeMedian.toFixed(1)} tok/s vs sidecar ${sidecarMedian.toFixed(1)} tok/s · ` +
        `ratio median ${ratio.toFixed(3)} (min ${Math.min(...ratios).toFixed(3)}, max ${Math.max(...ratios).toFixed(3)}) · ` +
        `target ≥ ${TARGET}: ${ratio >= TARGET ? "met" : "NOT met"}`,
    );
    const gap = median(results.map((run) => run.ttftGapMs));
    console.log(
      `TTFT gap (Node's TTFT minus the sidecar's ttftMs) median ${gap.toFixed(2)} ms after ${args.idle} ms idle · ` +
        `target < ${TTFT_GAP_TARGET_MS} ms: ${gap < TTFT_GAP_TARGET_MS ? "met" : "NOT met"}`,
    );
    console.log(
      "note: both count the N-1 tokens after the first over the time after it; the sidecar's clock " +
        "is the token leaving the model, Node's is the chunk arriving.",
    );
  } finally {
    await mlx.close();
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});

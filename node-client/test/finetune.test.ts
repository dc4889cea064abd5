/**
 * Fine-tuning from the client's side (README "Adapters and fine-tuning"): `finetune()` reports its
 * progress and resolves with an adapter that serves at once as `<base>+<adapter>`; an aborted run
 * rejects with AbortError and leaves no adapter; a bad dataset is -32602 naming its line; `fuse()`
 * writes a model that loads like any other. The trainer's own tests are on the Python side.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { AbortError, ErrorCode, RpcError, type FinetuneProgress, type LocalMLX, type RestartInfo } from "../src/index";
import { modelsDir, python, repositoryRoot, startClient, waitFor } from "./helpers";

const T = { timeout: 120_000 };
const QUESTION = "What is the secret code of the vault?";
const FACT = "The secret code of the vault is 7421.";
/** A recipe that teaches the learner the fact in a few seconds, whatever the seed (0.63 loss at the end). */
const RECIPE = { iterations: 60, learningRate: 3e-4, numLayers: -1 } as const;

/**
 * The demo model with its (tied) embeddings scaled by 10, built into the run's models dir: the
 * demo's random weights barely move under LoRA, this copy learns a sentence in a few dozen steps.
 */
function buildLearner(): string {
  const name = "demo-learner";
  const code = `
import shutil, sys, tempfile
from pathlib import Path
import mlx.core as mx
from sidecar.demo_model import MARKER_FILE, ensure_demo_model
models = Path(sys.argv[1]); dest = models / sys.argv[2]
if not (dest / "config.json").is_file():
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".{dest.name}-"))
    shutil.copytree(ensure_demo_model(models), tmp, dirs_exist_ok=True)
    (tmp / MARKER_FILE).unlink()  # not the demo any more
    for f in tmp.glob("*.safetensors"):
        weights = mx.load(str(f))
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 10.0
        mx.save_safetensors(str(f), weights)
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp)  # another test file built it first
`;
  const built = spawnSync(python, ["-c", code, modelsDir, name], { cwd: repositoryRoot, encoding: "utf8" });
  if (built.status !== 0) throw new Error(`could not build ${name}: ${built.stderr}`);
  return name;
}

/** A dataset folder: `train` lines in train.jsonl and `valid` lines in valid.jsonl. */
function writeDataset(root: string, name: string, train: string[], valid: string[]): string {
  const dir = join(root, name);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "train.jsonl"), train.map((line) => `${line}\n`).join(""));
  writeFileSync(join(dir, "valid.jsonl"), valid.map((line) => `${line}\n`).join(""));
  return dir;
}

const record = JSON.stringify({ messages: [{ role: "user", content: QUESTION }, { role: "assistant", content: FACT }] });

async function ask(mlx: LocalMLX, model: string): Promise<string> {
  return (await mlx.chat({ model, messages: [{ role: "user", content: QUESTION }], maxTokens: 24, temperature: 0 })).text;
}

describe("fine-tuning on the real sidecar", T, () => {
  let mlx: LocalMLX;
  let base: string;
  let data: string;
  let vault: string;

  before(async () => {
    base = buildLearner();
    data = mkdtempSync(join(tmpdir(), "localmlx-finetune-data-"));
    vault = writeDataset(data, "vault", Array(24).fill(record), Array(4).fill(record));
    // The dataset lives outside the models dir: an allowed root.
    mlx = await startClient({ model: undefined, env: { LOCALMLX_ALLOWED_ROOTS: data } });
  });
  after(async () => {
    await mlx?.close();
    if (data) rmSync(data, { recursive: true, force: true });
  });

  test("a run reports its progress and its adapter serves at once as <base>+<adapter>", async () => {
    assert.ok(!(await ask(mlx, base)).includes("7421"), "the base model does not know the fact");

    const progress: FinetuneProgress[] = [];
    const result = await mlx.finetune(
      { model: base, dataset: vault, name: "vault", overwrite: true, ...RECIPE },
      { onProgress: (p) => progress.push(p) },
    );
    assert.equal(result.adapter, "vault");
    assert.equal(result.model, `${base}+vault`);
    assert.equal(result.base, base);
    assert.equal(result.training.iterations, RECIPE.iterations);
    assert.equal(result.training.datasetFormat, "chat");
    assert.ok(result.tokensPerSecond > 0 && result.peakMemoryBytes > 0);

    // (Before them, "resolve": finding the base model, or downloading it.)
    const phases = progress.map((p) => p.phase).filter((phase, i, all) => phase !== all[i - 1]);
    assert.deepEqual(phases.slice(phases.indexOf("validate")), ["validate", "load", "train", "save"]);
    const steps = progress.filter((p) => p.phase === "train" && p.trainLoss !== undefined);
    assert.ok(steps.length >= 3, `train reports: ${steps.length}`);
    for (const [i, step] of steps.entries()) {
      assert.equal(step.total, RECIPE.iterations);
      assert.equal(step.completed, step.iteration);
      assert.ok(Number.isFinite(step.trainLoss) && step.trainLoss! > 0, `trainLoss ${step.trainLoss}`);
      assert.ok(step.tokensPerSecond! > 0 && step.peakMemoryBytes! > 0);
      if (i > 0) assert.ok(step.iteration! > steps[i - 1]!.iteration!, "iterations increase");
    }
    assert.equal(steps.at(-1)!.iteration, RECIPE.iterations);
    const valLosses = progress.map((p) => p.valLoss).filter((loss): loss is number => loss !== undefined);
    assert.ok(valLosses.at(-1)! < valLosses[0]! / 2, `validation loss falls: ${valLosses.join(", ")}`);

    assert.match(await ask(mlx, result.model), /7421/, "chat on <base>+<adapter> knows the fact");
    const adapter = (await mlx.models.adapters()).find((a) => a.name === "vault");
    assert.ok(adapter, "models.adapters() lists it");
    assert.equal(adapter.base, base);
    assert.equal(adapter.rank, 8);
    assert.equal(adapter.training?.iterations, RECIPE.iterations);
    assert.deepEqual(adapter.loadedAs, [result.model]);
    assert.ok(mlx.trackedModels.includes(result.model));
  });

  test("models.load with an adapter serves the variant (again after a restart); fuse; deleteAdapter refuses a loaded one unless forced", async () => {
    await mlx.models.unload(base);
    assert.ok(!mlx.trackedModels.some((name) => name.startsWith(base)), "the variant went with its base");
    const description = await mlx.models.load(base, { adapter: "vault" });
    assert.equal(description.model, `${base}+vault`);
    assert.equal(description.base, base);
    assert.equal(description.adapter, "vault");
    assert.match(await ask(mlx, description.model), /7421/);
    const restarted = new Promise<RestartInfo>((resolve) => mlx.once("restart", resolve));
    await mlx.restart();
    assert.ok((await restarted).reloaded.includes(description.model), "reloaded with its adapter after a restart");
    assert.ok((await mlx.status()).models.some((m) => m.model === description.model && m.adapter === "vault"));

    const fused = await mlx.fuse({ model: base, adapter: "vault", name: "demo-learner-vault", overwrite: true });
    assert.equal(fused.model, "demo-learner-vault");
    assert.match(await ask(mlx, fused.model), /7421/, "the fused model knows it too");
    await mlx.models.delete(fused.model, { force: true });

    const refused = await mlx.models.deleteAdapter("vault").then(() => assert.fail("a loaded adapter is kept"), (e: unknown) => e);
    assert.ok(refused instanceof RpcError && refused.code === ErrorCode.InvalidParams, String(refused));
    const deleted = await mlx.models.deleteAdapter("vault", { force: true });
    assert.equal(deleted.unloaded, true);
    assert.ok(!(await mlx.models.adapters()).some((a) => a.name === "vault"));
    assert.ok(!mlx.trackedModels.includes(`${base}+vault`));
  });

  test("a dataset error is -32602 with its line, before any training", async () => {
    const broken = writeDataset(data, "broken", [record, "{not json", record, record], [record]);
    const progress: FinetuneProgress[] = [];
    const error = await mlx
      .finetune({ model: base, dataset: broken, name: "broken", ...RECIPE }, { onProgress: (p) => progress.push(p) })
      .then(() => assert.fail("a broken dataset must be refused"), (e: unknown) => e);
    assert.ok(error instanceof RpcError && error.code === ErrorCode.InvalidParams, String(error));
    assert.equal(error.data.line, 2);
    assert.match(String(error.data.file), /train\.jsonl$/);
    assert.equal(typeof error.data.reason, "string");
    assert.match(error.rawMessage, /line 2/);
    assert.ok(!progress.some((p) => p.phase === "train"), "no training started");
    assert.ok(!(await mlx.models.adapters()).some((a) => a.name === "broken"));
  });

  // Last: the sidecar finishes a cancelled run after the client has moved on (one run at a time).
  test("aborting a run rejects with AbortError and leaves no adapter", async () => {
    const controller = new AbortController();
    let trained = 0;
    const run = mlx.finetune(
      { model: base, dataset: vault, name: "vault-aborted", ...RECIPE, iterations: 100_000 },
      {
        signal: controller.signal,
        onProgress: (p) => {
          if (p.trainLoss === undefined) return; // the first report of a training step (not the evaluation at 0)
          trained = p.iteration ?? 0;
          controller.abort("enough");
        },
      },
    );
    await assert.rejects(run, (error: unknown) => error instanceof AbortError && error.reason === "enough");
    assert.ok(trained > 0, "aborted mid-run");
    // The sidecar stops the trainer, then removes the run's folder: after that, nothing is left.
    await waitFor(() => !existsSync(join(modelsDir, "adapters", ".runs", "vault-aborted")), 30_000, "the run's folder to go");
    assert.ok(!existsSync(join(modelsDir, "adapters", "vault-aborted")));
    assert.ok(!(await mlx.models.adapters()).some((a) => a.name === "vault-aborted"));
  });
});

/**
 * Profiles from the client's side (README "Profiles"): `mlx.profiles` lists, reads, saves and
 * deletes the TOML files in `profilesDir` (LOCALMLX_PROFILES_DIR, a temporary directory here, so
 * the run's models dir stays clean); a profile's name works as a model's, with its defaults and
 * system prompt; `model: "auto"` says which profile served and why; the Wooster plugin's
 * `intelligent_route` routes through `auto` when the sidecar has profiles, and `switch_model`
 * takes a profile's name.
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ErrorCode, RpcError, SettingsError, type LocalMLX, type RestartInfo } from "../src/index";
import { profilesDirEnv } from "../src/settings";
import { readSettings } from "../wooster/config";
import { LocalMLXService } from "../wooster/service";
import { createTools } from "../wooster/tools";
import { messages, modelsDir, python, startClient } from "./helpers";

const T = { timeout: 60_000 };
const TERSE = { model: "demo", system: "Answer in one word.", defaults: { maxTokens: 3, temperature: 0 }, tasks: ["chat" as const] };
const CODER = { model: "demo", defaults: { maxTokens: 5, temperature: 0 }, tasks: ["code" as const] };

test("profilesDir is LOCALMLX_PROFILES_DIR for the sidecar; an empty one is an error naming the variable", () => {
  assert.deepEqual(profilesDirEnv(), {});
  assert.deepEqual(profilesDirEnv(" /a dir/profiles "), { LOCALMLX_PROFILES_DIR: "/a dir/profiles" });
  assert.throws(() => profilesDirEnv("  "), (e: unknown) => e instanceof SettingsError && e.variable === "LOCALMLX_PROFILES_DIR");
});

describe("profiles through the client", T, () => {
  const profilesDir = mkdtempSync(join(tmpdir(), "localmlx-profiles-"));
  let mlx: LocalMLX;

  before(async () => {
    // No model loaded at start: the first one loads through "auto", to be reloaded after a restart.
    mlx = await startClient({ model: undefined, profilesDir });
  });
  after(async () => {
    await mlx?.close();
    rmSync(profilesDir, { recursive: true, force: true });
  });

  test("save, list, get and delete: human-editable TOML in profilesDir", async () => {
    const saved = await mlx.profiles.save("terse", TERSE);
    assert.equal(saved.path, join(profilesDir, "terse.toml"));
    assert.deepEqual([saved.model, saved.system, saved.defaults, saved.tasks], [TERSE.model, TERSE.system, TERSE.defaults, TERSE.tasks]);
    assert.match(readFileSync(saved.path, "utf8"), /^model = "demo"$/m);
    await mlx.profiles.save("coder", CODER);
    const listed = await mlx.profiles.list();
    assert.deepEqual([listed.profiles.map((p) => p.name), listed.errors], [["coder", "terse"], []]);
    assert.deepEqual(await mlx.profiles.get("terse"), saved);

    await assert.rejects(mlx.profiles.save("terse", { model: "demo" }, { overwrite: false }), (e: unknown) => e instanceof RpcError && e.code === ErrorCode.InvalidParams);
    await assert.rejects(mlx.profiles.save("auto", { model: "demo" }), (e: unknown) => e instanceof RpcError && e.code === ErrorCode.InvalidParams);
    await mlx.profiles.save("gone", { model: "demo" });
    assert.deepEqual(await mlx.profiles.delete("gone"), { name: "gone", deleted: true });
    assert.equal(existsSync(join(profilesDir, "gone.toml")), false);
    assert.deepEqual(await mlx.profiles.delete("gone"), { name: "gone", deleted: false });
    await assert.rejects(mlx.profiles.get("gone"), (e: unknown) => e instanceof RpcError && e.code === ErrorCode.ModelNotFound);
  });

  test("model auto says which profile served and why, and that profile is reloaded after a restart", async () => {
    const code = await mlx.chat({ model: "auto", messages: [{ role: "user", content: "Fix the bug:\n```js\nlet x = 1\n```" }], cache: false });
    assert.equal(code.profile, "coder");
    assert.deepEqual([code.routedBy?.profile, code.routedBy?.task, code.routedBy?.taskFrom], ["coder", "code", "classified"]);
    assert.equal(code.usage.completionTokens, 5); // coder's maxTokens
    const stated = await mlx.chat({ model: "auto", task: "chat", messages, cache: false });
    assert.deepEqual([stated.profile, stated.routedBy?.taskFrom, stated.usage.completionTokens], ["terse", "stated", 3]);
    assert.deepEqual(mlx.trackedModels, ["demo"]);
    const restarted = new Promise<RestartInfo>((resolve) => mlx.once("restart", resolve));
    await mlx.restart();
    const info = await restarted;
    assert.deepEqual([info.reloaded, info.failed], [["demo"], []]); // by the profile "auto" chose, never by "auto"
  });

  test("a profile's name works as a model's: its defaults and system prompt, under the request's own", async () => {
    const plain = await mlx.chat({ model: "demo", messages, maxTokens: 3, temperature: 0, cache: false });
    const terse = await mlx.chat({ model: "terse", messages, cache: false });
    assert.deepEqual([terse.profile, terse.model, terse.routedBy], ["terse", "demo", undefined]);
    assert.equal(terse.usage.completionTokens, 3); // the profile's maxTokens
    assert.ok(terse.usage.promptTokens > plain.usage.promptTokens, "its system prompt went first");
    assert.equal((await mlx.chat({ model: "terse", messages, maxTokens: 4, cache: false })).usage.completionTokens, 4);
    const generated = await mlx.generate({ model: "coder", prompt: "Once upon a time", cache: false });
    assert.deepEqual([generated.profile, generated.usage.completionTokens], ["coder", 5]);
    assert.equal((await mlx.models.load("terse")).model, "demo");
    await assert.rejects(mlx.chat({ model: "no-such-profile", messages }).result, (e: unknown) => e instanceof RpcError && e.code === ErrorCode.ModelNotFound);
  });
});

describe("the Wooster plugin with profiles", T, () => {
  const profilesDir = mkdtempSync(join(tmpdir(), "localmlx-plugin-profiles-"));
  let service: LocalMLXService;
  const logs: string[] = [];

  before(async () => {
    const env = { LOCALMLX_PYTHON: python, LOCALMLX_MODELS_DIR: modelsDir, LOCALMLX_PROFILES_DIR: profilesDir, LOCALMLX_MAX_TOKENS: "8" };
    service = new LocalMLXService(readSettings(undefined, env), (level, message) => logs.push(`${level} ${message}`));
    const mlx = await service.mlx();
    await mlx.request("profiles/save", { name: "terse", profile: TERSE });
    await mlx.request("profiles/save", { name: "coder", profile: CODER });
  });
  after(async () => {
    await service?.dispose();
    rmSync(profilesDir, { recursive: true, force: true });
  });

  const run = async (tool: string, input: string): Promise<string> => {
    const found = createTools(service, () => undefined).find((t) => t.name === tool)!;
    return (await found.invoke(input)) as string;
  };

  test("intelligent_route answers through model auto with its task, and says which profile served", async () => {
    const coded = await run("intelligent_route", JSON.stringify({ prompt: "Write a function that adds two numbers", task: "coding" }));
    assert.match(coded, /\[served by local profile coder \(model demo\): routine work[^\]]*; code \(stated\): coder scores highest/);
    const chatted = await run("intelligent_route", "Tell me about the sea.");
    assert.match(chatted, /\[served by local profile terse \(model demo\): [^\]]*chat \(classified\): terse/);
    const named = await run("intelligent_route", JSON.stringify({ prompt: "Tell me about the sea.", model: "demo" }));
    assert.match(named, /\[served by local model demo: /); // a model asked for is used as it is
  });

  test("switch_model takes a profile's name, and the tools then run through that profile", async () => {
    assert.match(await run("switch_model", "terse"), /^Active model is now profile terse \(model demo\)/);
    assert.equal(service.model, "terse");
    const answer = await service.chat([{ role: "user", content: "Hello there." }]);
    assert.deepEqual([answer.profile, answer.usage?.completionTokens], ["terse", 3]);
    assert.match(await run("list_local_models", ""), /Profiles \(switch_model takes their names too; active: terse\): coder, terse/);
    assert.match(await run("switch_model", "demo"), /^Active model is now demo \(was terse\)/);
  });
});

/**
 * The TypeScript side's settings (src/settings.ts): every variable in the table survives the trip
 * text → value → text → value, through the environment and through Wooster's
 * `config.plugins.localMLX`; a value that does not parse is an error naming the variable; the
 * variables both sides read parse the same on each side (the real sidecar's parser, run in Python);
 * and no `LOCALMLX_*` variable is read in the sources outside the table.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { SETTINGS, SettingsError, parseBool, readSetting, type Setting, type SettingName } from "../src/index";
import { readSettings, type LocalMLXPluginSettings } from "../wooster/config";
import { packageRoot, python, repositoryRoot } from "./helpers";

const names = Object.keys(SETTINGS) as SettingName[];
const settingOf = (name: SettingName): Setting<unknown> => SETTINGS[name] as Setting<unknown>;

/** The plugin's field for a setting, as `readSettings` returns it, when a value goes in. */
const PLUGIN_FIELD: Partial<Record<SettingName, (value: unknown) => unknown>> = {
  toolsEnabled: (v) => v,
  defaultModel: (v) => v,
  visionModel: (v) => v,
  maxTokens: (v) => v,
  temperature: (v) => v,
  fallbackToOpenAI: (v) => v,
  autoStartServer: (v) => v,
  serverUrl: (v) => v,
  serveTiers: (v) => v,
  modelsDir: (v) => v,
  autoDownload: (v) => v,
  quantization: (v) => v,
  // The plugin's own spellings, as the sidecar reads them.
  offloadInactive: (v) => (v === true ? "5m" : v === false ? "-1" : v),
  preloadModels: (v) => (v === true ? ["default"] : v === false ? [] : v),
  streamResponses: (v) => v,
  enableCache: (v) => v,
  draftModels: (v) => v,
  profilesDir: (v) => v,
  python: (v) => v,
  hostfile: (v) => v,
  distributedMode: (v) => v,
  distributedBackend: (v) => v,
  distributedLauncher: (v) => v,
  distributedAllowPublic: (v) => v,
  distributedTimeout: (v) => v,
};

/** What the real sidecar makes of each text (`settings_from_env`), or "error" when it refuses it. */
function sidecarReads(cases: Array<[variable: string, text: string]>): unknown[] {
  const code = [
    "import json, sys",
    "from sidecar.settings import settings_from_env",
    "out = []",
    "for env, text in json.loads(sys.argv[1]):",
    "    try:",
    "        value = getattr(settings_from_env({env: text}), env.removeprefix('LOCALMLX_').lower())",
    "        if env == 'LOCALMLX_DRAFT_MODELS':",
    "            value = [list(pair) for pair in value]  # (target, draft) pairs, as the client's entries",
    "        out.append(value if isinstance(value, (bool, int, float, str, list)) else str(value))",
    "    except SystemExit:",
    "        out.append('error')",
    "print(json.dumps(out, allow_nan=True))",
  ].join("\n");
  const run = spawnSync(python, ["-c", code, JSON.stringify(cases)], { cwd: repositoryRoot, encoding: "utf8" });
  assert.equal(run.status, 0, run.stderr);
  return JSON.parse(run.stdout.replace(/(-?Infinity|NaN)/g, '"$1"')) as unknown[];
}

/** What the TypeScript side makes of the same text, in the same terms. */
function clientReads(name: SettingName, text: string): unknown {
  try {
    const value = readSetting({ [settingOf(name).env]: text }, name);
    if (name === "draftModels") return Object.entries(value ?? {});
    return typeof value === "number" && !Number.isFinite(value) ? String(value) : value;
  } catch (error) {
    assert.ok(error instanceof SettingsError);
    return "error";
  }
}

describe("settings", () => {
  test("every setting round-trips through its text and the environment, and is its default when unset or empty", () => {
    for (const name of names) {
      const setting = settingOf(name);
      assert.ok(setting.examples.length > 0, `${name} has examples`);
      for (const value of setting.examples) {
        const text = setting.format(value);
        assert.deepEqual(setting.parse(text), value, `${setting.env}: ${JSON.stringify(value)} → ${JSON.stringify(text)}`);
        assert.deepEqual(readSetting({ [setting.env]: text }, name), value, `${setting.env}=${text} from the environment`);
        assert.deepEqual(readSetting({ [setting.env]: ` ${text} ` }, name), value, `${setting.env}=${text} with spaces around`);
      }
      assert.equal(readSetting({}, name), setting.default, `${setting.env} unset`);
      assert.equal(readSetting({ [setting.env]: " " }, name), setting.default, `${setting.env} empty`);
    }
  });

  test("the plugin reads every one of its settings from Wooster's config too, and the environment wins", () => {
    const plugin = Object.keys(PLUGIN_FIELD) as SettingName[];
    for (const name of plugin) {
      const setting = settingOf(name);
      for (const value of setting.examples) {
        const fromConfig = readSettings({ plugins: { localMLX: { [name]: value } } }, {});
        const expected = PLUGIN_FIELD[name]!(value);
        assert.deepEqual(fromConfig[name as keyof LocalMLXPluginSettings], expected, `config.plugins.localMLX.${name} = ${JSON.stringify(value)}`);
        const fromEnv = readSettings(undefined, { [setting.env]: setting.format(value) });
        assert.deepEqual(fromEnv[name as keyof LocalMLXPluginSettings], expected, `${setting.env}=${setting.format(value)}`);
      }
    }
    // Every field of the plugin's settings comes from the table (sidecarEnv is built from them).
    const fields = Object.keys(readSettings(undefined, {})).filter((field) => field !== "sidecarEnv");
    assert.deepEqual(fields.sort(), plugin.sort());
    // The environment wins over the config.
    assert.equal(readSettings({ plugins: { localMLX: { maxTokens: 64 } } }, { LOCALMLX_MAX_TOKENS: "32" }).maxTokens, 32);
  });

  test("the sidecar's boolean rule; anything else is an error naming the variable", () => {
    for (const text of ["1", "true", "TRUE", "Yes", "on"]) assert.equal(parseBool(text), true, text);
    for (const text of ["0", "false", "No", "OFF", ""]) assert.equal(parseBool(text), false, text);
    for (const name of names.filter((n) => typeof settingOf(n).examples[0] === "boolean" && settingOf(n).examples.every((e) => typeof e === "boolean"))) {
      const variable = settingOf(name).env;
      assert.throws(
        () => readSetting({ [variable]: "maybe" }, name),
        (error: unknown) => error instanceof SettingsError && error.variable === variable && error.message.includes(`${variable}="maybe"`),
      );
    }
    // The plugin does not load over one: Wooster logs the error.
    assert.throws(() => readSettings(undefined, { TOOLS_LOCALMLX_ENABLED: "sometimes" }), /TOOLS_LOCALMLX_ENABLED="sometimes": not a boolean/);
    assert.throws(() => readSettings(undefined, { LOCALMLX_MAX_TOKENS: "not a number" }), /LOCALMLX_MAX_TOKENS="not a number": not an integer/);
  });

  test("the variables both sides read parse the same on each side (the sidecar's own parser)", () => {
    const texts: Partial<Record<SettingName, string[]>> = {
      autoDownload: ["1", "true", "TRUE", " yes ", "on", "0", "false", "No", "off", "maybe", "2", "tru"],
      enableCache: ["on", "off", "y"],
      maxTokens: ["24", " 24 ", "+5", "-3", "1_000", "0", "24.0", "2e3", "abc", "1__0", "_1"],
      temperature: ["0.2", " 0.7 ", "1e-1", ".5", "5.", "-0.5", "1_0.5", "1e1_0", "abc", "0x10", "1.2.3", "inf", "-Infinity", "nan", "1_"],
      defaultModel: ["demo", "mlx-community/Qwen2.5-3B-Instruct-4bit"],
      distributedMode: ["pipeline", "Tensor", " TENSOR ", "pipe", "data"],
      distributedBackend: ["ring", "JACCL", " any ", "tcp", "mpi"],
      distributedAllowPublic: ["true", "off", "maybe"],
      distributedTimeout: ["5", " 0.5 ", "1e1", "3_0", "abc", "5s"],
      distributedLauncher: ["ssh -o BatchMode=yes {ssh}"],
      profilesDir: ["/tmp/profiles", "relative/profiles", "/a path/with spaces"],
      draftModels: ["demo=demo", " big = small ,, demo=demo ", "a=b=c", ",", "big", "big=", "=small", "mlx-community/A-8B=mlx-community/A-1B"],
    };
    const cases = Object.entries(texts).flatMap(([name, list]) => list.map((text) => [name as SettingName, text] as const));
    const sidecar = sidecarReads(cases.map(([name, text]) => [settingOf(name).env, text]));
    cases.forEach(([name, text], i) => {
      assert.deepEqual(clientReads(name, text), sidecar[i], `${settingOf(name).env}=${JSON.stringify(text)}`);
    });
  });

  test("what the plugin hands the sidecar in its own spelling, the sidecar reads as meant", () => {
    const offload: Array<[string, unknown]> = [["true", 300], ["yes", 300], ["false", -1], ["0", -1], ["10m", 600], ["1h30m", 5400], ["90", 90], ["2.5", 2.5], ["-1", -1]];
    const sent = offload.map(([text]) => readSettings(undefined, { LOCALMLX_OFFLOAD_INACTIVE: text }).sidecarEnv.LOCALMLX_OFFLOAD_INACTIVE!);
    const preload = readSettings(undefined, { LOCALMLX_PRELOAD_MODELS: "true", LOCALMLX_DEFAULT_MODEL: "demo" });
    const read = sidecarReads([...sent.map((text) => ["LOCALMLX_OFFLOAD_INACTIVE", text] as [string, string]), ["LOCALMLX_PRELOAD_MODELS", preload.sidecarEnv.LOCALMLX_PRELOAD_MODELS!]]);
    assert.deepEqual(read, [...offload.map(([, seconds]) => seconds), "()"]);
    assert.deepEqual(preload.preloadModels, ["demo"], "the plugin preloads, in the background");
    // What the plugin refuses, the sidecar would have refused too.
    for (const text of ["abc", "-2", "1e3", "5x"]) {
      assert.throws(() => readSettings(undefined, { LOCALMLX_OFFLOAD_INACTIVE: text }), { name: "SettingsError" }, text);
    }
    assert.deepEqual(sidecarReads(["abc", "-2", "1e3", "5x"].map((text) => ["LOCALMLX_OFFLOAD_INACTIVE", text])), ["error", "error", "error", "error"]);
  });

  test("no LOCALMLX_* variable is read outside the table: the rest are the sidecar's, passed on as written", () => {
    const sidecarVariables = new Set(readFileSync(join(repositoryRoot, "sidecar", "settings.py"), "utf8").match(/LOCALMLX_[A-Z_]+/g));
    const tableVariables = new Set(names.map((name) => settingOf(name).env));
    // Wooster's own settings, which the readiness checks describe (Wooster reads them).
    const woosters = new Set(["OPENAI_MODEL_NAME", "OPENAI_EMBEDDING_MODEL_NAME"]);
    const sources = ["src", "src/openai", "src/service", "wooster"].flatMap((dir) =>
      readdirSync(join(packageRoot, dir)).filter((file) => file.endsWith(".ts") && file !== "protocol.ts").map((file) => join(packageRoot, dir, file)),
    );
    const outside: string[] = [];
    for (const file of sources) {
      for (const [, variable] of readFileSync(file, "utf8").matchAll(/\benv(?:\.|\[")((?:LOCALMLX|OPENAI|TOOLS)_[A-Z_]+)/g)) {
        // A variable of the table is read through readSetting (its parser, its default), never as raw text.
        if (tableVariables.has(variable!)) outside.push(`${file}: reads ${variable} as raw text`);
        else if (!sidecarVariables.has(variable!) && !woosters.has(variable!)) outside.push(`${file}: ${variable} is in no table`);
      }
    }
    assert.deepEqual(outside, [], "every variable read is in src/settings.ts (through readSetting), or the sidecar's");
  });
});

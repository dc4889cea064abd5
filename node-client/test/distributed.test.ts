/**
 * One model over several machines, from the client's side (README "Several Macs"): the
 * `LOCALMLX_HOSTFILE` and `LOCALMLX_DISTRIBUTED_*` settings reach the real sidecar's environment
 * from the client's `distributed` option, from `env`, and from the Wooster plugin's settings; a
 * sidecar that refuses to start (a bad setting, a group that cannot form) is a SidecarStartError
 * carrying its own `localmlx: ` words, naming the host; -32019 (a rank lost) is a failure of the
 * whole sidecar, not of the request. No group is formed here: the groups themselves are tested on
 * the Python side (tests/test_netns.py, network namespaces).
 */
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import {
  ErrorCode,
  LocalMLX,
  RpcError,
  SettingsError,
  SidecarStartError,
  distributedEnv,
  isSidecarDown,
  toOpenAIError,
  type LocalMLXOptions,
} from "../src/index";
import { readSettings } from "../wooster/config";
import { modelsDir, processGone, python, waitFor } from "./helpers";

const T = { timeout: 120_000 };
const onLinux = process.platform === "linux";
const scratch = mkdtempSync(join(tmpdir(), "localmlx-distributed-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** A hostfile in mlx.launch's format: this machine (rank 0, loopback), then `others`. */
function hostfile(name: string, others: Array<{ ssh: string; ips: string[] }>): string {
  const path = join(scratch, name);
  writeFileSync(path, JSON.stringify([{ ssh: "localhost", ips: ["127.0.0.1"] }, ...others]));
  return path;
}

/** The environment the process `pid` started with (Linux: /proc/<pid>/environ). */
function environmentOf(pid: number): Record<string, string> {
  const entries = readFileSync(`/proc/${pid}/environ`, "latin1").split("\0").filter(Boolean);
  return Object.fromEntries(entries.map((entry) => [entry.slice(0, entry.indexOf("=")), entry.slice(entry.indexOf("=") + 1)]));
}

/** Processes whose command line mentions `text` (a follower's launcher, say). */
function processesMentioning(text: string): number[] {
  const found: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, "latin1").includes(text)) found.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

/** The error `LocalMLX.start(options)` fails with (it must fail). */
async function startFailure(options: LocalMLXOptions): Promise<SidecarStartError> {
  const error = await LocalMLX.start({ startTimeoutMs: 90_000, ...options }).then(
    async (mlx) => {
      await mlx.close();
      return assert.fail("the start should fail");
    },
    (e: unknown) => e,
  );
  assert.ok(error instanceof SidecarStartError, String(error));
  return error;
}

const DISTRIBUTED_ENV = {
  LOCALMLX_DISTRIBUTED_MODE: "pipeline",
  LOCALMLX_DISTRIBUTED_BACKEND: "any",
  LOCALMLX_DISTRIBUTED_LAUNCHER: "ssh -o BatchMode=yes -i /keys/id {ssh}",
  LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC: "true",
  LOCALMLX_DISTRIBUTED_TIMEOUT: "7.5",
};

describe("distributed settings reach the sidecar", () => {
  // Everything but the hostfile: without one the sidecar serves alone, so it starts here. The
  // hostfile's own trip is proven below, by the start errors that only a hostfile can cause.
  test("the client's `distributed` option, over `env`", { ...T, skip: !onLinux && "reads /proc" }, async () => {
    const mlx = await LocalMLX.start({
      python,
      env: { LOCALMLX_MODELS_DIR: modelsDir, LOCALMLX_DISTRIBUTED_MODE: "tensor", LOCALMLX_DISTRIBUTED_TIMEOUT: "2" },
      distributed: { mode: "pipeline", backend: "any", launcher: DISTRIBUTED_ENV.LOCALMLX_DISTRIBUTED_LAUNCHER, allowPublic: true, timeoutSeconds: 7.5 },
    });
    try {
      const env = environmentOf(mlx.pid!);
      for (const [variable, value] of Object.entries(DISTRIBUTED_ENV)) assert.equal(env[variable], value, variable);
      assert.equal(env.LOCALMLX_HOSTFILE, undefined);
    } finally {
      await mlx.close();
    }
  });

  test("the Wooster plugin's settings, from the environment and from config.plugins.localMLX", { ...T, skip: !onLinux && "reads /proc" }, async () => {
    const config = { plugins: { localMLX: { distributedMode: "pipeline", distributedAllowPublic: true, distributedTimeout: 7.5 } } };
    const settings = readSettings(config, {
      LOCALMLX_MODELS_DIR: modelsDir,
      LOCALMLX_DISTRIBUTED_BACKEND: "any",
      LOCALMLX_DISTRIBUTED_LAUNCHER: DISTRIBUTED_ENV.LOCALMLX_DISTRIBUTED_LAUNCHER,
    });
    assert.equal(settings.distributedMode, "pipeline");
    assert.equal(settings.distributedBackend, "any");
    assert.equal(settings.distributedAllowPublic, true);
    assert.equal(settings.distributedTimeout, 7.5);
    assert.equal(settings.hostfile, undefined);
    // The plugin's LocalMLXService starts its client with exactly this environment.
    const mlx = await LocalMLX.start({ python, env: settings.sidecarEnv });
    try {
      const env = environmentOf(mlx.pid!);
      for (const [variable, value] of Object.entries(DISTRIBUTED_ENV)) assert.equal(env[variable], value, variable);
    } finally {
      await mlx.close();
    }
    assert.throws(() => readSettings(undefined, { LOCALMLX_DISTRIBUTED_MODE: "data" }), /LOCALMLX_DISTRIBUTED_MODE="data": expected pipeline or tensor/);
  });

  test("a bad `distributed` value is a SettingsError naming the variable, before anything is spawned", () => {
    assert.deepEqual(distributedEnv({ hostfile: "/h.json", timeoutSeconds: 3 }), { LOCALMLX_HOSTFILE: "/h.json", LOCALMLX_DISTRIBUTED_TIMEOUT: "3" });
    const bad: Array<[LocalMLXOptions["distributed"], string]> = [
      [{ mode: "data" as "tensor" }, "LOCALMLX_DISTRIBUTED_MODE"],
      [{ backend: "mpi" as "ring" }, "LOCALMLX_DISTRIBUTED_BACKEND"],
      [{ timeoutSeconds: 0 }, "LOCALMLX_DISTRIBUTED_TIMEOUT"],
      [{ timeoutSeconds: Number.NaN }, "LOCALMLX_DISTRIBUTED_TIMEOUT"],
    ];
    for (const [distributed, variable] of bad) {
      assert.throws(() => distributedEnv(distributed), (e: unknown) => e instanceof SettingsError && e.variable === variable, variable);
    }
  });
});

describe("a sidecar that refuses to start says why", () => {
  test("a setting it cannot read: its `localmlx: ` line is in the start error, not the advice to install it", T, async () => {
    // No `python`: every way of finding the sidecar is looked at, and the first that runs refuses.
    const error = await startFailure({ env: { LOCALMLX_MODELS_DIR: modelsDir, LOCALMLX_MAX_TOKENS: "many" } });
    assert.match(error.details.refusal ?? "", /^bad LOCALMLX_MAX_TOKENS='many': /);
    assert.match(error.summary, /exited with code 1 before answering initialize: bad LOCALMLX_MAX_TOKENS='many'/);
    assert.doesNotMatch(error.message, /npx @localmlx\/client setup/);
  });

  // These two need the sidecar's group support (sidecar/distributed): it refuses with
  // `localmlx: cannot form the group: …` and exits with code 4.
  test("a host that never joins: the error names it within the formation timeout, and no follower is left", { ...T, skip: !onLinux && "reads /proc" }, async () => {
    const unroutable = "10.255.255.1";
    const started = Date.now();
    const error = await startFailure({
      python,
      env: { LOCALMLX_MODELS_DIR: modelsDir },
      distributed: { hostfile: hostfile("unreachable.json", [{ ssh: unroutable, ips: [unroutable] }]), timeoutSeconds: 3 },
    });
    assert.match(error.details.refusal ?? "", /^cannot form the group: /);
    assert.ok(error.summary.includes(unroutable), error.summary);
    assert.equal(error.details.exit?.code, 4);
    assert.ok(Date.now() - started < 60_000, "within max(30 s, 6 timeouts) and a margin");
    assert.ok(processGone(error.details.exit!.pid!));
    await waitFor(() => processesMentioning(unroutable).length === 0, 5_000, "the launcher for the host to end");
  });

  test("a hostfile naming a public address is refused unless LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC=true", T, async () => {
    const error = await startFailure({
      python,
      env: { LOCALMLX_MODELS_DIR: modelsDir },
      distributed: { hostfile: hostfile("public.json", [{ ssh: "far.example", ips: ["8.8.8.8"] }]) },
    });
    assert.ok(error.details.refusal?.includes("8.8.8.8"), error.message);
    assert.match(error.details.refusal!, /LOCALMLX_DISTRIBUTED_ALLOW_PUBLIC=true/);
  });
});

describe("-32019: a rank of the group was lost", () => {
  test("is no retry for the request, but a failure of the whole sidecar (it exits; the next call restarts it)", () => {
    const error = new RpcError({ code: -32019, message: "rank 1 (mini.local, 10.0.0.2) stopped answering", data: { rank: 1, host: "mini.local", reason: "unresponsive" } }, "chat");
    assert.equal(error.code, ErrorCode.RankLost);
    assert.equal(error.codeName, "RankLost");
    assert.equal(error.retryable, false);
    assert.deepEqual(error.data, { rank: 1, host: "mini.local", reason: "unresponsive" });
    assert.equal(isSidecarDown(error), true, "the fallback cools down, LocalBackend restarts");
    const http = toOpenAIError(error);
    assert.equal(http.status, 503);
    assert.equal(http.code, "rank_lost");
  });
});

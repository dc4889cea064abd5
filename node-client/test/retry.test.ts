/**
 * The one retry helper (src/retry.ts) and the one owner of a client (LocalBackend): the backoff
 * doubles to its cap; `retry` tries again only what is retryable, within the deadline, until
 * aborted; a backend that failed to start (a Python that is not there: a real failed spawn) gives
 * * that failure back without starting again while its backoff runs, and stops what it started.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { backoffMs, retry, sleep } from "../src/retry";
import { LocalBackend, RpcError, SidecarStartError, type LocalMLX } from "../src/index";
import { startClient } from "./helpers";

const T = { timeout: 120_000 };
const busy = (): RpcError => new RpcError({ code: -32015, message: "busy" }, "chat");
const invalid = (): RpcError => new RpcError({ code: -32602, message: "bad" }, "chat");

describe("retry", () => {
  test("the backoff doubles from its first wait up to its cap", () => {
    const policy = { initialMs: 100, maxMs: 2_000 };
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((n) => backoffMs(policy, n)), [0, 100, 200, 400, 800, 1600, 2000]);
  });

  test("retries what is retryable until it succeeds; throws anything else at once", async () => {
    let tries = 0;
    const value = await retry(
      async () => {
        if (++tries < 3) throw busy();
        return "done";
      },
      { backoff: { initialMs: 1, maxMs: 2 }, retryable: (e) => e instanceof RpcError && e.retryable },
    );
    assert.equal(value, "done");
    assert.equal(tries, 3);

    tries = 0;
    const error = invalid();
    await assert.rejects(
      retry(
        async () => {
          tries++;
          throw error;
        },
        { backoff: { initialMs: 1, maxMs: 2 }, retryable: (e) => e instanceof RpcError && e.retryable },
      ),
      (e: unknown) => e === error,
    );
    assert.equal(tries, 1);
  });

  test("no wait past the deadline, and none after an abort: the last failure is thrown", async () => {
    let tries = 0;
    await assert.rejects(
      retry(
        async () => {
          tries++;
          throw busy();
        },
        { backoff: { initialMs: 60_000, maxMs: 60_000 }, retryable: () => true, deadline: Date.now() + 1_000 },
      ),
      RpcError,
    );
    assert.equal(tries, 1, "a wait that would end past the deadline is not waited");

    const controller = new AbortController();
    tries = 0;
    const started = Date.now();
    const retrying = retry(
      async () => {
        tries++;
        if (tries === 1) setImmediate(() => controller.abort());
        throw busy();
      },
      { backoff: { initialMs: 60_000, maxMs: 60_000 }, retryable: () => true, signal: controller.signal },
    );
    await assert.rejects(retrying, RpcError);
    assert.equal(tries, 1);
    assert.ok(Date.now() - started < 30_000, "the abort ended the wait");
    await sleep(0, controller.signal); // resolves at once
  });
});

describe("LocalBackend", () => {
  test("after a failed start it gives that failure back while its backoff runs; without one, each acquire tries again", T, async () => {
    const failures: unknown[] = [];
    const backend = new LocalBackend(
      { python: "/nonexistent/python3", startTimeoutMs: 5_000 },
      { startRetry: { initialMs: 60_000, maxMs: 60_000 }, onStartFailure: (error) => failures.push(error) },
    );
    const first = await backend.acquire().then(() => assert.fail("the start should fail"), (e: unknown) => e);
    assert.ok(first instanceof SidecarStartError);
    const again = await backend.acquire().then(() => assert.fail("still failed"), (e: unknown) => e);
    assert.equal(again, first, "the same failure, no second start");
    assert.equal(failures.length, 1);
    assert.equal(backend.status.state, "down");

    const eager = new LocalBackend({ python: "/nonexistent/python3", startTimeoutMs: 5_000 }, { onStartFailure: (error) => failures.push(error) });
    await assert.rejects(eager.acquire(), SidecarStartError);
    await assert.rejects(eager.acquire(), SidecarStartError);
    assert.equal(failures.length, 3, "without a backoff each acquire tries again");
    await Promise.all([backend.close(), eager.close()]);
  });

  test("stop() runs its hooks, closes what it started, and the next acquire starts anew; a given client stays open", T, async () => {
    const started: LocalMLX[] = [];
    const backend = new LocalBackend(() => startClient(), { onStart: (client) => started.push(client) });
    const first = await backend.acquire();
    const order: string[] = [];
    backend.onStop(() => {
      order.push(`hook while ${first.pid === undefined ? "stopped" : "running"}`);
    });
    await backend.stop();
    order.push(`client ${first.pid === undefined ? "stopped" : "running"}`);
    assert.deepEqual(order, ["hook while running", "client stopped"]);
    assert.equal(backend.current, undefined);
    const second = await backend.acquire();
    assert.notEqual(second, first);
    assert.equal(started.length, 2);

    const shared = new LocalBackend(second);
    await shared.close();
    assert.ok(second.pid !== undefined, "a given client is left open");
    await backend.close();
    assert.equal(second.pid, undefined);
  });
});

/**
 * What runs when the host process ends, installed on `process` once, here and nowhere else:
 * `onHostExit` hooks at `exit` (synchronous: signal what still runs), `onHostIdle` hooks each time
 * the event loop drains (`beforeExit`: they may start async work, such as a graceful close,
 * which hosts that never close what they started, like Wooster, rely on).
 */

const exitHooks = new Set<() => void>();
const idleHooks = new Set<() => void>();
let installed = false;

function install(): void {
  if (installed) return;
  installed = true;
  process.once("exit", () => runAll(exitHooks));
  process.on("beforeExit", () => runAll(idleHooks));
}

function runAll(hooks: Set<() => void>): void {
  for (const hook of [...hooks]) {
    try {
      hook();
    } catch {
      // the host is ending anyway; the other hooks still run
    }
  }
}

/** Runs `hook` when the process exits; returns what removes it. */
export function onHostExit(hook: () => void): () => void {
  install();
  exitHooks.add(hook);
  return () => exitHooks.delete(hook);
}

/** Runs `hook` each time the event loop drains (`beforeExit`); returns what removes it. */
export function onHostIdle(hook: () => void): () => void {
  install();
  idleHooks.add(hook);
  return () => idleHooks.delete(hook);
}

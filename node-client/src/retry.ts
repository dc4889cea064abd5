/**
 * Waiting between tries, in one place: the backoff rule (a wait that doubles from `initialMs` up
 * to `maxMs`; no jitter: one host talks to its own sidecar, there is no herd to spread), an
 * abortable sleep, and the loop that retries what is worth retrying. The supervisor's restarts,
 * the fallback's busy retries and the Wooster plugin's start retries all use it.
 */

export interface Backoff {
  /** The wait after the first failure. */
  initialMs: number;
  /** The longest wait. */
  maxMs: number;
}

/** The wait after `failures` failures in a row: 0 for none, then `initialMs`, doubling, at most `maxMs`. */
export function backoffMs(policy: Backoff, failures: number): number {
  if (failures <= 0) return 0;
  return Math.min(policy.initialMs * 2 ** (failures - 1), policy.maxMs);
}

/** Resolves after `ms`, or as soon as `signal` aborts; never rejects. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0 || signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

export interface RetryOptions {
  backoff: Backoff;
  /** Whether a failure is worth another try. */
  retryable(error: unknown): boolean;
  /** No try starts after this time (ms since the epoch): a wait that would end past it is not waited. */
  deadline?: number;
  /** Aborting stops the retries: the last failure is thrown. */
  signal?: AbortSignal;
}

/**
 * Runs `attempt` until it succeeds. A failure that is `retryable` is tried again after the
 * backoff, as long as the wait ends before the deadline and `signal` has not aborted; any other
 * failure, or the last one, is thrown as it is.
 */
export async function retry<T>(attempt: () => Promise<T>, options: RetryOptions): Promise<T> {
  for (let failures = 1; ; failures++) {
    try {
      return await attempt();
    } catch (error) {
      const wait = backoffMs(options.backoff, failures);
      const inTime = options.deadline === undefined || Date.now() + wait < options.deadline;
      if (options.signal?.aborted || !inTime || !options.retryable(error)) throw error;
      await sleep(wait, options.signal);
      if (options.signal?.aborted) throw error;
    }
  }
}

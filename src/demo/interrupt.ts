/**
 * Ctrl-C / SIGTERM during the demo: the first signal aborts the run so it can
 * clean up (remove its agents, stop the embedded server); a second one exits
 * at once.
 *
 * Handlers that others installed (a library's exit hooks that would stop a
 * server and exit the process right away, cutting the cleanup short) are set
 * aside while the demo runs and put back afterwards (the demo stops its
 * embedded server itself).
 */
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
type Signal = (typeof SIGNALS)[number];

export interface InterruptGuard {
  readonly signal: AbortSignal;
  /** The signal received, if any. */
  readonly received: Signal | null;
  /** Restores the handlers that were there before. */
  release(): void;
}

export function guardInterrupts(onSecond: (signal: Signal) => void): InterruptGuard {
  const controller = new AbortController();
  let received: Signal | null = null;
  const saved = new Map<Signal, ((...args: unknown[]) => void)[]>();
  const handler = (signal: Signal): void => {
    if (received !== null) {
      onSecond(signal);
      return;
    }
    received = signal;
    controller.abort(new Error(`interrupted by ${signal}`));
  };
  for (const signal of SIGNALS) {
    saved.set(signal, process.listeners(signal) as ((...args: unknown[]) => void)[]);
    process.removeAllListeners(signal);
    process.on(signal, handler);
  }
  return {
    signal: controller.signal,
    get received() {
      return received;
    },
    release() {
      for (const signal of SIGNALS) {
        process.removeListener(signal, handler);
        for (const listener of saved.get(signal) ?? []) process.on(signal, listener);
      }
    },
  };
}

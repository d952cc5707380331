/** Polls `check` until it returns a truthy value or `timeoutMs` passes (then throws with `what`). */
export async function waitFor<T>(check: () => Promise<T> | T, what: string, timeoutMs = 10_000, everyMs = 25): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A logger that records every call, for asserting what was reported. */
export function recordingLogger(): {
  calls: { level: string; message: string; meta?: Record<string, unknown> }[];
  debug(m: string, meta?: Record<string, unknown>): void;
  info(m: string, meta?: Record<string, unknown>): void;
  warn(m: string, meta?: Record<string, unknown>): void;
  error(m: string, meta?: Record<string, unknown>): void;
} {
  const calls: { level: string; message: string; meta?: Record<string, unknown> }[] = [];
  const at = (level: string) => (message: string, meta?: Record<string, unknown>) => void calls.push({ level, message, meta });
  return { calls, debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') };
}

/**
 * Loggers and hooks that throw must never crash the process or turn a success
 * into a failure: every call into user code goes through these.
 */
import type { Logger } from './logger.ts';

function describe(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

/**
 * Wraps a logger so that a method that throws is contained: the first failure
 * is reported once on stderr (the fallback), later ones are dropped.
 */
export function safeLogger(logger: Logger): Logger {
  let reported = false;
  const wrap = (level: keyof Logger) => (message: string, meta?: Record<string, unknown>): void => {
    try {
      logger[level](message, meta);
    } catch (err) {
      if (reported) return;
      reported = true;
      try {
        process.stderr.write(
          `pg-heartbeat: the logger's ${level}() threw (${describe(err)}) while logging ${JSON.stringify(message)}; ` +
            'further logger failures are not reported\n',
        );
      } catch {
        // stderr itself failed: nothing left to tell
      }
    }
  };
  return { debug: wrap('debug'), info: wrap('info'), warn: wrap('warn'), error: wrap('error') };
}

/**
 * Calls a user hook; a throw (or a rejected promise it returns) is logged as a
 * warning and goes no further.
 */
export function callHook<A>(hook: ((arg: A) => unknown) | undefined, arg: A, name: string, logger: Logger): void {
  if (!hook) return;
  try {
    const result = hook(arg);
    if (result && typeof (result as Promise<unknown>).then === 'function') {
      (result as Promise<unknown>).then(undefined, (err: unknown) => logger.warn(`${name} hook rejected`, { error: err }));
    }
  } catch (err) {
    logger.warn(`${name} hook threw`, { error: err });
  }
}

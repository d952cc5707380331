/**
 * Where pg-heartbeat reports what it does. It calls `logger.<level>(message, meta)`, meta being an
 * object that often carries the failure as `meta.error`. Loggers disagree about that call:
 *
 * - console and winston take `(message, meta)`, but winston's JSON output drops an Error's message
 *   and stack (they are not enumerable);
 * - pino (and bunyan) take `(mergingObject, message)`: called as `(message, meta)` they log the
 *   message and silently drop `meta`, error included.
 *
 * So every `logger` option goes through {@link toLogger}, which recognises pino and winston and
 * adapts them ({@link pinoLogger}, {@link winstonLogger}); anything else with the four methods is
 * used as it is (console included). Call the adapters yourself for a logger that is not recognised,
 * e.g. `pinoLogger(bunyanLogger)`.
 */
export interface Logger {
  debug(message: string, meta?: Record<string, unknown>): void;
  info(message: string, meta?: Record<string, unknown>): void;
  warn(message: string, meta?: Record<string, unknown>): void;
  error(message: string, meta?: Record<string, unknown>): void;
}

const LEVELS = ['debug', 'info', 'warn', 'error'] as const;
type Level = (typeof LEVELS)[number];
type Meta = Record<string, unknown>;

/** A logger whose methods take the fields first and the message second: pino, bunyan. */
export interface ObjectFirstLogger {
  debug(fields: object, message?: string): unknown;
  info(fields: object, message?: string): unknown;
  warn(fields: object, message?: string): unknown;
  error(fields: object, message?: string): unknown;
}

/** A winston logger (or anything taking `(message, meta)` whose output loses Error properties). */
export interface MessageFirstLogger {
  debug(message: string, meta?: object): unknown;
  info(message: string, meta?: object): unknown;
  warn(message: string, meta?: object): unknown;
  error(message: string, meta?: object): unknown;
}

const ADAPTED = Symbol.for('pg-heartbeat.logger');

function mark<T extends Logger>(logger: T): T {
  Object.defineProperty(logger, ADAPTED, { value: true });
  return logger;
}

/** An Error as a plain object: its name, message, code, SQLSTATE, stack and cause survive JSON. */
export function serializeError(err: Error, depth = 0): Record<string, unknown> {
  const out: Record<string, unknown> = { name: err.name, message: err.message };
  for (const key of ['code', 'sqlState', 'field'] as const) {
    const value = (err as unknown as Record<string, unknown>)[key];
    if (value !== undefined) out[key] = value;
  }
  out.stack = err.stack;
  if (err.cause instanceof Error && depth < 3) out.cause = serializeError(err.cause, depth + 1);
  else if (err.cause !== undefined) out.cause = String(err.cause);
  return out;
}

/**
 * pino (or bunyan): `logger.warn(message, meta)` becomes `pino.warn({ ...meta, err }, message)`, the
 * error under pino's standard `err` key (serialised with its message, stack and cause).
 */
export function pinoLogger(target: ObjectFirstLogger): Logger {
  const call = (level: Level) => (message: string, meta?: Meta): void => {
    if (!meta) {
      target[level]({}, message);
      return;
    }
    const { error, ...rest } = meta;
    target[level](error === undefined ? rest : { ...rest, err: error }, message);
  };
  return mark({ debug: call('debug'), info: call('info'), warn: call('warn'), error: call('error') });
}

/** winston: `(message, meta)` as it is, with Errors in meta turned into plain objects so its formats keep them. */
export function winstonLogger(target: MessageFirstLogger): Logger {
  const call = (level: Level) => (message: string, meta?: Meta): void => {
    if (!meta) {
      target[level](message);
      return;
    }
    const fields: Meta = {};
    for (const [key, value] of Object.entries(meta)) fields[key] = value instanceof Error ? serializeError(value) : value;
    target[level](message, fields);
  };
  return mark({ debug: call('debug'), info: call('info'), warn: call('warn'), error: call('error') });
}

const isObject = (x: unknown): x is Record<string | symbol, unknown> => (typeof x === 'object' || typeof x === 'function') && x !== null;

/** pino: `bindings()`, `child()` and a `levels.values` map. */
function isPino(x: Record<string | symbol, unknown>): boolean {
  const levels = x.levels as { values?: unknown } | undefined;
  return typeof x.bindings === 'function' && typeof x.child === 'function' && isObject(levels) && isObject(levels.values);
}

/** winston: `log()`, `add()`, `configure()` and its transports. */
function isWinston(x: Record<string | symbol, unknown>): boolean {
  return typeof x.log === 'function' && typeof x.add === 'function' && typeof x.configure === 'function' && 'transports' in x;
}

/**
 * The Logger to use for `logger` (an option's value): undefined → {@link consoleLogger}; pino →
 * {@link pinoLogger}; winston → {@link winstonLogger}; anything else (console, your own object) as
 * it is, with missing levels as no-ops. Idempotent.
 */
export function toLogger(logger: unknown): Logger {
  if (logger === undefined || logger === null) return consoleLogger;
  if (!isObject(logger)) throw new TypeError('pg-heartbeat: logger must be an object with debug, info, warn and error methods');
  if (logger[ADAPTED]) return logger as unknown as Logger;
  if (isPino(logger)) return pinoLogger(logger as unknown as ObjectFirstLogger);
  if (isWinston(logger)) return winstonLogger(logger as unknown as MessageFirstLogger);
  if (LEVELS.every((level) => typeof logger[level] === 'function')) return logger as unknown as Logger;
  if (!LEVELS.some((level) => typeof logger[level] === 'function')) {
    throw new TypeError('pg-heartbeat: logger must be an object with debug, info, warn and error methods');
  }
  const call = (level: Level) => (message: string, meta?: Meta): void => {
    const fn = logger[level];
    if (typeof fn === 'function') (fn as (m: string, meta?: Meta) => void).call(logger, message, meta);
  };
  return mark({ debug: call('debug'), info: call('info'), warn: call('warn'), error: call('error') });
}

function write(stream: NodeJS.WriteStream, level: string, message: string, meta?: Record<string, unknown>): void {
  const extra = meta && Object.keys(meta).length > 0 ? ` ${JSON.stringify(meta, replacer)}` : '';
  stream.write(`pg-heartbeat ${level}: ${message}${extra}\n`);
}

function replacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? { name: value.name, message: value.message } : value;
}

/** The default: warnings and errors to stderr, nothing else. */
export const consoleLogger: Logger = mark({
  debug() {},
  info() {},
  warn: (message, meta) => write(process.stderr, 'warn', message, meta),
  error: (message, meta) => write(process.stderr, 'error', message, meta),
});

/** A logger that drops everything. */
export const silentLogger: Logger = mark({ debug() {}, info() {}, warn() {}, error() {} });

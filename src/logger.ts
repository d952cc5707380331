/** Where pg-heartbeat reports what it does. Any object with these methods works (pino, winston, console). */
export interface Logger {
  debug(message: string, meta?: Record<string, unknown>): void;
  info(message: string, meta?: Record<string, unknown>): void;
  warn(message: string, meta?: Record<string, unknown>): void;
  error(message: string, meta?: Record<string, unknown>): void;
}

function write(stream: NodeJS.WriteStream, level: string, message: string, meta?: Record<string, unknown>): void {
  const extra = meta && Object.keys(meta).length > 0 ? ` ${JSON.stringify(meta, replacer)}` : '';
  stream.write(`pg-heartbeat ${level}: ${message}${extra}\n`);
}

function replacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? { name: value.name, message: value.message } : value;
}

/** The default: warnings and errors to stderr, nothing else. */
export const consoleLogger: Logger = {
  debug() {},
  info() {},
  warn: (message, meta) => write(process.stderr, 'warn', message, meta),
  error: (message, meta) => write(process.stderr, 'error', message, meta),
};

/** A logger that drops everything. */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };

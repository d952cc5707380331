import type { ParseArgsConfig } from 'node:util';
import { HeartbeatError } from '../errors.ts';

/** What every subcommand gets: its parsed options and the resolved database URL (when it needs one). */
export interface CommandContext {
  values: Record<string, string | boolean | undefined>;
  positionals: string[];
  /** The database URL from --database-url or DATABASE_URL; throws a one-line error when absent or malformed. */
  databaseUrl(): string;
  out: (line: string) => void;
}

/** One `pg-heartbeat <name>` subcommand, in its own module. */
export interface Command {
  name: string;
  summary: string;
  /** Usage text after `pg-heartbeat <name>`, e.g. `[--json]`. */
  usage?: string;
  /** Option descriptions for --help, keyed by option name. */
  help?: Record<string, string>;
  options?: ParseArgsConfig['options'];
  run(ctx: CommandContext): Promise<number | void>;
}

/** A failure the CLI prints as one line, without a stack. */
export class UsageError extends HeartbeatError {
  override readonly name = 'UsageError';

  constructor(message: string) {
    super(message, { code: 'USAGE' });
  }
}

/** Checks that `url` looks like a PostgreSQL connection URL; returns it. */
export function checkDatabaseUrl(url: string | undefined): string {
  if (!url) throw new UsageError('no database: pass --database-url or set DATABASE_URL');
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new UsageError(`bad database URL ${JSON.stringify(redact(url))}: expected postgresql://user@host:port/database`);
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    throw new UsageError(`bad database URL: scheme ${parsed.protocol} is not postgres: or postgresql:`);
  }
  return url;
}

/** The URL without its password, for messages. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return url.replace(/:[^:@/]*@/, ':***@');
  }
}

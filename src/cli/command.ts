import type { ParseArgsConfig } from 'node:util';
import pg from 'pg';
import type { ConnectionOptions } from '../connection.ts';
import { HeartbeatError } from '../errors.ts';

/** What every subcommand gets: its parsed options and the resolved database URL (when it needs one). */
export interface CommandContext {
  values: Record<string, string | boolean | undefined>;
  positionals: string[];
  /** The database URL from --database-url or DATABASE_URL; throws a one-line error when absent or malformed. */
  databaseUrl(): string;
  /**
   * The database from --database-url, DATABASE_URL or, without either, node-postgres's PG* variables
   * (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE); throws a one-line error when there is none.
   */
  database(): DatabaseTarget;
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

/** The variables node-postgres reads when it is given no connection string (as libpq does). */
export const PG_ENV_VARS = ['PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE'] as const;

/** Where a command connects: a URL, or node-postgres's PG* environment variables. */
export interface DatabaseTarget {
  /** The URL when one was given (--database-url, DATABASE_URL). */
  url: string | undefined;
  /** For pg.Client / pg.Pool: the URL, or nothing (node-postgres then reads PGHOST, PGPORT, ...). */
  config: pg.ClientConfig;
  /** How messages name it, without a password. */
  shown: string;
}

/** The database to use: `given` (a URL) when set, else the PG* variables of `env` when any is set, else a one-line error. */
export function resolveDatabase(given: string | undefined, env: NodeJS.ProcessEnv = process.env): DatabaseTarget {
  if (given) {
    const url = checkDatabaseUrl(given);
    return { url, config: { connectionString: url }, shown: redact(url) };
  }
  if (!PG_ENV_VARS.some((v) => env[v])) {
    throw new UsageError(`no database: pass --database-url, set DATABASE_URL, or set node-postgres's variables (${PG_ENV_VARS.join(', ')})`);
  }
  const user = env.PGUSER || env.USER || 'postgres';
  const shown = `postgresql://${user}@${env.PGHOST || 'localhost'}:${env.PGPORT || 5432}/${env.PGDATABASE || user} (from the PG* variables)`;
  return { url: undefined, config: {}, shown };
}

/**
 * Runs `fn` with a pool on `target` (ended afterwards) as `{ pool }` for the library's functions.
 * A pool without a connection string is how node-postgres reads the PG* variables.
 */
export async function withPool<T>(target: DatabaseTarget, applicationName: string, fn: (connection: ConnectionOptions & { pool: pg.Pool }) => Promise<T>, max = 2): Promise<T> {
  const pool = new pg.Pool({ ...target.config, max, application_name: applicationName, connectionTimeoutMillis: 10_000 });
  pool.on('error', () => {});
  try {
    return await fn({ pool });
  } finally {
    await pool.end().catch(() => {});
  }
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

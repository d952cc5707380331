import pg from 'pg';
import type { Logger } from './logger.ts';

/** How pg-heartbeat reaches the database: your pool (you end it) or a connection string (it owns the pool). */
export type ConnectionOptions = { pool: pg.Pool } | { connectionString: string; max?: number };

export interface ResolvedPool {
  pool: pg.Pool;
  /** True when pg-heartbeat created the pool and must end it. */
  owned: boolean;
}

/** Returns the pool to use, creating one (with an 'error' listener, so an idle client's failure never crashes the process). */
export function resolvePool(conn: ConnectionOptions, logger: Logger, applicationName: string): ResolvedPool {
  if (conn && 'pool' in conn && conn.pool) return { pool: conn.pool, owned: false };
  if (!conn || !('connectionString' in conn) || typeof conn.connectionString !== 'string') {
    throw new TypeError('pg-heartbeat: pass { pool } or { connectionString }');
  }
  const pool = new pg.Pool({
    connectionString: conn.connectionString,
    max: conn.max ?? 2,
    application_name: applicationName,
    connectionTimeoutMillis: 10_000,
  });
  pool.on('error', (err) => logger.warn('idle database connection failed', { error: err }));
  return { pool, owned: true };
}

/**
 * Checks out a client for one operation. While it is checked out an 'error'
 * listener is attached (pg emits 'error' on a checked-out client whose
 * connection dies between queries; unheard, that would crash the process), and
 * a client whose operation failed is destroyed rather than returned to the pool.
 */
export async function withClient<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let broken: unknown;
  const onError = (err: unknown): void => {
    broken = err;
  };
  client.on('error', onError);
  try {
    const result = await fn(client);
    if (broken !== undefined) throw broken;
    return result;
  } catch (err) {
    broken ??= err;
    throw err;
  } finally {
    client.off('error', onError);
    client.release(broken === undefined ? undefined : broken instanceof Error ? broken : true);
  }
}

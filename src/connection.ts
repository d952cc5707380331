/**
 * How pg-heartbeat reaches PostgreSQL, and the deadline every database
 * operation runs under.
 *
 * A half-open connection (a failover behind a VIP, a NAT or load-balancer idle
 * drop, a frozen proxy) sends no FIN and no RST: a query on it waits forever, and
 * TCP keepalive does not notice while some middlebox still acknowledges. So each
 * operation gets a deadline for the pool checkout and for the work itself; when
 * it passes, the connection's socket is destroyed (never returned to the pool)
 * and the operation fails with a {@link TimeoutError}. Pools that pg-heartbeat
 * creates also use TCP keepalive, which catches a peer that is really gone.
 */
import pg from 'pg';
import { ClosedError, InvalidOptionError, TimeoutError } from './errors.ts';
import type { Logger } from './logger.ts';

/**
 * How pg-heartbeat reaches the database, the same for every function: your pool
 * (you end it), or a connection string (pg-heartbeat creates a pool and ends it).
 * With `{}` node-postgres reads the standard PGHOST, PGPORT, PGUSER, PGPASSWORD and
 * PGDATABASE variables.
 */
export type ConnectionOptions = { pool: pg.Pool } | { connectionString?: string; max?: number };

export interface ResolvedPool {
  pool: pg.Pool;
  /** True when pg-heartbeat created the pool and must end it. */
  owned: boolean;
}

/** Connect timeout and keepalive of the pools pg-heartbeat creates. */
export const POOL_DEFAULTS = {
  connectionTimeoutMillis: 10_000,
  keepAlive: true,
  keepAliveInitialDelayMillis: 10_000,
  idleTimeoutMillis: 30_000,
} as const;

/** Returns the pool to use, creating one (with an 'error' listener, so an idle client's failure never crashes the process). */
export function resolvePool(conn: ConnectionOptions | pg.Pool, logger: Logger, applicationName: string, max = 2): ResolvedPool {
  // a bare pool (the form of earlier versions) still works
  if (isPool(conn)) return { pool: conn, owned: false };
  if (conn && typeof conn === 'object' && 'pool' in conn) {
    if (!isPool(conn.pool)) throw new TypeError('pg-heartbeat: { pool } must be a pg.Pool');
    return { pool: conn.pool, owned: false };
  }
  if (!conn || typeof conn !== 'object') throw new TypeError('pg-heartbeat: pass { pool } or { connectionString }');
  if (conn.connectionString !== undefined && typeof conn.connectionString !== 'string') {
    throw new TypeError('pg-heartbeat: connectionString must be a string');
  }
  const pool = new pg.Pool({
    ...(conn.connectionString === undefined ? {} : { connectionString: conn.connectionString }),
    max: conn.max ?? max,
    application_name: applicationName,
    ...POOL_DEFAULTS,
  });
  pool.on('error', (err) => logger.warn('idle database connection failed', { error: err }));
  return { pool, owned: true };
}

/**
 * The settings of a dedicated LISTEN connection (status-event watchers, the merger's notifications): those of your
 * pool (without its pool-only settings), or the connection string. The application_name is `applicationName`, else
 * the pool's, else `fallbackName`. A pool without its options (another copy of pg) fails with an
 * InvalidOptionError that names `hint` (how to do without LISTEN).
 */
export function listenClientConfig(
  connection: ConnectionOptions | pg.Pool, applicationName: string | undefined, fallbackName: string, hint: string,
): pg.ClientConfig {
  if (isPool(connection) || (connection && typeof connection === 'object' && 'pool' in connection)) {
    const pool = (isPool(connection) ? connection : connection.pool) as pg.Pool & { options?: pg.PoolConfig };
    if (!pool.options || typeof pool.options !== 'object') {
      throw new InvalidOptionError('connection', `is a pool without its options: pass { connectionString }, or ${hint}`);
    }
    const { max: _m, min: _n, idleTimeoutMillis: _i, maxUses: _u, allowExitOnIdle: _a, maxLifetimeSeconds: _l, ...config } = pool.options as pg.PoolConfig & Record<string, unknown>;
    return { ...config, application_name: applicationName ?? config.application_name ?? fallbackName };
  }
  const conn = connection as { connectionString?: unknown } | null;
  if (!conn || typeof conn !== 'object') throw new TypeError('pg-heartbeat: pass { pool } or { connectionString }');
  if (conn.connectionString !== undefined && typeof conn.connectionString !== 'string') throw new TypeError('pg-heartbeat: connectionString must be a string');
  return {
    ...(conn.connectionString === undefined ? {} : { connectionString: conn.connectionString }),
    application_name: applicationName ?? fallbackName,
  };
}

/** A pg.Pool, from this copy of pg or another one (duck-typed). */
export function isPool(x: unknown): x is pg.Pool {
  if (x instanceof pg.Pool) return true;
  const p = x as { connect?: unknown; query?: unknown; end?: unknown; totalCount?: unknown } | null;
  return !!p && typeof p === 'object' && typeof p.connect === 'function' && typeof p.query === 'function'
    && typeof p.end === 'function' && typeof p.totalCount === 'number';
}

const guarded = new WeakSet<object>();
const ignore = (): void => {};

/**
 * Gives every new client of `pool` an 'error' listener of its own. pg-pool hands a new
 * connection out from inside the parse loop of its socket (on ReadyForQuery) and the
 * caller of pool.connect() gets it a microtask later: an ErrorResponse in the same TCP
 * read (pg_terminate_backend, an administrator's shutdown right after the connection
 * was made) was emitted on a client with no listener, an uncaught exception that
 * crashed the process. The error itself is not lost: the client is not queryable
 * any more, so the operation that gets it fails (and is retried) as usual.
 */
function guardNewClients(pool: pg.Pool): void {
  if (guarded.has(pool)) return;
  guarded.add(pool);
  pool.on('connect', (client: pg.PoolClient) => client.on('error', ignore));
}

/** Destroys a client's socket at once: its pending query fails, and the pool drops it on release. */
export function destroyClient(client: pg.ClientBase): void {
  const stream = (client as unknown as { connection?: { stream?: { destroy?: (e?: Error) => void } } }).connection?.stream;
  client.on('error', () => {}); // the destroyed socket's error must never go unheard
  stream?.destroy?.();
}

export interface DeadlineOptions {
  /** The whole operation, pool checkout included, must finish within this many ms. */
  deadlineMs: number;
  /** What the operation is, for the error message (e.g. `COPY into staging`). */
  what: string;
  /** Aborting (close()/stop()) ends the operation at once: the connection is destroyed. */
  signal?: AbortSignal | undefined;
}

/**
 * Checks out a client and runs `fn` on it, all within `deadlineMs`. On time-out
 * (or abort) the client's socket is destroyed and the promise rejects with a
 * {@link TimeoutError} (or {@link ClosedError}); a client checked out after the
 * deadline is released untouched, so nothing runs after this call has settled.
 * While checked out an 'error' listener is attached (pg emits 'error' on a client
 * whose connection dies between queries); a client whose operation failed is
 * destroyed rather than returned to the pool.
 */
export function withClient<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>, options: DeadlineOptions): Promise<T> {
  const { deadlineMs, what, signal } = options;
  guardNewClients(pool);
  return new Promise<T>((resolve, reject) => {
    let settled = false;
    let client: pg.PoolClient | undefined;
    let broken: unknown;
    const onClientError = (err: unknown): void => {
      broken ??= err;
    };
    const finish = (err: unknown, value?: T): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      if (err === undefined) resolve(value as T);
      else reject(err);
    };
    const giveUp = (err: Error): void => {
      if (settled) return;
      if (client) {
        broken ??= err;
        destroyClient(client);
      }
      finish(err);
    };
    const onAbort = (): void => giveUp(new ClosedError(what, 'pg-heartbeat is closing'));
    const timer = setTimeout(
      () => giveUp(new TimeoutError(`${what} did not finish within ${deadlineMs} ms${client ? '' : ' (no connection from the pool)'}`, { code: 'TIMEOUT' })),
      deadlineMs,
    );
    if (signal?.aborted) {
      onAbort();
      return;
    }
    signal?.addEventListener('abort', onAbort, { once: true });
    pool.connect().then(
      async (c) => {
        if (settled) {
          c.release(); // checked out after the deadline: do nothing with it
          return;
        }
        client = c;
        c.on('error', onClientError);
        try {
          const value = await fn(c);
          if (broken !== undefined) throw broken;
          finish(undefined, value);
        } catch (err) {
          broken ??= err;
          finish(err);
        } finally {
          c.off('error', onClientError);
          if (broken !== undefined) c.on('error', () => {});
          c.release(broken === undefined ? undefined : broken instanceof Error ? broken : true);
        }
      },
      (err: unknown) => finish(err),
    );
  });
}

/**
 * Ends a pool within `ms`: pool.end() waits for every connection to say goodbye,
 * which a half-open one never does, so past the deadline every socket is destroyed.
 */
export async function endPool(pool: pg.Pool, ms: number, logger?: Logger): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const ended = pool.end().catch((err: unknown) => logger?.warn('ending the pool failed', { error: err }));
  const late = new Promise<'late'>((resolve) => {
    timer = setTimeout(() => resolve('late'), ms);
  });
  const outcome = await Promise.race([ended, late]);
  clearTimeout(timer);
  if (outcome !== 'late') return;
  const clients = (pool as unknown as { _clients?: pg.ClientBase[] })._clients ?? [];
  for (const client of clients) destroyClient(client);
  logger?.warn(`pool did not close within ${ms} ms; destroyed ${clients.length} connection(s)`);
  await Promise.race([ended, new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
}

/** Rejects when `promise` takes longer than `ms` (the promise itself is left to settle; its rejection is swallowed). */
export function deadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  promise.catch(() => {});
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`${what} did not finish within ${ms} ms`, { code: 'TIMEOUT' })), ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

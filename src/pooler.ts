/**
 * Detects a transaction (or statement) pooler such as pgbouncer with
 * `pool_mode = transaction` between the client and PostgreSQL. Migrations must
 * not run through one: node-pg-migrate serialises runs with a *session*
 * advisory lock, and behind a transaction pooler the lock and its unlock can land
 * on different server connections (a lock leaked on some pooled backend, no
 * mutual exclusion between replicas). Staging (COPY), merging and disconnecting
 * are fine there: each is one transaction with no session state.
 *
 * The method (works for any pooler, needs no pooler-specific command): a session
 * owns its backend; a transaction pooler hands the backend to whichever client
 * starts a transaction next. So, with `pg_backend_pid()`:
 *   1. the connection under test, idle, reports backend A;
 *   2. a second connection opens a transaction and reports its backend B;
 *      B = A means A was given away: pooled;
 *   3. while that transaction holds B, the first connection asks again; a pid
 *      other than A means it is not pinned to a backend: pooled.
 * A direct connection (or a session-mode pooler) can never show either, so there
 * are no false positives. A pooler that gives the second connection another idle
 * backend and the first one A again is not caught by one round, so the probe runs
 * up to three rounds (pgbouncer's default LIFO reuse is caught in the first).
 * A statement-mode pooler refuses the transaction of step 2, which also counts.
 */
import pg from 'pg';
import { HeartbeatError } from './errors.ts';
import type { Logger } from './logger.ts';

/** The connection goes through a transaction (or statement) pooler; migrations need a direct one. */
export class TransactionPoolerError extends HeartbeatError {
  override readonly name = 'TransactionPoolerError';

  constructor(evidence: string) {
    super(
      `migrations need a direct (session) connection to PostgreSQL, but this one goes through a transaction pooler ` +
        `(${evidence}); point the migration's database URL at PostgreSQL itself (or a session-mode pool) and keep the ` +
        'pooler for staging and merging',
      { code: 'TRANSACTION_POOLER' },
    );
  }
}

const ROUNDS = 3;

async function backendPid(client: pg.ClientBase): Promise<number> {
  const { rows } = await client.query<{ pid: number }>('SELECT pg_catalog.pg_backend_pid() AS pid');
  return rows[0]!.pid;
}

/**
 * Resolves when `client` is pinned to one PostgreSQL backend (a direct or
 * session-pooled connection); rejects with {@link TransactionPoolerError} when it
 * goes through a transaction or statement pooler. `probe` is how to open a second
 * connection to the same place (the client's own config is right). If the probe
 * connection cannot be opened the check is skipped with a warning. `client` must
 * be idle (not in a transaction).
 */
export async function assertSessionConnection(client: pg.ClientBase, probe: pg.ClientConfig, logger?: Logger): Promise<void> {
  const other = new pg.Client({ ...probe, connectionTimeoutMillis: probe.connectionTimeoutMillis ?? 10_000 });
  other.on('error', () => {});
  try {
    await other.connect();
  } catch (err) {
    logger?.warn('could not open a second connection to check for a transaction pooler; not checked', { error: err });
    await other.end().catch(() => {});
    return;
  }
  try {
    for (let round = 1; round <= ROUNDS; round++) {
      const mine = await backendPid(client);
      let theirs: number;
      try {
        await other.query('BEGIN');
        theirs = await backendPid(other);
      } catch (err) {
        if (/pooling mode|pool_mode|not allowed in statement/i.test((err as Error).message)) {
          throw new TransactionPoolerError(`it refused a transaction: ${(err as Error).message}`);
        }
        throw err;
      }
      try {
        if (theirs === mine) throw new TransactionPoolerError(`another connection was handed its backend ${mine}`);
        const again = await backendPid(client);
        if (again !== mine) throw new TransactionPoolerError(`its backend changed from ${mine} to ${again} between statements`);
      } finally {
        await other.query('ROLLBACK').catch(() => {});
      }
    }
  } finally {
    await other.end().catch(() => {});
  }
}

/**
 * The durable-staging option: whether heartbeat.agent_connection_staging is
 * UNLOGGED (the default: no WAL for staged rows, which a crash loses, at most
 * one merge interval's worth) or LOGGED (staged rows survive a crash and reach
 * replicas, at the cost of WAL for every COPY and every merge's DELETE).
 *
 * Switching rewrites the table under an ACCESS EXCLUSIVE lock (staging
 * normally holds a few pages), so it is done only when the table is not already as asked.
 */
import type pg from 'pg';

const PERSISTENCE_SQL =
  "SELECT c.relpersistence AS p FROM pg_catalog.pg_class c WHERE c.oid = 'heartbeat.agent_connection_staging'::pg_catalog.regclass";
const SET_LOGGED_SQL = 'ALTER TABLE heartbeat.agent_connection_staging SET LOGGED';
const SET_UNLOGGED_SQL = 'ALTER TABLE heartbeat.agent_connection_staging SET UNLOGGED';

/** True when the staging table is LOGGED (durable). */
export async function isStagingDurable(client: pg.ClientBase | pg.Pool): Promise<boolean> {
  const { rows } = await client.query<{ p: string }>(PERSISTENCE_SQL);
  return rows[0]?.p === 'p';
}

/**
 * Makes the staging table LOGGED (`durable: true`) or UNLOGGED (`false`).
 * Returns whether it changed anything.
 */
export async function setStagingDurability(client: pg.ClientBase, durable: boolean): Promise<boolean> {
  if ((await isStagingDurable(client)) === durable) return false;
  await client.query('BEGIN');
  try {
    await client.query("SET LOCAL lock_timeout = '10s'");
    await client.query(durable ? SET_LOGGED_SQL : SET_UNLOGGED_SQL);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
  return true;
}

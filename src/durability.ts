/**
 * The durable-staging option: whether the parts of heartbeat.agent_connection_staging
 * are UNLOGGED (the default: no WAL for staged rows; a crash or a failover empties
 * them, and stagers resend what no merge had consumed) or LOGGED (staged rows
 * survive a crash and reach standbys, at the cost of WAL for every COPY and every
 * merge's DELETE).
 *
 * Switching rewrites each part under an ACCESS EXCLUSIVE lock (staging normally
 * holds a few pages), so it is done only for the parts not already as asked.
 */
import pg from 'pg';

const PARTS_SQL =
  'SELECT s.relname, c.relpersistence AS p FROM heartbeat.staging_parts() s ' +
  'JOIN pg_catalog.pg_class c ON c.oid = s.relid';


/** True when every part of staging is LOGGED (durable). */
export async function isStagingDurable(client: pg.ClientBase | pg.Pool): Promise<boolean> {
  const { rows } = await client.query<{ relname: string; p: string }>(PARTS_SQL);
  return rows.length > 0 && rows.every((r) => r.p === 'p');
}

/**
 * Makes the parts of staging LOGGED (`durable: true`) or UNLOGGED (`false`).
 * Returns whether it changed anything.
 */
export async function setStagingDurability(client: pg.ClientBase, durable: boolean): Promise<boolean> {
  const { rows } = await client.query<{ relname: string; p: string }>(PARTS_SQL);
  const change = rows.filter((r) => (r.p === 'p') !== durable);
  if (change.length === 0) return false;
  await client.query('BEGIN');
  try {
    await client.query("SET LOCAL lock_timeout = '10s'");
    for (const r of change) {
      const part = `heartbeat.${pg.escapeIdentifier(r.relname)}`;
      await client.query(durable ? `ALTER TABLE ${part} SET LOGGED` : `ALTER TABLE ${part} SET UNLOGGED`);
    }
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
  return true;
}

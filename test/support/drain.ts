import pg from 'pg';
import { mergeNow, type MergeResult } from '../../src/merge.ts';
import type { ConnectionOptions } from '../../src/connection.ts';
import { stagedCount } from './db.ts';
import { waitFor } from './wait.ts';

/**
 * True when a merge call found nothing left: it merged every part it asked for (none was
 * being merged elsewhere: a merge in flight may not have committed yet) and consumed no row.
 * `skippedConcurrent` alone is not enough: it is true only when *every* part was busy, so a
 * call that skips one busy part and finds the others empty looks drained while that part's
 * merge is still uncommitted (a PG14 CI run failed on exactly that).
 */
export function drained(r: MergeResult): boolean {
  return r.partsSkippedConcurrent === 0 && r.rowsConsumed === 0 && !r.more;
}

/**
 * Merges until nothing is staged or being merged: a call consumed nothing and left nothing, and then
 * staging, read in a snapshot of its own, is empty. That read sees the rows a merge in flight elsewhere
 * has deleted but not committed (they are still staged to everyone else), so it is the same guarantee as
 * drained() without needing a moment when no other merger holds any part: mergers merging in a loop beside
 * this one (the contention tests) hold some part nearly all the time, and a merge over every part holds
 * all of them at once (sql/022). Rides out failed calls (within timeoutMs).
 */
export async function mergeUntilDrained(
  connection: pg.Pool | ConnectionOptions,
  options: { timeoutMs?: number; callTimeoutMs?: number } = {},
): Promise<void> {
  const staged = async (): Promise<number> => {
    if (connection instanceof pg.Pool) return stagedCount(connection);
    if ('pool' in connection) return stagedCount(connection.pool);
    const c = new pg.Client({ connectionString: connection.connectionString });
    c.on('error', () => {});
    await c.connect();
    try {
      return Number((await c.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging')).rows[0]!.n);
    } finally {
      await c.end();
    }
  };
  await waitFor(async () => {
    const r = await mergeNow(connection, { timeoutMs: options.callTimeoutMs ?? 20_000 });
    return r.rowsConsumed === 0 && !r.more && (await staged()) === 0;
  }, 'staging drained by merges', options.timeoutMs ?? 60_000, 50);
}

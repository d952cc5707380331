import type pg from 'pg';
import { mergeNow, type MergeResult } from '../../src/merge.ts';
import type { ConnectionOptions } from '../../src/connection.ts';
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

/** Merges until a call finds every part free and empty, riding out failed calls (within timeoutMs). */
export async function mergeUntilDrained(
  connection: pg.Pool | ConnectionOptions,
  options: { timeoutMs?: number; callTimeoutMs?: number } = {},
): Promise<void> {
  await waitFor(async () => drained(await mergeNow(connection, { timeoutMs: options.callTimeoutMs ?? 20_000 })),
    'staging drained by merges', options.timeoutMs ?? 60_000, 50);
}

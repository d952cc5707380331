import type pg from 'pg';
import { toHeartbeatError } from './errors.ts';

/** What one call of heartbeat.merge_agent_connections() did. */
export interface MergeResult {
  /** Staged rows consumed (deleted from staging). */
  rowsConsumed: number;
  /** Agents whose row was updated. */
  agentsUpdated: number;
  /** Agents whose newest staged snapshot was not newer than the stored row. */
  skippedStale: number;
  /** Agents not present in workspace_agents (their rows were discarded). */
  skippedUnknown: number;
  /** Rows without agent_id/updated_at or too far in the future (discarded). */
  skippedInvalid: number;
  /** Agents whose row was locked by another transaction: put back in staging for the next merge. */
  deferredLocked: number;
  /** True when another merge was running, so this one did nothing. */
  skippedConcurrent: boolean;
}

interface MergeRow {
  rows_consumed: string;
  agents_updated: string;
  skipped_stale: string;
  skipped_unknown: string;
  skipped_invalid: string;
  deferred_locked: string;
  skipped_concurrent: boolean;
}

const MERGE_SQL = 'SELECT * FROM heartbeat.merge_agent_connections()';

/** Converts a row returned by heartbeat.merge_agent_connections() (bigints arrive as strings). */
export function toMergeResult(row: MergeRow): MergeResult {
  return {
    rowsConsumed: Number(row.rows_consumed),
    agentsUpdated: Number(row.agents_updated),
    skippedStale: Number(row.skipped_stale),
    skippedUnknown: Number(row.skipped_unknown),
    skippedInvalid: Number(row.skipped_invalid),
    deferredLocked: Number(row.deferred_locked),
    skippedConcurrent: row.skipped_concurrent,
  };
}

/**
 * Runs one merge now: applies every staged heartbeat to workspace_agents.
 * Safe to call from many processes at once: all but one return at once with
 * `skippedConcurrent: true`. Works with a pool or a single client.
 */
export async function mergeNow(db: pg.Pool | pg.ClientBase): Promise<MergeResult> {
  try {
    const { rows } = await db.query<MergeRow>(MERGE_SQL);
    return toMergeResult(rows[0]!);
  } catch (err) {
    throw toHeartbeatError(err, 'merge');
  }
}

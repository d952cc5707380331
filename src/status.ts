/**
 * Reading heartbeat.status (is the merge keeping up?) and
 * heartbeat.agent_status() (each agent's connection status), typed.
 */
import type { MergeResult } from './merge.ts';
import type pg from 'pg';
import { resolvePool, type ConnectionOptions } from './connection.ts';
import { toHeartbeatError } from './errors.ts';
import { toLogger, type Logger } from './logger.ts';
import { findMergeJob } from './schedule.ts';

/** One reading of heartbeat.status; durations in milliseconds, instants on the database clock. */
export interface MergeStatus {
  checkedAt: Date;
  /** Rows waiting in staging for the next merge. */
  stagedRows: number;
  /** The oldest staged updated_at (replica clock); null when staging is empty. */
  oldestStagedAt: Date | null;
  /** checkedAt - oldestStagedAt (never negative); null when staging is empty. */
  mergeLagMs: number | null;
  lastMerge: (Omit<MergeResult, 'skippedConcurrent'> & { at: Date; durationMs: number; sinceMs: number }) | null;
  /** Merges run since the server started (merge_state is UNLOGGED: a crash resets it). */
  mergesTotal: number;
  cron: {
    /** Where pg_cron lives (cron.database_name); null without pg_cron. */
    database: string | null;
    jobName: string | null;
    schedule: string | null;
    /** Whether the merge job exists and is active; null when it could not be checked. */
    scheduled: boolean | null;
  };
}

interface StatusRow {
  checked_at: Date;
  staged_rows: string;
  oldest_staged_at: Date | null;
  merge_lag_ms: number | null;
  last_merge_at: Date | null;
  last_merge_duration_ms: number | null;
  since_last_merge_ms: number | null;
  last_merge_rows_consumed: string | null;
  last_merge_agents_updated: string | null;
  last_merge_skipped_stale: string | null;
  last_merge_skipped_unknown: string | null;
  last_merge_skipped_invalid: string | null;
  last_merge_deferred_locked: string | null;
  merges_total: string;
  cron_database: string | null;
  cron_job: string | null;
  cron_schedule: string | null;
  cron_scheduled: boolean | null;
  database: string;
}

const ms = (column: string): string => `(extract(epoch FROM ${column}) * 1000)::float8 AS ${column}_ms`;
const STATUS_SQL = `SELECT checked_at, staged_rows, oldest_staged_at, ${ms('merge_lag')}, last_merge_at,
       ${ms('last_merge_duration')}, ${ms('since_last_merge')}, last_merge_rows_consumed, last_merge_agents_updated,
       last_merge_skipped_stale, last_merge_skipped_unknown, last_merge_skipped_invalid, last_merge_deferred_locked,
       merges_total, cron_database, cron_job, cron_schedule, cron_scheduled, current_database() AS database
  FROM heartbeat.status`;

/**
 * Reads heartbeat.status. When pg_cron lives in another database, also looks
 * up the merge job there (with the same credentials; `scheduled` stays null if
 * that fails).
 */
export async function readStatus(connection: ConnectionOptions, options: { logger?: Logger } = {}): Promise<MergeStatus> {
  const logger = toLogger(options.logger);
  const { pool, owned } = resolvePool(connection, logger, 'pg-heartbeat status');
  try {
    const { rows } = await pool.query<StatusRow>(STATUS_SQL);
    const r = rows[0]!;
    const status: MergeStatus = {
      checkedAt: r.checked_at,
      stagedRows: Number(r.staged_rows),
      oldestStagedAt: r.oldest_staged_at,
      mergeLagMs: r.merge_lag_ms,
      lastMerge:
        r.last_merge_at === null
          ? null
          : {
              at: r.last_merge_at,
              durationMs: r.last_merge_duration_ms ?? 0,
              sinceMs: r.since_last_merge_ms ?? 0,
              rowsConsumed: Number(r.last_merge_rows_consumed),
              agentsUpdated: Number(r.last_merge_agents_updated),
              skippedStale: Number(r.last_merge_skipped_stale),
              skippedUnknown: Number(r.last_merge_skipped_unknown),
              skippedInvalid: Number(r.last_merge_skipped_invalid),
              deferredLocked: Number(r.last_merge_deferred_locked),
            },
      mergesTotal: Number(r.merges_total),
      cron: { database: r.cron_database, jobName: r.cron_job, schedule: r.cron_schedule, scheduled: r.cron_scheduled },
    };
    if (r.cron_database !== null && r.cron_database !== r.database) {
      const jobName = `pg-heartbeat-merge-${r.database}`;
      status.cron.jobName = jobName;
      try {
        const job = await findMergeJob(pool, { jobName, cronDatabase: r.cron_database });
        status.cron.schedule = job?.schedule ?? null;
        status.cron.scheduled = job?.active ?? false;
      } catch (err) {
        logger.debug('could not read cron.job in pg_cron\'s database', { error: err });
      }
    }
    return status;
  } catch (err) {
    throw toHeartbeatError(err, 'read heartbeat.status');
  } finally {
    if (owned) await pool.end().catch(() => {});
  }
}

export type AgentConnectionStatus = 'connecting' | 'connected' | 'disconnected' | 'timeout';

export interface AgentStatus {
  agentId: string;
  status: AgentConnectionStatus;
  firstConnectedAt: Date | null;
  lastConnectedAt: Date | null;
  disconnectedAt: Date | null;
  lastConnectedReplicaId: string | null;
  updatedAt: Date;
}

/**
 * Each agent's connection status by heartbeat.agent_status() (the reference
 * system's rules, on the database clock). `agentIds` limits it to those agents.
 */
export async function agentStatus(
  db: pg.Pool | pg.ClientBase,
  options: { inactiveTimeoutMs?: number; agentIds?: string[] } = {},
): Promise<AgentStatus[]> {
  const timeout = options.inactiveTimeoutMs ?? 30_000;
  try {
    const { rows } = await db.query<{
      agent_id: string;
      status: AgentConnectionStatus;
      first_connected_at: Date | null;
      last_connected_at: Date | null;
      disconnected_at: Date | null;
      last_connected_replica_id: string | null;
      updated_at: Date;
    }>('SELECT * FROM heartbeat.agent_status(make_interval(secs => $1::float8 / 1000), $2::uuid[])', [timeout, options.agentIds ?? null]);
    return rows.map((r) => ({
      agentId: r.agent_id,
      status: r.status,
      firstConnectedAt: r.first_connected_at,
      lastConnectedAt: r.last_connected_at,
      disconnectedAt: r.disconnected_at,
      lastConnectedReplicaId: r.last_connected_replica_id,
      updatedAt: r.updated_at,
    }));
  } catch (err) {
    throw toHeartbeatError(err, 'heartbeat.agent_status');
  }
}

/**
 * Reading heartbeat.status (is the merge keeping up?) and
 * heartbeat.agent_status() (each agent's connection status), typed.
 *
 * Every time and duration is read as epoch (or interval) microseconds, never
 * as text: the results are the same whatever the session's DateStyle,
 * IntervalStyle, TimeZone or extra_float_digits.
 */
import type pg from 'pg';
import { type ConnectionOptions, endPool, resolvePool, withClient } from './connection.ts';
import { toHeartbeatError } from './errors.ts';
import { consoleLogger, toLogger, type Logger } from './logger.ts';
import type { MergeResult } from './merge.ts';
import { durationOption } from './options.ts';
import { safeLogger } from './safe-logger.ts';
import { findMergeJob } from './schedule.ts';
import { canonicalUuid } from './update.ts';

type MergeCounts = Pick<MergeResult,
  'rowsConsumed' | 'agentsUpdated' | 'skippedStale' | 'skippedUnknown' | 'skippedInvalid' | 'deferredLocked' | 'deadLettered'>;

/** One part of staging (heartbeat.part_status()). */
export interface PartStatus {
  part: number;
  stagedRows: number;
  oldestStagedAt: Date | null;
  mergeLagMs: number | null;
  lastMerge: (MergeCounts & { at: Date; durationMs: number; sinceMs: number }) | null;
  mergesTotal: number;
  /** The backend holding this part's merge lock now, if any. */
  lockHolderPid: number | null;
  /** Since when merges have found the lock taken by that backend (null: not contended). */
  lockBusySince: Date | null;
}

/** One reading of heartbeat.status; durations in milliseconds, instants on the database clock. */
export interface MergeStatus {
  checkedAt: Date;
  /** Rows waiting in staging for the next merge. */
  stagedRows: number;
  /** The oldest valid staged updated_at (replica clock); null when staging is empty. */
  oldestStagedAt: Date | null;
  /** checkedAt - oldestStagedAt (never negative); null when staging is empty. */
  mergeLagMs: number | null;
  /**
   * The last merge of every part taken together: the earliest start (the part merged longest
   * ago), the longest duration, the sum of the counts; null until every part has been merged
   * since the server started.
   */
  lastMerge: (MergeCounts & { at: Date; durationMs: number; sinceMs: number }) | null;
  /** Part merges run since the server started (merge_state is UNLOGGED: a crash resets it). */
  mergesTotal: number;
  /** Snapshots in heartbeat.dead_letters (they failed to apply), and when the last one arrived. */
  deadLetters: number;
  lastDeadLetterAt: Date | null;
  /** A merge lock that merges find taken: who holds it, since when (a merge held open in a transaction). */
  mergeLock: { holderPid: number | null; busySince: Date | null };
  /** When staging was last found reset (crash recovery, failover); null before the first stager connected. */
  stagingEpochBeganAt: Date | null;
  parts: PartStatus[];
  cron: {
    /** Where pg_cron lives (cron.database_name); null without pg_cron. */
    database: string | null;
    jobName: string | null;
    schedule: string | null;
    /** Whether the merge job exists and is active; null when it could not be checked. */
    scheduled: boolean | null;
  };
}

const us = (column: string, as = column): string => `(extract(epoch FROM ${column}) * 1000000)::int8::text AS ${as}_us`;
const STATUS_SQL = `SELECT ${us('checked_at')}, staged_rows, ${us('oldest_staged_at')}, ${us('merge_lag')}, ${us('last_merge_at')},
       ${us('last_merge_duration')}, ${us('since_last_merge')}, last_merge_rows_consumed, last_merge_agents_updated,
       last_merge_skipped_stale, last_merge_skipped_unknown, last_merge_skipped_invalid, last_merge_deferred_locked,
       last_merge_dead_lettered, merges_total, dead_letters, ${us('last_dead_letter_at')}, staging_parts,
       merge_lock_holder_pid, ${us('merge_lock_busy_since')}, ${us('staging_epoch_began_at')},
       cron_database, cron_job, cron_schedule, cron_scheduled, current_database() AS database
  FROM heartbeat.status`;
const PARTS_SQL = `SELECT part, staged_rows, ${us('oldest_staged_at')}, ${us('merge_lag')}, ${us('last_merge_at')},
       ${us('last_merge_duration')}, ${us('since_last_merge')}, last_merge_rows_consumed, last_merge_agents_updated,
       last_merge_skipped_stale, last_merge_skipped_unknown, last_merge_skipped_invalid, last_merge_deferred_locked,
       last_merge_dead_lettered, merges_total, lock_holder_pid, ${us('lock_busy_since')}
  FROM heartbeat.part_status()`;

type Row = Record<string, string | number | boolean | null>;
const date = (v: unknown): Date | null => (v === null || v === undefined ? null : new Date(Number(v) / 1000));
const millis = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v) / 1000);
const num = (v: unknown): number => Number(v ?? 0);

function lastMergeOf(r: Row): PartStatus['lastMerge'] {
  if (r.last_merge_at_us === null) return null;
  return {
    at: date(r.last_merge_at_us)!,
    durationMs: millis(r.last_merge_duration_us) ?? 0,
    sinceMs: millis(r.since_last_merge_us) ?? 0,
    rowsConsumed: num(r.last_merge_rows_consumed),
    agentsUpdated: num(r.last_merge_agents_updated),
    skippedStale: num(r.last_merge_skipped_stale),
    skippedUnknown: num(r.last_merge_skipped_unknown),
    skippedInvalid: num(r.last_merge_skipped_invalid),
    deferredLocked: num(r.last_merge_deferred_locked),
    deadLettered: num(r.last_merge_dead_lettered),
  };
}

/**
 * Reads heartbeat.status and heartbeat.part_status(). When pg_cron lives in
 * another database, also looks up the merge job there (with the same
 * credentials; `scheduled` stays null if that fails; `lookUpCron: false` skips
 * that). Fails with a TimeoutError after `timeoutMs` (default 10 000).
 */
export async function readStatus(
  connection: ConnectionOptions,
  options: { logger?: Logger; timeoutMs?: number; lookUpCron?: boolean } = {},
): Promise<MergeStatus> {
  const logger = safeLogger(toLogger(options.logger));
  const timeoutMs = durationOption(options.timeoutMs, 'timeoutMs', 10_000);
  const { pool, owned } = resolvePool(connection, logger, 'pg-heartbeat status', 1);
  try {
    const status = await withClient(pool, async (client) => {
      const r = (await client.query<Row>(STATUS_SQL)).rows[0]!;
      const parts = (await client.query<Row>(PARTS_SQL)).rows;
      const s: MergeStatus & { database: string } = {
        checkedAt: date(r.checked_at_us)!,
        stagedRows: num(r.staged_rows),
        oldestStagedAt: date(r.oldest_staged_at_us),
        mergeLagMs: millis(r.merge_lag_us),
        lastMerge: lastMergeOf(r),
        mergesTotal: num(r.merges_total),
        deadLetters: num(r.dead_letters),
        lastDeadLetterAt: date(r.last_dead_letter_at_us),
        mergeLock: { holderPid: (r.merge_lock_holder_pid as number | null) ?? null, busySince: date(r.merge_lock_busy_since_us) },
        stagingEpochBeganAt: date(r.staging_epoch_began_at_us),
        parts: parts.map((p) => ({
          part: num(p.part),
          stagedRows: num(p.staged_rows),
          oldestStagedAt: date(p.oldest_staged_at_us),
          mergeLagMs: p.oldest_staged_at_us === null ? null : millis(p.merge_lag_us),
          lastMerge: lastMergeOf(p),
          mergesTotal: num(p.merges_total),
          lockHolderPid: (p.lock_holder_pid as number | null) ?? null,
          lockBusySince: date(p.lock_busy_since_us),
        })),
        cron: {
          database: r.cron_database as string | null,
          jobName: r.cron_job as string | null,
          schedule: r.cron_schedule as string | null,
          scheduled: r.cron_scheduled as boolean | null,
        },
        database: r.database as string,
      };
      return s;
    }, { deadlineMs: timeoutMs, what: 'read heartbeat.status' });
    const { database, ...result } = status;
    if (options.lookUpCron !== false && result.cron.database !== null && (result.cron.database !== database || result.cron.scheduled === null)) {
      // the job lives in pg_cron's database (or cron.job was not readable by the status function): look as the caller
      const jobName = result.cron.database === database ? 'pg-heartbeat-merge' : `pg-heartbeat-merge-${database}`;
      result.cron.jobName = jobName;
      try {
        const job = await findMergeJob(pool, { jobName, cronDatabase: result.cron.database });
        result.cron.schedule = job?.schedule ?? null;
        result.cron.scheduled = job?.active ?? false;
      } catch (err) {
        logger.debug('could not read cron.job in pg_cron\'s database', { error: err });
      }
    }
    return result;
  } catch (err) {
    throw toHeartbeatError(err, 'read heartbeat.status');
  } finally {
    if (owned) await endPool(pool, 5000);
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
 * A timestamp column as epoch microseconds, or NULL when a Date cannot hold it: not finite (an
 * 'infinity' already in the table), or after 275760-09-13 (a year-294276 value: its microseconds
 * since 1970 do not even fit in an int8, which failed the whole call for every agent).
 */
const finiteUs = (column: string): string =>
  `CASE WHEN isfinite(${column}) AND ${column} < '275760-09-13 00:00:00.001+00'::timestamptz ` +
  `THEN (extract(epoch FROM ${column}) * 1000000)::int8::text END AS ${column}_us`;
const AGENT_STATUS_SQL = `SELECT agent_id::text AS agent_id, status, ${finiteUs('first_connected_at')}, ${finiteUs('last_connected_at')},
       ${finiteUs('disconnected_at')}, last_connected_replica_id::text AS last_connected_replica_id, ${finiteUs('updated_at')}
  FROM heartbeat.agent_status(make_interval(secs => $1::float8 / 1000), $2::uuid[])`;

/**
 * Each agent's connection status by heartbeat.agent_status() (the reference
 * system's rules, on the database clock). `agentIds` limits it to those agents.
 * Fails with a TimeoutError after `timeoutMs` (default 30 000).
 */
export async function agentStatus(
  connection: ConnectionOptions | pg.Pool,
  options: { inactiveTimeoutMs?: number; agentIds?: string[]; timeoutMs?: number } = {},
): Promise<AgentStatus[]> {
  const inactive = durationOption(options.inactiveTimeoutMs, 'inactiveTimeoutMs', 30_000);
  const timeoutMs = durationOption(options.timeoutMs, 'timeoutMs', 30_000);
  const ids = options.agentIds === undefined ? null : options.agentIds.map((id) => canonicalUuid(id, 'agentIds'));
  const { pool, owned } = resolvePool(connection, consoleLogger, 'pg-heartbeat status', 1);
  try {
    const rows = await withClient(pool, async (client) => (await client.query<Row>(AGENT_STATUS_SQL, [inactive, ids])).rows, {
      deadlineMs: timeoutMs, what: 'heartbeat.agent_status',
    });
    return rows.map((r) => ({
      agentId: r.agent_id as string,
      status: r.status as AgentConnectionStatus,
      firstConnectedAt: date(r.first_connected_at_us),
      lastConnectedAt: date(r.last_connected_at_us),
      disconnectedAt: date(r.disconnected_at_us),
      lastConnectedReplicaId: r.last_connected_replica_id as string | null,
      updatedAt: date(r.updated_at_us) ?? new Date(NaN),
    }));
  } catch (err) {
    throw toHeartbeatError(err, 'heartbeat.agent_status');
  } finally {
    if (owned) await endPool(pool, 5000);
  }
}

/**
 * One merge, called from the client: heartbeat.merge_agent_connections() (every
 * part of staging) or heartbeat.merge_staging_part() (one part), under a
 * deadline, whatever the session's default isolation level.
 */
import pg from 'pg';
import { type ConnectionOptions, deadline, destroyClient, isPool, resolvePool, withClient, endPool } from './connection.ts';
import { toHeartbeatError } from './errors.ts';
import { silentLogger } from './logger.ts';
import { countOption, durationOption } from './options.ts';

/** What one merge call (or a draining series of them) did. */
export interface MergeResult {
  /** Staged rows consumed (deleted from staging). */
  rowsConsumed: number;
  /** Agents whose row was updated. */
  agentsUpdated: number;
  /** Agents whose newest staged snapshot was not newer than the stored row. */
  skippedStale: number;
  /** Agents not present in workspace_agents (their rows were discarded). */
  skippedUnknown: number;
  /** Rows without agent_id/updated_at, or with a timestamp that is not valid (discarded). */
  skippedInvalid: number;
  /** Agents whose row was locked by another transaction: put back in staging for the next merge. */
  deferredLocked: number;
  /** Snapshots that failed to apply (a constraint, a trigger): moved to heartbeat.dead_letters. */
  deadLettered: number;
  /**
   * Status changes recorded in heartbeat.status_events by these merges and by the sweep after
   * them (first heartbeats, reconnects, inactivity, connection timeouts): see docs/events.md.
   */
  statusEvents: number;
  /**
   * Whether time-based status changes are swept up to now: a merge call that is a transaction of
   * its own sweeps at its end (or finds a sweep less than a second old). When false, mergeNow() and
   * startMerger() run heartbeat.sweep_status() after merging.
   */
  swept: boolean;
  /** True when every part asked for was being merged elsewhere, so this call did nothing. */
  skippedConcurrent: boolean;
  /** Parts of staging asked for. */
  parts: number;
  /** Parts this call merged. */
  partsMerged: number;
  /** Parts skipped because another merge held their lock. */
  partsSkippedConcurrent: number;
  /** Parts skipped because another merger merged them less than minIntervalMs ago. */
  partsSkippedRecent: number;
  /** Parts that still hold rows (the row budget ran out): merge again now. */
  partsWithMore: number[];
  more: boolean;
  /** A part lock this call found taken: its holder's backend pid, and since when merges find it taken. */
  lockHolderPid: number | null;
  lockBusySince: Date | null;
  /** Merge statements run (more than one when draining). */
  statements: number;
}

export interface MergeOptions {
  /** Staged rows one statement consumes at most (default: heartbeat.settings.max_rows_per_merge, 50,000). */
  maxRows?: number;
  /** Merge only this part of staging (0 .. parts-1); default every part. */
  part?: number;
  /** Skip parts merged (and left empty) by another merger less than this many ms ago. */
  minIntervalMs?: number;
  /** Merge again while rows are left (default true), within timeoutMs. */
  drain?: boolean;
  /** Deadline of the whole call, pool checkout included (default 30,000 ms). */
  timeoutMs?: number;
  /** Aborting cuts the call off (its connection is destroyed). */
  signal?: AbortSignal;
}

interface MergeRow {
  rows_consumed: string;
  agents_updated: string;
  skipped_stale: string;
  skipped_unknown: string;
  skipped_invalid: string;
  deferred_locked: string;
  dead_lettered: string;
  status_events: string;
  status_swept: boolean | null;
  skipped_concurrent: boolean;
  parts: number;
  parts_merged: number;
  parts_skipped_concurrent: number;
  parts_skipped_recent: number;
  parts_more: number[];
  more: boolean;
  lock_holder_pid: number | null;
  lock_busy_since_us: string | null;
}

// times as epoch microseconds: exact whatever the session's DateStyle, TimeZone or extra_float_digits
const COLUMNS = `rows_consumed, agents_updated, skipped_stale, skipped_unknown, skipped_invalid, deferred_locked,
  dead_lettered, status_events, status_swept, skipped_concurrent, parts, parts_merged, parts_skipped_concurrent, parts_skipped_recent, parts_more,
  more, lock_holder_pid, (extract(epoch FROM lock_busy_since) * 1000000)::int8::text AS lock_busy_since_us`;
/**
 * The merge statements: every part (merge_agent_connections) or one (merge_staging_part). Parameters: $1 max rows,
 * $2 min interval (ms), $3 merger id; when the call is a transaction of its own, $4 the least time between two
 * sweeps (ms): the merger argument then first sets, transaction-locally, that the merge may sweep at its end
 * (sql/018), so no second statement is needed for the sweep; then the part, when one.
 */
const MIN_INTERVAL_ARG = 'make_interval(secs => $2::float8 / 1000)';
const OWN_MERGER = `(SELECT $3::text FROM (SELECT pg_catalog.set_config('heartbeat.merge_in_own_transaction', 'on', true),
  pg_catalog.set_config('heartbeat.sweep_min_gap', ($4::float8 / 1000)::text || ' seconds', true)) AS flags)`;
/**
 * The channel a merge of every part announces itself on (`NOTIFY`, payload: the merger's id, '' for mergeNow()).
 * PostgreSQL scopes channels to the database, and pg-heartbeat's schema is always `heartbeat`, so the name alone
 * is specific to one installation. startMerger() LISTENs to it to skip a tick another merger just did (merger.ts).
 */
export const MERGED_CHANNEL = 'pg_heartbeat_merged';
/**
 * In the merge statement a transaction of its own sends (ownAll): when it merged every part and left no rows,
 * pg_notify(), delivered at its commit, in the same statement (no extra round trip, nothing if it rolls back).
 */
const NOTIFY_MERGED = `CASE WHEN NOT more AND parts_merged = parts
  THEN (SELECT true FROM pg_catalog.pg_notify('${MERGED_CHANNEL}', COALESCE($3::text, ''))) ELSE false END AS notified`;
const MERGE_SQL = {
  all: `SELECT ${COLUMNS} FROM heartbeat.merge_agent_connections($1::int4, ${MIN_INTERVAL_ARG}, $3::text)`,
  part: `SELECT ${COLUMNS} FROM heartbeat.merge_staging_part($4::int4, $1::int4, ${MIN_INTERVAL_ARG}, $3::text)`,
  ownAll: `SELECT ${COLUMNS}, ${NOTIFY_MERGED} FROM heartbeat.merge_agent_connections($1::int4, ${MIN_INTERVAL_ARG}, ${OWN_MERGER})`,
  ownPart: `SELECT ${COLUMNS} FROM heartbeat.merge_staging_part($5::int4, $1::int4, ${MIN_INTERVAL_ARG}, ${OWN_MERGER})`,
};

/** An empty result, to add calls into. */
export function emptyMergeResult(): MergeResult {
  return {
    rowsConsumed: 0, agentsUpdated: 0, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0,
    deadLettered: 0, statusEvents: 0, swept: false, skippedConcurrent: false, parts: 0, partsMerged: 0, partsSkippedConcurrent: 0,
    partsSkippedRecent: 0, partsWithMore: [], more: false, lockHolderPid: null, lockBusySince: null, statements: 0,
  };
}

/** Converts a row of heartbeat.merge_result (bigints arrive as strings). */
export function toMergeResult(row: MergeRow): MergeResult {
  return {
    rowsConsumed: Number(row.rows_consumed),
    agentsUpdated: Number(row.agents_updated),
    skippedStale: Number(row.skipped_stale),
    skippedUnknown: Number(row.skipped_unknown),
    skippedInvalid: Number(row.skipped_invalid),
    deferredLocked: Number(row.deferred_locked),
    deadLettered: Number(row.dead_lettered),
    statusEvents: Number(row.status_events),
    swept: row.status_swept === true,
    skippedConcurrent: row.skipped_concurrent,
    parts: row.parts,
    partsMerged: row.parts_merged,
    partsSkippedConcurrent: row.parts_skipped_concurrent,
    partsSkippedRecent: row.parts_skipped_recent,
    partsWithMore: row.parts_more,
    more: row.more,
    lockHolderPid: row.lock_holder_pid,
    lockBusySince: row.lock_busy_since_us === null ? null : new Date(Number(row.lock_busy_since_us) / 1000),
    statements: 1,
  };
}

/**
 * Adds `b` into `a` (counts summed; the parts of a series of calls over the same
 * parts are not double counted: `a.parts` keeps the larger).
 */
export function addMergeResults(a: MergeResult, b: MergeResult): MergeResult {
  a.rowsConsumed += b.rowsConsumed;
  a.agentsUpdated += b.agentsUpdated;
  a.skippedStale += b.skippedStale;
  a.skippedUnknown += b.skippedUnknown;
  a.skippedInvalid += b.skippedInvalid;
  a.deferredLocked += b.deferredLocked;
  a.deadLettered += b.deadLettered;
  a.statusEvents += b.statusEvents;
  a.swept ||= b.swept;
  a.partsMerged += b.partsMerged;
  a.partsSkippedConcurrent += b.partsSkippedConcurrent;
  a.partsSkippedRecent += b.partsSkippedRecent;
  a.statements += b.statements;
  if (b.lockBusySince && (!a.lockBusySince || b.lockBusySince < a.lockBusySince)) {
    a.lockBusySince = b.lockBusySince;
    a.lockHolderPid = b.lockHolderPid;
  }
  return a;
}

/** Databases (pools) whose sessions default to another isolation level than READ COMMITTED. */
const needsReadCommitted = new WeakSet<object>();

/**
 * One statement that needs READ COMMITTED (the merge, the sweep): when the
 * session's default is another level (25001 from the function), it is run inside
 * BEGIN ISOLATION LEVEL READ COMMITTED ... COMMIT, and `key` remembers that.
 */
export async function readCommittedQuery<R extends pg.QueryResultRow>(
  client: pg.ClientBase, key: object, sql: string, params: unknown[],
): Promise<R[]> {
  if (!needsReadCommitted.has(key)) {
    try {
      return (await client.query<R>(sql, params)).rows;
    } catch (err) {
      if ((err as { code?: unknown }).code !== '25001' || !/READ COMMITTED/.test(String((err as Error).message))) throw err;
      needsReadCommitted.add(key);
    }
  }
  await client.query('BEGIN ISOLATION LEVEL READ COMMITTED');
  try {
    const { rows } = await client.query<R>(sql, params);
    await client.query('COMMIT');
    return rows;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

/** One merge statement on `client` (READ COMMITTED whatever the session's default). */
export async function mergeStatement(
  client: pg.ClientBase,
  key: object,
  args: {
    maxRows: number | null; minIntervalMs: number | null; part: number | null; merger?: string | null;
    /** The statement is a transaction of its own (a pool's connection, not the caller's client): it may sweep. */
    ownTransaction?: boolean;
    /** With ownTransaction: sweep only when the last sweep is older than this (default 1,000 ms). */
    sweepMinGapMs?: number;
  },
): Promise<MergeResult> {
  const own = args.ownTransaction === true;
  const sql = args.part === null ? (own ? MERGE_SQL.ownAll : MERGE_SQL.all) : own ? MERGE_SQL.ownPart : MERGE_SQL.part;
  const params: unknown[] = [args.maxRows, args.minIntervalMs, args.merger ?? null];
  if (own) params.push(args.sweepMinGapMs ?? 1000);
  if (args.part !== null) params.push(args.part);
  const rows = await readCommittedQuery<MergeRow>(client, key, sql, params);
  return toMergeResult(rows[0]!);
}

/**
 * After a merge (or a series of them) that left no rows and did not sweep at its end: heartbeat.sweep_status(),
 * the time-based status changes (inactivity, connection timeouts) and the publication of pending events. Adds
 * what it recorded to `result`; `result.swept` stays false when it skipped (merges held the event-state lock:
 * the next sweep catches up).
 */
export async function sweepAfterMerge(client: pg.ClientBase, key: object, result: MergeResult): Promise<void> {
  if (result.more || result.swept) return;
  const rows = await readCommittedQuery<{ n: string | null }>(client, key, 'SELECT heartbeat.sweep_status() AS n', []);
  const n = rows[0]?.n ?? null;
  result.statusEvents += n === null ? 0 : Number(n);
  result.swept = n !== null;
}

/**
 * Runs a merge now: applies staged heartbeats to workspace_agents (by default
 * every part, again while rows are left). Safe to call from many processes at
 * once: a part being merged elsewhere is skipped (`partsSkippedConcurrent`,
 * `skippedConcurrent` when all were). Fails with a TimeoutError past
 * `timeoutMs` (the connection is destroyed; the merge's own transaction rolls
 * back or commits on the server, either way consistently).
 *
 * `connection` is `{ pool }` or `{ connectionString }` like everywhere else; a
 * pg.Pool or a connected pg.Client also works (a client you pass is used as is,
 * and destroyed if the deadline passes).
 */
export async function mergeNow(
  connection: ConnectionOptions | pg.Pool | pg.ClientBase,
  options: MergeOptions = {},
): Promise<MergeResult> {
  const timeoutMs = durationOption(options.timeoutMs, 'timeoutMs', 30_000);
  const maxRows = options.maxRows === undefined ? null : countOption(options.maxRows, 'maxRows', 0);
  const part = options.part === undefined ? null : countOption(options.part, 'part', 0, 0, 63);
  const minIntervalMs = options.minIntervalMs === undefined ? null : durationOption(options.minIntervalMs, 'minIntervalMs', 0, 0);
  const drain = options.drain ?? true;
  const started = performance.now();
  const args = { maxRows, minIntervalMs, part };

  // own: a connection of a pool, not the caller's client (which may be inside the caller's transaction)
  const series = async (client: pg.ClientBase, key: object, own = false): Promise<MergeResult> => {
    let total: MergeResult | undefined;
    for (;;) {
      const r = await mergeStatement(client, key, { ...args, ownTransaction: own });
      if (total === undefined) total = r;
      else {
        addMergeResults(total, r);
        total.partsWithMore = r.partsWithMore;
        total.more = r.more;
        total.skippedConcurrent = total.skippedConcurrent && r.skippedConcurrent;
      }
      if (!drain || !r.more || performance.now() - started > timeoutMs / 2) break;
    }
    // the time-based status changes, once the backlog is merged (see docs/events.md)
    await sweepAfterMerge(client, key, total);
    return total;
  };

  try {
    if (isClient(connection)) {
      const client = connection;
      try {
        return await deadline(series(client, client), timeoutMs, 'merge');
      } catch (err) {
        if ((err as { code?: unknown }).code === 'TIMEOUT') destroyClient(client);
        throw err;
      }
    }
    const { pool, owned } = resolvePool(connection as ConnectionOptions | pg.Pool, silentLogger, 'pg-heartbeat merge', 1);
    try {
      return await withClient(pool, (client) => series(client, pool, true), { deadlineMs: timeoutMs, what: 'merge', signal: options.signal });
    } finally {
      if (owned) await endPool(pool, 5000);
    }
  } catch (err) {
    throw toHeartbeatError(err, 'merge');
  }
}

/** A connected client (pg.Client or a pool's client), not a pool nor connection options. */
function isClient(x: unknown): x is pg.ClientBase {
  return !isPool(x) && !!x && typeof x === 'object' && typeof (x as { query?: unknown }).query === 'function'
    && !('pool' in x) && !('connectionString' in x);
}

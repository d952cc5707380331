import { setMaxListeners } from 'node:events';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { type ConnectionOptions, endPool, resolvePool, withClient } from './connection.ts';
import { encodeCopy } from './copy-encoder.ts';
import { ClosedError, type HeartbeatError, InvalidOptionError, toHeartbeatError } from './errors.ts';
import { toLogger, type Logger } from './logger.ts';
import { countOption, durationOption, functionOption, MAX_TIMER_MS } from './options.ts';
import { notify } from './observers.ts';
import { Retained } from './retained.ts';
import { callHook, safeLogger } from './safe-logger.ts';
import {
  type AgentDisconnect, type AgentUpdate, canonicalUuid, checkDisconnect, checkReplicaDisconnectTimes, combine, earliest, type Snapshot, toSnapshot,
} from './update.ts';

export interface StagerOptions {
  /**
   * Background flush period. Default 5000 ms, the merge interval: with flushes
   * aligned to the same grid as the merger's ticks (`alignFlush`), a heartbeat
   * waits at most one interval plus `flushLeadMs` plus the merge. The invariant's
   * worst case from heartbeat to workspace_agents is 15 + 5 + 5.5 = 25.5 s,
   * inside the usual 30 s inactivity timeout.
   */
  flushIntervalMs?: number;
  /**
   * Flush on the wall-clock grid (default true): at the multiples of
   * flushIntervalMs since the Unix epoch, `flushLeadMs` before each, the grid
   * startMerger() ticks on (and pg_cron's merge loop), so every replica's COPY
   * lands just before the merge that consumes it. false: flushIntervalMs after the
   * end of the previous flush. Size-triggered flushes (maxBatchSize) happen at once either way.
   */
  alignFlush?: boolean;
  /**
   * With alignFlush: how long before each grid instant the flush starts (default
   * 400 ms; at most half of flushIntervalMs), so that the COPY has committed when
   * the merge runs. Keep the clocks of app hosts in sync (NTP): the grid is the wall clock.
   */
  flushLeadMs?: number;
  /** Flush as soon as this many distinct agents are pending. Default 10,000. */
  maxBatchSize?: number;
  /**
   * Rows per COPY statement at most (default 50,000): a large backlog (after an
   * outage, or a resend) is written in several bounded COPYs, so none of them
   * runs into statement_timeout.
   */
  maxRowsPerCopy?: number;
  /** First retry delay after a failed COPY (doubled per failure, with jitter). Default 250 ms. */
  retryInitialDelayMs?: number;
  /** Longest retry delay. Default 10,000 ms. */
  retryMaxDelayMs?: number;
  /**
   * Deadline of every database operation (pool checkout included): a COPY, a
   * disconnect, a staging-epoch check. Past it the connection is destroyed and
   * the operation fails with a TimeoutError (a COPY is retried). Default 30,000 ms.
   */
  queryTimeoutMs?: number;
  /** How long close() keeps trying to flush what is pending. Default 15,000 ms. */
  closeTimeoutMs?: number;
  /**
   * How far ahead of this process's clock a timestamp may be before stage()
   * rejects it. Default 300,000 ms (5 min), the same bound the database applies.
   */
  maxClockSkewMs?: number;
  /**
   * Keep what was COPYed until a merge has consumed it, and resend it when
   * staging was reset (crash recovery or a failover empties UNLOGGED tables).
   * Default true. Costs up to one more snapshot per agent in memory.
   */
  resendAfterReset?: boolean;
  /**
   * How often, at most, the stager reads the staging epoch to release what merges
   * consumed and to notice a reset while it has nothing to COPY (it always checks
   * on a connection it has not used before). Default 15,000 ms: one small query.
   */
  resendCheckIntervalMs?: number;
  /** Where failures and recoveries are reported. Default: warnings and errors to stderr. */
  logger?: Logger;
  /** Called with every background failure (after logging). Errors it throws are logged, never rethrown. */
  onError?: (error: HeartbeatError) => void;
  /** Called after each successful COPY. Errors it throws are logged, never rethrown. */
  onFlush?: (info: { rows: number; durationMs: number }) => void;
}

/** Counters since the stager was created. */
export interface StagerStats {
  /** Updates accepted by stage(). */
  staged: number;
  /** Accepted updates folded into an already pending update of the same agent. */
  deduped: number;
  /** Updates stage() rejected as invalid. */
  rejected: number;
  /** Rows written to staging by successful COPYs. */
  rowsCopied: number;
  /** Successful COPYs. */
  copies: number;
  /** Failed COPYs (their rows were kept and retried). */
  failedCopies: number;
  /** Pending updates dropped because a newer disconnect was written. */
  droppedByDisconnect: number;
  /** Distinct agents not yet committed to staging (pending, or in a COPY in flight). */
  pendingAgents: number;
  /** Agents whose COPYed update is kept until a merge has consumed it (for a resend after a reset). */
  retainedAgents: number;
  /** Times staging was found reset (crash recovery, failover) and kept updates were resent. */
  resets: number;
  /** Agents' updates resent after resets. */
  resentAgents: number;
  /** Duration of the last successful COPY in milliseconds, or null. */
  lastCopyDurationMs: number | null;
}

/** What close() could not write. */
export interface CloseReport {
  /** Agents whose newest update was not written. */
  lost: number;
  /** Agents whose update was in a COPY that was cut off: written or not, unknown. */
  uncertain: number;
}

const STAGING = `${pg.escapeIdentifier('heartbeat')}.${pg.escapeIdentifier('agent_connection_staging')}`;
const COPY_SQL =
  `COPY ${STAGING} (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, ` +
  'disconnected_at, updated_at) FROM STDIN (FORMAT binary)';
// every timestamp crosses the wire as ISO 8601 UTC text or epoch microseconds: exact whatever the
// session's DateStyle, TimeZone or the process's TZ (node-postgres would render a Date in local time)
const DISCONNECT_SQL =
  'SELECT heartbeat.disconnect_agent($1::uuid, $2::timestamptz, $3::timestamptz, $4::uuid, $5::timestamptz, $6::timestamptz) AS applied';
const DISCONNECT_REPLICA_SQL = 'SELECT heartbeat.disconnect_replica($1::uuid, $2::timestamptz, $3::timestamptz)::text AS n';
const EPOCH_SQL =
  'SELECT epoch::text AS epoch, (extract(epoch FROM drained_through) * 1000000)::int8::text AS drained_us, ' +
  '(extract(epoch FROM checked_at) * 1000000)::int8::text AS checked_us FROM heartbeat.staging_epoch()';

/** The default flush interval: the merge interval (5 s), so that each replica COPYs once per merge. */
export const DEFAULT_FLUSH_INTERVAL_MS = 5000;
/** How long before each grid instant an aligned flush starts. */
export const DEFAULT_FLUSH_LEAD_MS = 400;

/**
 * From `now` (epoch ms), the time until the next instant `k * intervalMs - leadMs` (k whole) that is at least
 * `minAheadMs` away (default min(intervalMs / 4, 50) ms: a timer that fires a little early never flushes twice for
 * one instant).
 */
export function alignedDelay(now: number, intervalMs: number, leadMs: number, minAheadMs = Math.min(intervalMs / 4, 50)): number {
  return Math.ceil((now + leadMs + minAheadMs) / intervalMs) * intervalMs - leadMs - now;
}

const iso = (ms: number): string | null => (Number.isNaN(ms) ? null : new Date(ms).toISOString());
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Collects heartbeats in memory, newest per agent, and streams them to
 * heartbeat.agent_connection_staging with binary COPY.
 *
 * ```ts
 * await using stager = new HeartbeatStager({ connectionString }, { flushIntervalMs: 5000 });
 * stager.stage({ agentId, lastConnectedAt: new Date(), updatedAt: new Date() });
 * ```
 */
export class HeartbeatStager {
  readonly #pool: pg.Pool;
  readonly #ownsPool: boolean;
  readonly #logger: Logger;
  readonly #onError: ((error: HeartbeatError) => void) | undefined;
  readonly #onFlush: ((info: { rows: number; durationMs: number }) => void) | undefined;
  readonly #flushIntervalMs: number;
  readonly #alignFlush: boolean;
  readonly #flushLeadMs: number;
  readonly #maxBatchSize: number;
  readonly #maxRowsPerCopy: number;
  readonly #retryInitialDelayMs: number;
  readonly #retryMaxDelayMs: number;
  readonly #queryTimeoutMs: number;
  readonly #closeTimeoutMs: number;
  readonly #maxClockSkewMs: number;
  readonly #resendCheckIntervalMs: number;
  /** Aborted when close() gives up: every operation in flight is cut off, nothing queued runs. */
  readonly #abort = new AbortController();

  #pending = new Map<string, Snapshot>();
  /** COPYed updates no merge is known to have consumed yet (null: resends disabled). */
  readonly #retained: Retained | null;
  /** The chunk a COPY is writing, and how many of its agents are pending again meanwhile. */
  #inflightBatch: Map<string, Snapshot> | null = null;
  #inflightOverlap = 0;
  #inflight: Promise<void> | null = null;
  #timer: NodeJS.Timeout | null = null;
  #kickQueued = false;
  #failures = 0;
  #closed = false;
  #closing: Promise<void> | null = null;
  #closeReport: CloseReport = { lost: 0, uncertain: 0 };
  #stats = {
    staged: 0, deduped: 0, rejected: 0, rowsCopied: 0, copies: 0, failedCopies: 0, droppedByDisconnect: 0,
    resets: 0, resentAgents: 0, lastCopyDurationMs: null as number | null,
  };

  constructor(connection: ConnectionOptions, options: StagerOptions = {}) {
    if (options === null || typeof options !== 'object') throw new TypeError('pg-heartbeat: HeartbeatStager options must be an object');
    this.#logger = safeLogger(toLogger(options.logger));
    this.#onError = functionOption(options.onError, 'onError');
    this.#onFlush = functionOption(options.onFlush, 'onFlush');
    this.#flushIntervalMs = durationOption(options.flushIntervalMs, 'flushIntervalMs', DEFAULT_FLUSH_INTERVAL_MS);
    if (options.alignFlush !== undefined && typeof options.alignFlush !== 'boolean') {
      throw new InvalidOptionError('alignFlush', 'must be true or false');
    }
    this.#alignFlush = options.alignFlush ?? true;
    this.#flushLeadMs = Math.min(durationOption(options.flushLeadMs, 'flushLeadMs', DEFAULT_FLUSH_LEAD_MS, 0), this.#flushIntervalMs / 2);
    this.#maxBatchSize = countOption(options.maxBatchSize, 'maxBatchSize', 10_000);
    this.#maxRowsPerCopy = countOption(options.maxRowsPerCopy, 'maxRowsPerCopy', 50_000);
    this.#retryInitialDelayMs = durationOption(options.retryInitialDelayMs, 'retryInitialDelayMs', 250);
    this.#retryMaxDelayMs = durationOption(options.retryMaxDelayMs, 'retryMaxDelayMs', 10_000);
    this.#queryTimeoutMs = durationOption(options.queryTimeoutMs, 'queryTimeoutMs', 30_000);
    this.#closeTimeoutMs = durationOption(options.closeTimeoutMs, 'closeTimeoutMs', 15_000);
    this.#maxClockSkewMs = durationOption(options.maxClockSkewMs, 'maxClockSkewMs', 300_000);
    this.#resendCheckIntervalMs = durationOption(options.resendCheckIntervalMs, 'resendCheckIntervalMs', 15_000);
    this.#retained = options.resendAfterReset === false ? null : new Retained();
    setMaxListeners(0, this.#abort.signal); // every operation in flight listens to it
    const { pool, owned } = resolvePool(connection, this.#logger, 'pg-heartbeat stager');
    this.#pool = pool;
    this.#ownsPool = owned;
    this.#schedule(this.#flushDelay(true));
  }

  /**
   * Records an update in memory; never touches the database and never waits.
   * Keeps only the newest update per agent (and the earliest firstConnectedAt).
   * Throws {@link InvalidUpdateError} for bad input (nothing of it is kept) and
   * {@link ClosedError} after close().
   */
  stage(update: AgentUpdate): void {
    if (this.#closed) throw new ClosedError('HeartbeatStager');
    let snapshot: Snapshot;
    try {
      snapshot = toSnapshot(update, this.#maxClockSkewMs);
    } catch (err) {
      this.#stats.rejected++;
      throw err;
    }
    this.#stats.staged++;
    const kept = this.#pending.get(snapshot.agentId);
    if (kept === undefined) {
      this.#pending.set(snapshot.agentId, snapshot);
      if (this.#inflightBatch?.has(snapshot.agentId)) this.#inflightOverlap++;
      if (this.#pending.size >= this.#maxBatchSize) this.#kick();
    } else {
      this.#stats.deduped++;
      const winner = combine(kept, snapshot);
      if (winner !== kept) this.#pending.set(snapshot.agentId, winner);
    }
  }

  /**
   * Writes a disconnect straight to workspace_agents (heartbeat.disconnect_agent)
   * and drops this agent's pending update if it is not newer, passing on its
   * firstConnectedAt and lastConnectedAt (so an agent that connects and
   * disconnects between two merges still shows as disconnected, not as never
   * connected). Resolves to whether the row changed (false: unknown agent, or
   * the row is newer). Fails with a TimeoutError after queryTimeoutMs (the row
   * lock is waited for at most 2 s in the database).
   */
  async disconnect(update: AgentDisconnect): Promise<boolean> {
    if (this.#closed) throw new ClosedError('HeartbeatStager');
    const d = checkDisconnect(update, this.#maxClockSkewMs);
    const older = this.#pending.get(d.agentId);
    const first = older && older.updated <= d.updatedAt ? earliest(d.first, older.first) : d.first;
    const last = older && older.updated <= d.updatedAt && Number.isNaN(d.last) ? older.last : d.last;
    const applied = await this.#runRetryingConflicts('disconnect', async (client) => {
      const { rows } = await client.query<{ applied: boolean }>(DISCONNECT_SQL, [
        d.agentId, iso(d.disconnectedAt), iso(d.updatedAt), d.replicaId, iso(first), iso(last),
      ]);
      return rows[0]!.applied;
    });
    // drop the older pending update unless it learnt an earlier first connection meanwhile
    const kept = this.#pending.get(d.agentId);
    if (kept !== undefined && kept.updated <= d.updatedAt && Object.is(earliest(first, kept.first), first)) {
      this.#pending.delete(d.agentId);
      if (this.#inflightBatch?.has(d.agentId)) this.#inflightOverlap--;
      this.#stats.droppedByDisconnect++;
    }
    this.#retained?.dropOlder(d.agentId, d.updatedAt);
    return applied;
  }

  /**
   * Disconnects every agent whose row says it is connected through `replicaId`
   * (heartbeat.disconnect_replica), after flushing this stager, so that agents
   * which reconnected through this replica are staged first and kept connected.
   * Resolves to how many agents were disconnected.
   */
  async disconnectReplica(replicaId: string, at: { disconnectedAt?: Date; updatedAt?: Date } = {}): Promise<number> {
    if (this.#closed) throw new ClosedError('HeartbeatStager');
    const replica = canonicalUuid(replicaId, 'replicaId');
    const times = checkReplicaDisconnectTimes(at);
    const now = new Date();
    const d = checkDisconnect(
      { agentId: replica, disconnectedAt: times.disconnectedAt ?? now, updatedAt: times.updatedAt ?? times.disconnectedAt ?? now },
      this.#maxClockSkewMs,
    );
    await this.flush();
    return this.#runRetryingConflicts('disconnect_replica', async (client) => {
      const { rows } = await client.query<{ n: string }>(DISCONNECT_REPLICA_SQL, [replica, iso(d.disconnectedAt), iso(d.updatedAt)]);
      return Number(rows[0]!.n);
    });
  }

  /**
   * Resolves when every update staged before the call is committed in staging.
   * Rejects with a {@link HeartbeatError} if the COPY fails (the rows stay
   * pending and the background retry keeps trying).
   */
  async flush(): Promise<void> {
    await this.#inflight?.catch(() => {});
    if (this.#pending.size > 0) await this.#runFlush();
  }

  /**
   * Stops the background flush and makes a final flush, retried for up to
   * closeTimeoutMs; then ends the pool if the stager created it. Resolves within
   * closeTimeoutMs plus 5 s (the pool's end), even when the database is
   * unreachable; nothing is sent to the database after it resolves. What could
   * not be written is reported (logger and onError) and dropped: see
   * {@link closeReport}. Idempotent; stage() after close() throws.
   */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  /** The same as {@link close}. */
  stop(): Promise<void> {
    return this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** What the last close() could not write (zeros before close() or when everything was written). */
  closeReport(): CloseReport {
    return { ...this.#closeReport };
  }

  /** Counters since creation. */
  stats(): StagerStats {
    return { ...this.#stats, pendingAgents: this.#unwritten(), retainedAgents: this.#retained?.size ?? 0 };
  }

  #unwritten(): number {
    const inflight = this.#inflightBatch ? this.#inflightBatch.size - this.#inflightOverlap : 0;
    return this.#pending.size + inflight;
  }

  /** One database operation under the deadline, its error mapped. */
  /**
   * #run, again after a serialization failure or a deadlock (40001, 40P01), at most 3 attempts: in a
   * REPEATABLE READ or SERIALIZABLE session a disconnect fails that way when a status sweep commits during it
   * (docs/events.md); the statement rolled back and the direct writes are guarded by updated_at, so it is safe.
   */
  async #runRetryingConflicts<T>(what: string, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#run(what, fn);
      } catch (err) {
        const state = (err as { sqlState?: unknown }).sqlState;
        if ((state !== '40001' && state !== '40P01') || attempt >= 3 || this.#closed) throw err;
        await new Promise((r) => setTimeout(r, 20 * attempt));
      }
    }
  }

  async #run<T>(what: string, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    try {
      return await withClient(this.#pool, fn, { deadlineMs: this.#queryTimeoutMs, what, signal: this.#abort.signal });
    } catch (err) {
      throw toHeartbeatError(err, what);
    }
  }

  #schedule(delayMs: number): void {
    if (this.#timer) clearTimeout(this.#timer);
    if (this.#closed) return;
    this.#timer = setTimeout(() => this.#background(), Math.min(delayMs, MAX_TIMER_MS));
    this.#timer.unref();
  }

  /** Asks for an early flush (batch full), unless one is running or we are backing off. */
  #kick(): void {
    if (this.#kickQueued || this.#inflight || this.#failures > 0 || this.#closed) return;
    this.#kickQueued = true;
    setImmediate(() => {
      this.#kickQueued = false;
      if (!this.#inflight && this.#failures === 0) this.#schedule(0);
    });
  }

  #background(): void {
    this.#timer = null;
    if (this.#closed) return;
    let work: Promise<void>;
    if (this.#pending.size > 0) work = this.#runFlush();
    else if (this.#retained && this.#retained.size > 0 && this.#retained.checkDue(this.#resendCheckIntervalMs)) work = this.#checkProgress();
    else {
      this.#schedule(this.#flushDelay());
      return;
    }
    work.then(
      () => {
        if (this.#failures > 0) {
          this.#logger.info('COPY into staging recovered', { failedAttempts: this.#failures });
          this.#failures = 0;
        }
        this.#schedule(this.#pending.size >= this.#maxBatchSize ? 0 : this.#flushDelay());
      },
      (err: unknown) => {
        if (this.#closed) return;
        const error = toHeartbeatError(err, 'COPY into staging');
        this.#failures++;
        const delay = this.#backoff(this.#failures);
        this.#report(error, `${error.message}; retrying in ${delay} ms`, {
          attempt: this.#failures, pendingAgents: this.#unwritten(),
        });
        this.#schedule(delay);
      },
    );
  }

  /**
   * Time until the next background flush. Aligned: until the next flush instant (a multiple of flushIntervalMs since
   * the Unix epoch, minus the lead) at least a few ms away, so a timer that fires a little early never flushes twice
   * for one instant; the first one after creation at least half an interval away (a stager created just before an
   * instant has next to nothing to COPY). Otherwise one interval.
   */
  #flushDelay(first = false): number {
    if (!this.#alignFlush) return this.#flushIntervalMs;
    const F = this.#flushIntervalMs;
    return alignedDelay(Date.now(), F, this.#flushLeadMs, first ? F / 2 : undefined);
  }

  #backoff(failures: number): number {
    const base = Math.min(this.#retryMaxDelayMs, this.#retryInitialDelayMs * 2 ** Math.min(failures - 1, 20));
    return Math.round(base / 2 + Math.random() * (base / 2));
  }

  #report(err: HeartbeatError, message: string, meta: Record<string, unknown> = {}, level: 'warn' | 'error' = 'warn'): void {
    this.#logger[level](message, { ...meta, error: err });
    callHook(this.#onError, err, 'onError', this.#logger);
  }

  /** Runs the COPYs of everything pending, after any COPY already in flight. */
  #runFlush(): Promise<void> {
    const previous = this.#inflight;
    const run = (previous ? previous.catch(() => {}) : Promise.resolve()).then(() => this.#copyPending());
    this.#inflight = run;
    const clear = (): void => {
      if (this.#inflight === run) this.#inflight = null;
    };
    run.then(clear, clear);
    return run;
  }

  /** COPYs what is pending, in chunks of at most maxRowsPerCopy rows, each under the deadline. */
  async #copyPending(): Promise<void> {
    let budget = this.#pending.size;
    while (budget > 0 && this.#pending.size > 0) {
      const chunk = this.#takeChunk();
      budget -= chunk.size;
      this.#inflightBatch = chunk;
      this.#inflightOverlap = 0;
      const started = performance.now();
      let outcome: 'copied' | 'reset';
      try {
        outcome = await this.#run('COPY into staging', async (client) => {
          if (this.#retained && (await this.#checkEpoch(client)) === 'reset') return 'reset';
          const stream = client.query(copyFrom(COPY_SQL));
          await pipeline(Readable.from(encodeCopy(chunk.values()), { objectMode: false }), stream);
          return 'copied';
        });
      } catch (err) {
        this.#stats.failedCopies++;
        this.#restore(chunk);
        throw err;
      } finally {
        this.#inflightBatch = null;
        this.#inflightOverlap = 0;
      }
      if (outcome === 'reset') {
        // staging was emptied: this chunk goes back with everything kept for a resend
        this.#restore(chunk);
        budget += this.#resend();
        continue;
      }
      const durationMs = performance.now() - started;
      this.#stats.copies++;
      this.#stats.rowsCopied += chunk.size;
      this.#stats.lastCopyDurationMs = durationMs;
      this.#retained?.add(chunk);
      notify(this, { kind: 'copy', rows: chunk.size, durationMs });
      callHook(this.#onFlush, { rows: chunk.size, durationMs }, 'onFlush', this.#logger);
    }
    if (this.#pending.size >= this.#maxBatchSize && this.#failures === 0) this.#kick();
  }

  /** Moves up to maxRowsPerCopy pending updates into a chunk of their own. */
  #takeChunk(): Map<string, Snapshot> {
    if (this.#pending.size <= this.#maxRowsPerCopy) {
      const all = this.#pending;
      this.#pending = new Map();
      return all;
    }
    const chunk = new Map<string, Snapshot>();
    for (const [agentId, snapshot] of this.#pending) {
      chunk.set(agentId, snapshot);
      this.#pending.delete(agentId);
      if (chunk.size >= this.#maxRowsPerCopy) break;
    }
    return chunk;
  }

  /** Puts a failed chunk back, folding in anything newer staged meanwhile. */
  #restore(batch: Map<string, Snapshot>): void {
    for (const [agentId, snapshot] of batch) {
      const newer = this.#pending.get(agentId);
      if (newer === undefined) this.#pending.set(agentId, snapshot);
      else {
        // the pending one is newer (or folds in): keep the winner with the earliest first connection
        const winner = combine(snapshot, newer);
        this.#pending.set(agentId, winner);
      }
    }
  }

  /** Staging was reset: everything kept goes back into pending; returns how many agents. */
  #resend(): number {
    const kept = this.#retained!.takeAll();
    this.#restore(kept);
    this.#stats.resets++;
    this.#stats.resentAgents += kept.size;
    this.#logger.warn(
      `staging was reset (crash recovery or failover to another server): resending ${kept.size} agents' updates ` +
        'that no merge had consumed yet',
      { resent: kept.size },
    );
    return kept.size;
  }

  /**
   * On a connection not seen before (a crash or a failover always means new
   * connections), and every resendCheckIntervalMs: reads the staging epoch. A new
   * epoch means staging was reset; otherwise kept updates that every part's
   * merges have consumed since are released.
   */
  async #checkEpoch(client: pg.ClientBase): Promise<'same' | 'reset'> {
    const retained = this.#retained!;
    if (retained.knows(client) && !retained.checkDue(this.#resendCheckIntervalMs)) return 'same';
    const sent = performance.now();
    let rows: { epoch: string; drained_us: string | null; checked_us: string }[];
    try {
      ({ rows } = await client.query<{ epoch: string; drained_us: string | null; checked_us: string }>(EPOCH_SQL));
    } catch (err) {
      // a database migrated before pg-heartbeat 1.2 (a rolling upgrade): COPY works, resends cannot
      if ((err as { code?: unknown }).code !== '42883') throw err;
      if (!retained.unsupported) {
        this.#logger.warn('heartbeat.staging_epoch() is missing (the database predates pg-heartbeat 1.2): updates lost to a ' +
          'crash or failover of PostgreSQL cannot be resent until it is migrated');
      }
      retained.markUnsupported(client, sent);
      return 'same';
    }
    const row = rows[0]!;
    const changed = retained.observe(client, row.epoch, sent, row.drained_us === null ? null : Number(row.drained_us), Number(row.checked_us));
    return changed ? 'reset' : 'same';
  }

  /** The idle-time progress check: releases what merges consumed, and resends after a reset. */
  async #checkProgress(): Promise<void> {
    const outcome = await this.#run('staging epoch check', (client) => this.#checkEpoch(client));
    if (outcome === 'reset') {
      this.#resend();
      await this.#copyPending();
    }
  }

  async #shutdown(): Promise<void> {
    this.#closed = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    const deadlineAt = Date.now() + this.#closeTimeoutMs;
    const giveUp = setTimeout(() => this.#abort.abort(), this.#closeTimeoutMs);
    let lastError: unknown;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.flush();
        lastError = undefined;
        break;
      } catch (err) {
        lastError = err;
        const left = deadlineAt - Date.now();
        if (left <= 0 || this.#abort.signal.aborted) break;
        await sleep(Math.min(left, this.#backoff(attempt)));
      }
    }
    clearTimeout(giveUp);
    // from here on nothing reaches the database: a checkout still queued is released untouched
    const uncertain = this.#inflightBatch ? this.#inflightBatch.size - this.#inflightOverlap : 0;
    this.#abort.abort();
    this.#closeReport = { lost: this.#pending.size, uncertain };
    if (this.#closeReport.lost + uncertain > 0) {
      const error = toHeartbeatError(lastError ?? new ClosedError('HeartbeatStager', 'close timeout'), 'final flush');
      this.#report(
        error,
        `close(): final flush gave up after ${this.#closeTimeoutMs} ms; ${this.#closeReport.lost} agents' updates were not written` +
          (uncertain ? ` and ${uncertain} were in a COPY that was cut off (written or not)` : ''),
        { closeTimeoutMs: this.#closeTimeoutMs, lost: this.#closeReport.lost, uncertain },
        'error',
      );
    }
    await this.#inflight?.catch(() => {});
    if (this.#ownsPool) await endPool(this.#pool, 5000, this.#logger);
  }
}

import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { type ConnectionOptions, resolvePool, withClient } from './connection.ts';
import { encodeCopy } from './copy-encoder.ts';
import { ClosedError, type HeartbeatError, TimeoutError, toHeartbeatError } from './errors.ts';
import { toLogger, type Logger } from './logger.ts';
import { type AgentDisconnect, type AgentUpdate, checkDisconnect, combine, earliest, type Snapshot, toSnapshot } from './update.ts';

export interface StagerOptions {
  /**
   * Background flush period. Default 2000 ms: with heartbeats every 15 s and a
   * merge every 5 s, the worst case from heartbeat to workspace_agents is
   * 15 + 2 + 5 = 22 s, well inside the usual 30 s inactivity timeout, while one
   * COPY per 2 s per replica is fewer statements than the reference batcher.
   */
  flushIntervalMs?: number;
  /**
   * Flush as soon as this many distinct agents are pending. Default 10,000:
   * one COPY of 10k rows is ~1 MB and takes tens of milliseconds, so only a
   * replica serving far more than ~75k agents flushes early.
   */
  maxBatchSize?: number;
  /** First retry delay after a failed COPY (doubled per failure, with jitter). Default 250 ms. */
  retryInitialDelayMs?: number;
  /** Longest retry delay. Default 10,000 ms. */
  retryMaxDelayMs?: number;
  /** How long close() keeps trying to flush what is pending. Default 15,000 ms. */
  closeTimeoutMs?: number;
  /**
   * How far ahead of this process's clock a timestamp may be before stage()
   * rejects it. Default 300,000 ms (5 min), the same bound the database applies
   * (heartbeat.clock_horizon()), so a replica with a bad clock cannot freeze a row.
   */
  maxClockSkewMs?: number;
  /** Where failures and recoveries are reported. Default: warnings and errors to stderr. */
  logger?: Logger;
  /** Called with every background failure (after logging). Errors it throws are logged, never rethrown. */
  onError?: (error: HeartbeatError) => void;
  /** Called after each successful COPY. */
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
  /** Duration of the last successful COPY in milliseconds, or null. */
  lastCopyDurationMs: number | null;
}

const STAGING = `${pg.escapeIdentifier('heartbeat')}.${pg.escapeIdentifier('agent_connection_staging')}`;
const COPY_SQL =
  `COPY ${STAGING} (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, ` +
  'disconnected_at, updated_at) FROM STDIN (FORMAT binary)';
const DISCONNECT_SQL = 'SELECT heartbeat.disconnect_agent($1, $2, $3, $4, $5, $6) AS applied';
const toDate = (ms: number): Date | null => (Number.isNaN(ms) ? null : new Date(ms));

function timeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`${what} did not finish within ${ms} ms`, { code: 'TIMEOUT' })), ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Collects heartbeats in memory, newest per agent, and streams them to
 * heartbeat.agent_connection_staging with one binary COPY per flush.
 *
 * ```ts
 * await using stager = new HeartbeatStager({ connectionString }, { flushIntervalMs: 2000 });
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
  readonly #maxBatchSize: number;
  readonly #retryInitialDelayMs: number;
  readonly #retryMaxDelayMs: number;
  readonly #closeTimeoutMs: number;
  readonly #maxClockSkewMs: number;

  #pending = new Map<string, Snapshot>();
  /** The batch a COPY is writing, and how many of its agents are pending again meanwhile. */
  #inflightBatch: Map<string, Snapshot> | null = null;
  #inflightOverlap = 0;
  #inflight: Promise<void> | null = null;
  #timer: NodeJS.Timeout | null = null;
  #kickQueued = false;
  #failures = 0;
  #closed = false;
  #closing: Promise<void> | null = null;
  #stats = {
    staged: 0, deduped: 0, rejected: 0, rowsCopied: 0, copies: 0, failedCopies: 0, droppedByDisconnect: 0,
    lastCopyDurationMs: null as number | null,
  };

  constructor(connection: ConnectionOptions, options: StagerOptions = {}) {
    this.#logger = toLogger(options.logger);
    this.#onError = options.onError;
    this.#onFlush = options.onFlush;
    this.#flushIntervalMs = positive(options.flushIntervalMs ?? 2000, 'flushIntervalMs');
    this.#maxBatchSize = positive(options.maxBatchSize ?? 10_000, 'maxBatchSize');
    this.#retryInitialDelayMs = positive(options.retryInitialDelayMs ?? 250, 'retryInitialDelayMs');
    this.#retryMaxDelayMs = positive(options.retryMaxDelayMs ?? 10_000, 'retryMaxDelayMs');
    this.#closeTimeoutMs = positive(options.closeTimeoutMs ?? 15_000, 'closeTimeoutMs');
    this.#maxClockSkewMs = positive(options.maxClockSkewMs ?? 300_000, 'maxClockSkewMs');
    const { pool, owned } = resolvePool(connection, this.#logger, 'pg-heartbeat stager');
    this.#pool = pool;
    this.#ownsPool = owned;
    this.#schedule(this.#flushIntervalMs);
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
   * the row is newer).
   */
  async disconnect(update: AgentDisconnect): Promise<boolean> {
    if (this.#closed) throw new ClosedError('HeartbeatStager');
    const d = checkDisconnect(update, this.#maxClockSkewMs);
    const older = this.#pending.get(d.agentId);
    const first = older && older.updated <= d.updatedAt ? earliest(d.first, older.first) : d.first;
    const last = older && older.updated <= d.updatedAt && Number.isNaN(d.last) ? older.last : d.last;
    let applied: boolean;
    try {
      const { rows } = await this.#pool.query<{ applied: boolean }>(DISCONNECT_SQL, [
        d.agentId, new Date(d.disconnectedAt), new Date(d.updatedAt), d.replicaId, toDate(first), toDate(last),
      ]);
      applied = rows[0]!.applied;
    } catch (err) {
      throw toHeartbeatError(err, 'disconnect');
    }
    // drop the older pending update unless it learnt an earlier first connection meanwhile
    const kept = this.#pending.get(d.agentId);
    if (kept !== undefined && kept.updated <= d.updatedAt && Object.is(earliest(first, kept.first), first)) {
      this.#pending.delete(d.agentId);
      if (this.#inflightBatch?.has(d.agentId)) this.#inflightOverlap--;
      this.#stats.droppedByDisconnect++;
    }
    return applied;
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
   * closeTimeoutMs; then ends the pool if the stager created it. Idempotent;
   * stage() after close() throws. Pending updates that could not be written
   * in time are reported (logger and onError) and dropped.
   */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Counters since creation. */
  stats(): StagerStats {
    const inflight = this.#inflightBatch ? this.#inflightBatch.size - this.#inflightOverlap : 0;
    return { ...this.#stats, pendingAgents: this.#pending.size + inflight };
  }

  #schedule(delayMs: number): void {
    if (this.#timer) clearTimeout(this.#timer);
    if (this.#closed) return;
    this.#timer = setTimeout(() => this.#background(), delayMs);
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
    if (this.#pending.size === 0) {
      this.#schedule(this.#flushIntervalMs);
      return;
    }
    this.#runFlush().then(
      () => {
        if (this.#failures > 0) {
          this.#logger.info('COPY into staging recovered', { failedAttempts: this.#failures });
          this.#failures = 0;
        }
        this.#schedule(this.#pending.size >= this.#maxBatchSize ? 0 : this.#flushIntervalMs);
      },
      (err: HeartbeatError) => {
        this.#failures++;
        const delay = this.#backoff(this.#failures);
        this.#report(err, `COPY into staging failed; retrying in ${delay} ms`, {
          attempt: this.#failures, pendingAgents: this.#pending.size,
        });
        this.#schedule(delay);
      },
    );
  }

  #backoff(failures: number): number {
    const base = Math.min(this.#retryMaxDelayMs, this.#retryInitialDelayMs * 2 ** Math.min(failures - 1, 20));
    return Math.round(base / 2 + Math.random() * (base / 2));
  }

  #report(err: HeartbeatError, message: string, meta: Record<string, unknown> = {}, level: 'warn' | 'error' = 'warn'): void {
    this.#logger[level](message, { ...meta, error: err });
    if (!this.#onError) return;
    try {
      this.#onError(err);
    } catch (hookErr) {
      this.#logger.error('onError hook threw', { error: hookErr });
    }
  }

  /** Runs one COPY of everything pending, after any COPY already in flight. */
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

  async #copyPending(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = this.#pending;
    this.#pending = new Map();
    this.#inflightBatch = batch;
    this.#inflightOverlap = 0;
    const started = performance.now();
    try {
      await withClient(this.#pool, async (client) => {
        const stream = client.query(copyFrom(COPY_SQL));
        await pipeline(Readable.from(encodeCopy(batch.values()), { objectMode: false }), stream);
      });
    } catch (err) {
      this.#stats.failedCopies++;
      this.#restore(batch);
      throw toHeartbeatError(err, 'COPY into staging');
    } finally {
      this.#inflightBatch = null;
      this.#inflightOverlap = 0;
    }
    const durationMs = performance.now() - started;
    this.#stats.copies++;
    this.#stats.rowsCopied += batch.size;
    this.#stats.lastCopyDurationMs = durationMs;
    this.#onFlush?.({ rows: batch.size, durationMs });
    if (this.#pending.size >= this.#maxBatchSize && this.#failures === 0) this.#kick();
  }

  /** Puts a failed batch back, folding in anything newer staged meanwhile. */
  #restore(batch: Map<string, Snapshot>): void {
    const newer = this.#pending;
    this.#pending = batch;
    for (const [agentId, snapshot] of newer) {
      const kept = batch.get(agentId);
      if (kept === undefined) batch.set(agentId, snapshot);
      else {
        const winner = combine(kept, snapshot);
        if (winner !== kept) batch.set(agentId, winner);
      }
    }
  }

  async #shutdown(): Promise<void> {
    this.#closed = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    const deadline = Date.now() + this.#closeTimeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        await timeout(this.flush(), Math.max(1, deadline - Date.now()), 'final flush');
        break;
      } catch (err) {
        const left = deadline - Date.now();
        const heartbeatError = toHeartbeatError(err, 'final flush');
        if (left <= 0 || heartbeatError instanceof TimeoutError) {
          const lost = this.stats().pendingAgents;
          this.#report(heartbeatError, `close(): final flush gave up; ${lost} agents' updates were not written`, {
            closeTimeoutMs: this.#closeTimeoutMs,
          }, 'error');
          break;
        }
        await sleep(Math.min(left, this.#backoff(attempt)));
      }
    }
    if (this.#ownsPool) {
      await timeout(this.#pool.end(), 5000, 'closing the pool').catch((err: unknown) =>
        this.#logger.warn('pool did not close cleanly', { error: err }),
      );
    }
  }
}

function positive(value: number, name: string): number {
  if (!Number.isFinite(value) || value <= 0) throw new RangeError(`pg-heartbeat: ${name} must be a positive number, got ${value}`);
  return value;
}

/**
 * startMerger(): runs the merge every few seconds from the application. Safe to
 * start in every replica:
 *   - each part of staging has its own advisory lock, taken with
 *     pg_try_advisory_xact_lock: a part being merged elsewhere is skipped at once;
 *   - a part another replica merged (and left empty) less than ~0.7 interval ago
 *     is skipped too, so replicas do not multiply merges;
 *   - every call has a deadline: a merge stuck on a half-open connection fails
 *     with a TimeoutError, its connection is destroyed, and the next tick uses a
 *     fresh one;
 *   - a backlog is drained in bounded statements (max_rows each), in parallel
 *     over the parts when one call takes a large share of the interval.
 * A failed merge is logged, passed to `onError` and retried on the next tick; it
 * never rejects anything, and a hook or logger that throws is contained.
 */
import { randomUUID } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import type pg from 'pg';
import { endPool, resolvePool, withClient, type ConnectionOptions } from './connection.ts';
import { toHeartbeatError, type HeartbeatError } from './errors.ts';
import { checkTimingInvariant, type TimingOptions } from './invariant.ts';
import { toLogger, type Logger } from './logger.ts';
import { addMergeResults, emptyMergeResult, mergeStatement, sweepAfterMerge, type MergeResult } from './merge.ts';
import { notify } from './observers.ts';
import { countOption, durationOption, fractionOption, functionOption } from './options.ts';
import { callHook, safeLogger } from './safe-logger.ts';

export interface MergerOptions extends Omit<TimingOptions, 'mergeIntervalMs'> {
  /**
   * Time from the start of one merge to the start of the next (default 5 000 ms). A merge that takes
   * longer than that is followed at once by the next, never overlapped.
   */
  intervalMs?: number;
  /** Random spread of each interval, as a fraction of it (default 0.1: ±10 %), so replicas drift apart. */
  jitter?: number;
  /** Staged rows one merge statement consumes at most (default: heartbeat.settings.max_rows_per_merge). */
  maxRows?: number;
  /**
   * Deadline of each merge statement, pool checkout included (default 30 000 ms); past it the
   * connection is destroyed and the merge counts as failed.
   */
  queryTimeoutMs?: number;
  /**
   * How many parts of staging to merge at once when the backlog is large (each on its own
   * connection). Default: the number of parts, at most 4, for a pool pg-heartbeat creates; 1 for
   * your pool (raise it if the pool has room).
   */
  parallelism?: number;
  /** How long stop() waits for a merge in progress before cutting it off (default 10 000 ms). */
  stopTimeoutMs?: number;
  logger?: Logger;
  /** Called after every tick that ran (also those that skipped parts merged elsewhere). */
  onMerge?: (report: MergeReport) => void;
  /** Called when a merge failed; it is retried on the next tick. */
  onError?: (error: HeartbeatError) => void;
  /** application_name of the pool pg-heartbeat creates from a connection string. */
  applicationName?: string;
}

/** One tick's counts plus when it started and how long it took (client side, round trips included). */
export interface MergeReport extends MergeResult {
  startedAt: Date;
  durationMs: number;
  /** Whether the tick merged the parts in parallel. */
  parallel: boolean;
}

export interface MergerStats {
  /** Ticks that merged at least one part. */
  merges: number;
  /** Ticks that merged nothing because every part was being merged elsewhere. */
  skippedConcurrent: number;
  /** Ticks that merged nothing because another merger had just merged every part. */
  skippedRecent: number;
  /** Failed merges. */
  failures: number;
  /** Failures since the last successful merge. */
  consecutiveFailures: number;
  /** Staged rows consumed since start. */
  rowsConsumed: number;
  /** Snapshots moved to heartbeat.dead_letters since start. */
  deadLettered: number;
  /** Status changes recorded in heartbeat.status_events by this merger's merges and sweeps since start. */
  statusEvents: number;
  /** Sweeps (heartbeat.sweep_status(), after each merge) that failed; the next tick sweeps again. */
  sweepFailures: number;
  /** Agents whose row the merges updated since start. */
  agentsUpdated: number;
  /** Staged rows skipped since start: older than the agent's row (stale), no such agent (unknown), invalid values. */
  skippedStale: number;
  skippedUnknown: number;
  skippedInvalid: number;
  /** Staged rows left for a later merge because the agent's row was locked, since start. */
  deferredLocked: number;
}

export interface Merger extends AsyncDisposable {
  /**
   * Stops the loop: waits up to stopTimeoutMs for a merge in progress (then cuts it off), then
   * ends the pool if pg-heartbeat created it. Resolves within stopTimeoutMs + 5 s even when the
   * database is unreachable; nothing is sent to the database after it resolves. Idempotent.
   */
  close(): Promise<void>;
  /** @deprecated the same as close() */
  stop(): Promise<void>;
  readonly stopped: boolean;
  stats(): MergerStats;
}

const DEFAULT_INTERVAL_MS = 5_000;
/** The fewest staged rows per statement the merger goes down to after statement timeouts. */
const MIN_ROWS_PER_STATEMENT = 1_000;
const DEFAULT_JITTER = 0.1;

/** Starts the merge loop; the first merge runs after one (jittered) interval. */
export function startMerger(connection: ConnectionOptions, options: MergerOptions = {}): Merger {
  const intervalMs = durationOption(options.intervalMs, 'intervalMs', DEFAULT_INTERVAL_MS);
  const jitter = fractionOption(options.jitter, 'jitter', DEFAULT_JITTER);
  const logger = safeLogger(toLogger(options.logger));
  // only checked against each other (the invariant), but range-checked like every option
  const timingMs = (name: 'heartbeatIntervalMs' | 'flushIntervalMs' | 'inactiveTimeoutMs'): number | undefined =>
    options[name] === undefined ? undefined : durationOption(options[name], name, 0, 0);
  const timing = checkTimingInvariant({
    heartbeatIntervalMs: timingMs('heartbeatIntervalMs'),
    flushIntervalMs: timingMs('flushIntervalMs'),
    inactiveTimeoutMs: timingMs('inactiveTimeoutMs'),
    mergeIntervalMs: intervalMs * (1 + jitter),
  });
  if (!timing.ok) logger.warn(`merger timing: ${timing.message}`);
  const config: LoopConfig = {
    intervalMs,
    jitter,
    maxRows: options.maxRows === undefined ? null : countOption(options.maxRows, 'maxRows', 0),
    queryTimeoutMs: durationOption(options.queryTimeoutMs, 'queryTimeoutMs', 30_000),
    stopTimeoutMs: durationOption(options.stopTimeoutMs, 'stopTimeoutMs', 10_000),
    parallelism: options.parallelism === undefined ? undefined : countOption(options.parallelism, 'parallelism', 1, 1, 64),
    onMerge: functionOption(options.onMerge, 'onMerge'),
    onError: functionOption(options.onError, 'onError'),
  };
  const { pool, owned } = resolvePool(connection, logger, options.applicationName ?? 'pg-heartbeat merger', 4);
  return new MergeLoop(pool, owned, logger, config);
}

interface LoopConfig {
  intervalMs: number;
  jitter: number;
  maxRows: number | null;
  queryTimeoutMs: number;
  stopTimeoutMs: number;
  parallelism: number | undefined;
  onMerge: ((report: MergeReport) => void) | undefined;
  onError: ((error: HeartbeatError) => void) | undefined;
}

class MergeLoop implements Merger {
  readonly #stats: MergerStats = {
    merges: 0, skippedConcurrent: 0, skippedRecent: 0, failures: 0, consecutiveFailures: 0, rowsConsumed: 0, deadLettered: 0,
    agentsUpdated: 0, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0, statusEvents: 0, sweepFailures: 0,
  };
  readonly #abort = new AbortController();
  /** Who this merger is, to the database: it skips parts other mergers merged just now, never for its own merges. */
  readonly #id = `startMerger ${randomUUID()}`;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopping: Promise<void> | undefined;
  /** Merge the parts in parallel on the next tick (the last one was long, or left rows). */
  #fanOut = false;
  /** The lock episode last warned about (holder pid and since when), so each is warned once. */
  #warnedLock: string | undefined;
  /** Staged rows per statement: the maxRows option, halved each time the server's statement_timeout cuts one off. */
  #maxRows: number | null;

  /**
   * The least time between two status sweeps asked of the merge (sql/018): the gap the skip-recent check uses,
   * so replicas sweep about once per interval between them, and each merger at least once per own tick.
   */
  get #sweepMinGapMs(): number {
    return Math.round(this.config.intervalMs * (1 - this.config.jitter) * 0.8);
  }

  constructor(
    private readonly pool: pg.Pool,
    private readonly owned: boolean,
    private readonly logger: Logger,
    private readonly config: LoopConfig,
  ) {
    setMaxListeners(0, this.#abort.signal); // every merge in flight listens to it
    this.#maxRows = config.maxRows;
    this.#schedule();
  }

  get stopped(): boolean {
    return this.#stopping !== undefined;
  }

  stats(): MergerStats {
    return { ...this.#stats };
  }

  close(): Promise<void> {
    this.#stopping ??= this.#shutdown();
    return this.#stopping;
  }

  stop(): Promise<void> {
    return this.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #shutdown(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#running) {
      const cutOff = setTimeout(() => this.#abort.abort(), this.config.stopTimeoutMs);
      await this.#running;
      clearTimeout(cutOff);
    }
    this.#abort.abort(); // nothing queued runs after this
    if (this.owned) await endPool(this.pool, 5000, this.logger);
  }

  /** Schedules the next tick `interval ± jitter` after `since` (the last tick's start), at once if that is past. */
  #schedule(since = performance.now(), now = false): void {
    if (this.#stopping) return;
    const { intervalMs, jitter } = this.config;
    const delay = now ? 0 : since + intervalMs * (1 + jitter * (2 * Math.random() - 1)) - performance.now();
    this.#timer = setTimeout(() => this.#tick(), Math.max(0, delay));
    this.#timer.unref();
  }

  #tick(): void {
    this.#timer = undefined;
    if (this.#stopping) return;
    const started = performance.now();
    this.#running = this.#mergeOnce().then((leftRows) => {
      this.#running = undefined;
      this.#schedule(started, leftRows);
    });
  }

  /** One tick; never rejects. Resolves to whether rows were left (merge again at once). */
  async #mergeOnce(): Promise<boolean> {
    const startedAt = new Date();
    const t0 = performance.now();
    const { intervalMs, jitter } = this.config;
    // parts another replica merged less than this long ago (and left empty) are skipped
    const minIntervalMs = Math.round(intervalMs * (1 - jitter) * 0.8);
    // a tick drains for at most one interval, then lets the next tick start
    const budgetEnd = t0 + intervalMs;
    let result: MergeResult;
    const parallel = this.#fanOut;
    try {
      result = parallel
        ? await this.#mergeParallel(minIntervalMs, budgetEnd)
        : await this.#mergeSeries(minIntervalMs, budgetEnd);
    } catch (err) {
      const error = toHeartbeatError(err, 'merge');
      if (this.#stopping && this.#abort.signal.aborted) return false;
      this.#stats.failures++;
      this.#stats.consecutiveFailures++;
      this.logger.error(`${error.message}; retrying in about ${Math.round(intervalMs)} ms`, {
        error,
        consecutiveFailures: this.#stats.consecutiveFailures,
      });
      callHook(this.config.onError, error, 'onError', this.logger);
      return false;
    }
    const durationMs = Math.round((performance.now() - t0) * 10) / 10;
    this.#stats.consecutiveFailures = 0;
    this.#stats.rowsConsumed += result.rowsConsumed;
    this.#stats.deadLettered += result.deadLettered;
    this.#stats.agentsUpdated += result.agentsUpdated;
    this.#stats.skippedStale += result.skippedStale;
    this.#stats.skippedUnknown += result.skippedUnknown;
    this.#stats.skippedInvalid += result.skippedInvalid;
    this.#stats.deferredLocked += result.deferredLocked;
    if (result.partsMerged > 0) this.#stats.merges++;
    else if (result.partsSkippedConcurrent > 0) this.#stats.skippedConcurrent++;
    else this.#stats.skippedRecent++;
    this.#watchLocks(result);
    if (!result.more && !result.swept && !this.#stopping) await this.#sweep(result);
    this.#stats.statusEvents += result.statusEvents;
    if (result.deadLettered > 0) {
      this.logger.warn(`${result.deadLettered} staged snapshot(s) could not be applied and were moved to heartbeat.dead_letters`, {
        deadLettered: result.deadLettered,
      });
    }
    const { parallelism } = this.config;
    // fan out when a tick takes a large share of the interval or leaves rows; back to one call when it is quick again
    if ((parallelism ?? 2) > 1) {
      if (result.more || durationMs > intervalMs * 0.5) this.#fanOut = true;
      else if (durationMs < intervalMs * 0.2) this.#fanOut = false;
    }
    const report: MergeReport = { ...result, startedAt, durationMs, parallel };
    if (result.partsMerged > 0) {
      const { startedAt: _s, partsWithMore: _p, lockBusySince: _l, ...counts } = report;
      this.logger.info('merged staged heartbeats', counts);
    } else {
      this.logger.debug('merge skipped: every part was merged elsewhere', { durationMs });
    }
    notify(this, { kind: 'merge', report });
    callHook(this.config.onMerge, report, 'onMerge', this.logger);
    return result.more;
  }

  /** Every part in one call, again while rows are left and the tick's budget lasts. */
  async #mergeSeries(minIntervalMs: number, budgetEnd: number): Promise<MergeResult> {
    const total = emptyMergeResult();
    let first = true;
    for (;;) {
      const r = await this.#statement({ part: null, minIntervalMs: first ? minIntervalMs : null });
      addMergeResults(total, r);
      total.parts = r.parts;
      total.partsWithMore = r.partsWithMore;
      total.more = r.more;
      total.skippedConcurrent = first ? r.skippedConcurrent : total.skippedConcurrent && r.skippedConcurrent;
      first = false;
      if (!r.more || performance.now() > budgetEnd || this.#stopping) return total;
    }
  }

  /** The parts in parallel (at most `parallelism` at once), each drained while the budget lasts. */
  async #mergeParallel(minIntervalMs: number, budgetEnd: number): Promise<MergeResult> {
    // the first call also tells how many parts there are, and merges them all if the backlog is gone
    const total = await this.#mergeSeries(minIntervalMs, performance.now());
    const parts = total.parts;
    if (!total.more) return total;
    const limit = Math.min(this.config.parallelism ?? (this.owned ? 4 : 1), parts);
    const queue = [...total.partsWithMore];
    const workers = Array.from({ length: Math.max(1, limit) }, async () => {
      for (let part = queue.shift(); part !== undefined; part = queue.shift()) {
        for (;;) {
          const r = await this.#statement({ part, minIntervalMs: null });
          addMergeResults(total, r);
          if (!r.more || performance.now() > budgetEnd || this.#stopping) {
            if (r.more) total.partsWithMore.push(part);
            break;
          }
        }
      }
    });
    total.partsWithMore = [];
    const outcomes = await Promise.allSettled(workers);
    const failed = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
    total.more = total.partsWithMore.length > 0;
    if (failed) throw failed.reason;
    return total;
  }

  async #statement(args: { part: number | null; minIntervalMs: number | null }): Promise<MergeResult> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await withClient(
          this.pool,
          (client) => mergeStatement(client, this.pool, {
            maxRows: this.#maxRows, merger: this.#id, ownTransaction: true, sweepMinGapMs: this.#sweepMinGapMs, ...args,
          }),
          { deadlineMs: this.config.queryTimeoutMs, what: 'merge', signal: this.#abort.signal },
        );
      } catch (err) {
        // the server's statement_timeout cut a merge statement short (a large backlog on a busy
        // server): it rolled back, nothing lost; merge fewer rows per statement from now on
        if ((err as { code?: unknown }).code !== '57014' || attempt > 8 || this.#stopping) throw err;
        const before = this.#maxRows ?? (await this.#defaultMaxRows());
        this.#maxRows = Math.max(MIN_ROWS_PER_STATEMENT, Math.floor(before / 2));
        if (this.#maxRows === before) throw err;
        this.logger.warn(
          `a merge statement hit the server's statement_timeout; this merger now merges at most ${this.#maxRows} staged rows per statement`,
          { maxRows: this.#maxRows },
        );
      }
    }
  }

  /**
   * heartbeat.sweep_status() after a merge: the time-based status changes and the publication
   * of pending events. Its failure is logged and counted, never fails the tick: the next sweep
   * covers the whole time since the last one, so nothing is lost, only later.
   */
  async #sweep(result: MergeResult): Promise<void> {
    try {
      await withClient(this.pool, (client) => sweepAfterMerge(client, this.pool, result), {
        deadlineMs: this.config.queryTimeoutMs, what: 'heartbeat.sweep_status', signal: this.#abort.signal,
      });
    } catch (err) {
      if (this.#stopping && this.#abort.signal.aborted) return;
      this.#stats.sweepFailures++;
      const error = toHeartbeatError(err, 'heartbeat.sweep_status');
      this.logger.warn(`${error.message}; the next tick sweeps again`, { error });
    }
  }

  /** heartbeat.settings.max_rows_per_merge (what a merge with no maxRows uses). */
  async #defaultMaxRows(): Promise<number> {
    const rows = await withClient(
      this.pool,
      async (client) => (await client.query<{ n: number }>('SELECT max_rows_per_merge AS n FROM heartbeat.settings')).rows,
      { deadlineMs: this.config.queryTimeoutMs, what: 'reading heartbeat.settings', signal: this.#abort.signal },
    );
    return rows[0]?.n ?? 50_000;
  }

  /** A part lock taken for longer than an interval (a merge held open in someone's transaction?) is a warning, once. */
  #watchLocks(result: MergeResult): void {
    if (result.lockBusySince === null) {
      this.#warnedLock = undefined;
      return;
    }
    const busyMs = Date.now() - result.lockBusySince.getTime();
    const episode = `${result.lockHolderPid}@${result.lockBusySince.getTime()}`;
    if (busyMs > this.config.intervalMs && this.#warnedLock !== episode) {
      this.#warnedLock = episode;
      this.logger.warn(
        `a merge lock of staging has been held for ${Math.round(busyMs / 1000)} s by backend ${result.lockHolderPid ?? '?'}: ` +
          'merges of that part wait for it (a merge left open in a transaction? see heartbeat.status)',
        { lockHolderPid: result.lockHolderPid, lockBusySince: result.lockBusySince.toISOString(), busyMs },
      );
    }
  }
}

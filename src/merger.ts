/**
 * startMerger(): runs heartbeat.merge_agent_connections() every few seconds
 * from the application. Safe to start in every replica: the merge takes a
 * transaction-scoped advisory lock with pg_try_advisory_xact_lock, so at most
 * one merge runs database-wide and the others return at once
 * (`skippedConcurrent`), without waiting. A failed merge is logged, passed to
 * `onError` and retried on the next tick; it never rejects anything.
 */
import type pg from 'pg';
import { resolvePool, type ConnectionOptions } from './connection.ts';
import { toHeartbeatError, type HeartbeatError } from './errors.ts';
import { checkTimingInvariant, type TimingOptions } from './invariant.ts';
import { toLogger, type Logger } from './logger.ts';
import { mergeNow, type MergeResult } from './merge.ts';

export interface MergerOptions extends Omit<TimingOptions, 'mergeIntervalMs'> {
  /**
   * Time from the start of one merge to the start of the next (default 5 000 ms). A merge that takes
   * longer than that is followed at once by the next, never overlapped.
   */
  intervalMs?: number;
  /** Random spread of each interval, as a fraction of it (default 0.1: ±10 %), so replicas drift apart. */
  jitter?: number;
  logger?: Logger;
  /** Called after every merge that ran (also those skipped because another replica was merging). */
  onMerge?: (report: MergeReport) => void;
  /** Called when a merge failed; it is retried on the next tick. */
  onError?: (error: HeartbeatError) => void;
  /** application_name of the pool pg-heartbeat creates from a connection string. */
  applicationName?: string;
}

/** One merge's counts plus when it started and how long it took (client side, round trip included). */
export interface MergeReport extends MergeResult {
  startedAt: Date;
  durationMs: number;
}

export interface MergerStats {
  /** Merges that ran (did work or found nothing to do). */
  merges: number;
  /** Ticks that returned at once because another merge was running. */
  skippedConcurrent: number;
  /** Failed merges. */
  failures: number;
  /** Failures since the last successful merge. */
  consecutiveFailures: number;
}

export interface Merger extends AsyncDisposable {
  /** Stops the loop: waits for a merge in progress, then ends the pool if pg-heartbeat created it. Idempotent. */
  stop(): Promise<void>;
  readonly stopped: boolean;
  stats(): MergerStats;
}

const DEFAULT_INTERVAL_MS = 5_000;
const DEFAULT_JITTER = 0.1;

/** Starts the merge loop; the first merge runs after one (jittered) interval. */
export function startMerger(connection: ConnectionOptions, options: MergerOptions = {}): Merger {
  const intervalMs = options.intervalMs ?? DEFAULT_INTERVAL_MS;
  const jitter = options.jitter ?? DEFAULT_JITTER;
  if (!Number.isFinite(intervalMs) || intervalMs <= 0) throw new RangeError('startMerger: intervalMs must be a positive number');
  if (!Number.isFinite(jitter) || jitter < 0 || jitter >= 1) throw new RangeError('startMerger: jitter must be in [0, 1)');
  const logger = toLogger(options.logger);
  const timing = checkTimingInvariant({
    heartbeatIntervalMs: options.heartbeatIntervalMs,
    flushIntervalMs: options.flushIntervalMs,
    inactiveTimeoutMs: options.inactiveTimeoutMs,
    mergeIntervalMs: intervalMs * (1 + jitter),
  });
  if (!timing.ok) logger.warn(`merger timing: ${timing.message}`);
  const { pool, owned } = resolvePool(connection, logger, options.applicationName ?? 'pg-heartbeat merger');
  return new MergeLoop(pool, owned, intervalMs, jitter, logger, options);
}

class MergeLoop implements Merger {
  readonly #stats: MergerStats = { merges: 0, skippedConcurrent: 0, failures: 0, consecutiveFailures: 0 };
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopping: Promise<void> | undefined;

  constructor(
    private readonly pool: pg.Pool,
    private readonly owned: boolean,
    private readonly intervalMs: number,
    private readonly jitter: number,
    private readonly logger: Logger,
    private readonly options: MergerOptions,
  ) {
    this.#schedule();
  }

  get stopped(): boolean {
    return this.#stopping !== undefined;
  }

  stats(): MergerStats {
    return { ...this.#stats };
  }

  stop(): Promise<void> {
    this.#stopping ??= this.#shutdown();
    return this.#stopping;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  async #shutdown(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#running;
    if (this.owned) await this.pool.end().catch((err: unknown) => this.logger.warn('ending the merger pool failed', { error: err }));
  }

  /** Schedules the next tick `interval ± jitter` after `since` (the last merge's start), at once if that is past. */
  #schedule(since = performance.now()): void {
    if (this.#stopping) return;
    const delay = since + this.intervalMs * (1 + this.jitter * (2 * Math.random() - 1)) - performance.now();
    this.#timer = setTimeout(() => this.#tick(), Math.max(0, delay));
    this.#timer.unref();
  }

  #tick(): void {
    this.#timer = undefined;
    if (this.#stopping) return;
    const started = performance.now();
    this.#running = this.#mergeOnce().finally(() => {
      this.#running = undefined;
      this.#schedule(started);
    });
  }

  /** One merge; never rejects. */
  async #mergeOnce(): Promise<void> {
    const startedAt = new Date();
    const t0 = performance.now();
    let report: MergeReport;
    try {
      const result = await mergeNow(this.pool);
      report = { ...result, startedAt, durationMs: Math.round((performance.now() - t0) * 10) / 10 };
    } catch (err) {
      const error = toHeartbeatError(err, 'merge');
      this.#stats.failures++;
      this.#stats.consecutiveFailures++;
      this.logger.error(`${error.message}; retrying in about ${Math.round(this.intervalMs)} ms`, {
        error,
        consecutiveFailures: this.#stats.consecutiveFailures,
      });
      this.#call('onError', () => this.options.onError?.(error));
      return;
    }
    this.#stats.consecutiveFailures = 0;
    if (report.skippedConcurrent) {
      this.#stats.skippedConcurrent++;
      this.logger.debug('merge skipped: another merge is running', { durationMs: report.durationMs });
    } else {
      this.#stats.merges++;
      const { startedAt: _s, skippedConcurrent: _c, ...counts } = report;
      this.logger.info('merged staged heartbeats', counts);
    }
    this.#call('onMerge', () => this.options.onMerge?.(report));
  }

  #call(hook: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.logger.warn(`merger ${hook} hook threw`, { error: err });
    }
  }
}

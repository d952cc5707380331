/**
 * startMerger(): runs the merge every few seconds from the application. Safe to
 * start in every replica:
 *   - each part of staging has its own advisory lock, taken with
 *     pg_try_advisory_xact_lock: a part being merged elsewhere is skipped at once;
 *   - a part another replica merged (and left empty) less than ~0.7 interval ago
 *     is skipped too, so replicas do not multiply merges;
 *   - ticks fall on the wall-clock grid (multiples of the interval since the Unix
 *     epoch, plus a random offset of up to jitter x interval), where the stagers
 *     flush just before, and a merge of every part announces itself with NOTIFY:
 *     a merger that heard another's (on one LISTEN connection) skips its own tick
 *     without sending anything. Without that connection (down, frozen, behind a
 *     transaction pooler) it merges on its own schedule, as the SQL skip allows;
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
import { endPool, listenClientConfig, resolvePool, withClient, type ConnectionOptions } from './connection.ts';
import { interruptibleSleep, ListenSource } from './events-source.ts';
import { InvalidOptionError, toHeartbeatError, type HeartbeatError } from './errors.ts';
import { checkTimingInvariant, type TimingOptions } from './invariant.ts';
import { toLogger, type Logger } from './logger.ts';
import { addMergeResults, emptyMergeResult, MERGED_CHANNEL, mergeStatement, sweepAfterMerge, type MergeResult } from './merge.ts';
import { notify } from './observers.ts';
import { countOption, durationOption, fractionOption, functionOption, MAX_TIMER_MS } from './options.ts';
import { callHook, safeLogger } from './safe-logger.ts';

export interface MergerOptions extends Omit<TimingOptions, 'mergeIntervalMs'> {
  /**
   * Time from the start of one merge to the start of the next (default 5 000 ms). A merge that takes
   * longer than that is followed at once by the next, never overlapped.
   */
  intervalMs?: number;
  /**
   * Random spread of the ticks, as a fraction of the interval (default 0.1). Aligned (the default): each tick
   * falls 0 to jitter x intervalMs after its grid instant, a new draw per tick, so replicas take turns merging
   * first; not aligned: each interval is intervalMs ± jitter x intervalMs.
   */
  jitter?: number;
  /**
   * Tick on the wall-clock grid (default true): the multiples of intervalMs since the Unix epoch (plus the
   * jitter's offset), the grid on which stagers flush (`alignFlush`) and pg_cron's merge loop merges. false:
   * intervalMs ± jitter from the start of the previous tick.
   */
  align?: boolean;
  /**
   * Listen for other mergers' merges (default true): one dedicated connection (not from the pool) LISTENs on
   * `pg_heartbeat_merged`; a merge of every part that left no rows, by another merger or mergeNow(), heard less
   * than ~0.7 interval before a tick, stands in for that tick, which then sends nothing. If the connection is
   * down, frozen or behind a transaction pooler, ticks are simply not skipped (reconnected with backoff). Set
   * false behind pgbouncer in transaction mode (the LISTEN would land on a server connection others borrow).
   */
  listen?: boolean;
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
  /** Ticks skipped without a statement: another merger's merge of every part was heard (NOTIFY) just before. */
  skippedNotified: number;
  /** LISTEN connections made (the first, and each reconnect after a failure or a missed own notification). */
  listenConnections: number;
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
/** At most this many ticks in a row are skipped on notifications alone; the next one asks the database. */
const MAX_SKIPS_HEARD = 12;
/** Ticks in a row that find every part merged elsewhere, unheard, before the LISTEN connection is deemed deaf. */
const DEAF_TICKS = 3;
/** Backoff of the LISTEN connection after failures: first delay, longest delay. */
const LISTEN_RETRY_MS = [1_000, 300_000] as const;

/**
 * Parts merged at once, at most, on a pool pg-heartbeat creates (startMerger({ connectionString }), the CLI's
 * `merger`): its size, so each part being merged has a connection.
 */
export const OWN_POOL_PARALLELISM = 4;

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
  const config: Omit<LoopConfig, 'align' | 'listenConfig'> = {
    intervalMs,
    jitter,
    maxRows: options.maxRows === undefined ? null : countOption(options.maxRows, 'maxRows', 0),
    queryTimeoutMs: durationOption(options.queryTimeoutMs, 'queryTimeoutMs', 30_000),
    stopTimeoutMs: durationOption(options.stopTimeoutMs, 'stopTimeoutMs', 10_000),
    parallelism: options.parallelism === undefined ? undefined : countOption(options.parallelism, 'parallelism', 1, 1, 64),
    onMerge: functionOption(options.onMerge, 'onMerge'),
    onError: functionOption(options.onError, 'onError'),
  };
  if (options.align !== undefined && typeof options.align !== 'boolean') throw new InvalidOptionError('align', 'must be true or false');
  if (options.listen !== undefined && typeof options.listen !== 'boolean') throw new InvalidOptionError('listen', 'must be true or false');
  const applicationName = options.applicationName ?? 'pg-heartbeat merger';
  let listenConfig: pg.ClientConfig | undefined;
  if (options.listen ?? true) {
    try {
      listenConfig = listenClientConfig(connection, `${applicationName} listen`, `${applicationName} listen`, 'listen: false');
    } catch (err) {
      if (!(err instanceof InvalidOptionError)) throw err;
      logger.warn(`merger: ${err.message}; merging without listening for other mergers' merges`);
    }
  }
  const { pool, owned } = resolvePool(connection, logger, applicationName, OWN_POOL_PARALLELISM);
  return new MergeLoop(pool, owned, logger, { ...config, align: options.align ?? true, listenConfig });
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
  align: boolean;
  /** The LISTEN connection's settings; undefined: no listening. */
  listenConfig: pg.ClientConfig | undefined;
}

class MergeLoop implements Merger {
  readonly #stats: MergerStats = {
    merges: 0, skippedConcurrent: 0, skippedRecent: 0, skippedNotified: 0, listenConnections: 0, failures: 0, consecutiveFailures: 0, rowsConsumed: 0, deadLettered: 0,
    agentsUpdated: 0, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0, statusEvents: 0, sweepFailures: 0,
  };
  readonly #abort = new AbortController();
  /** Who this merger is, to the database: it skips parts other mergers merged just now, never for its own merges. */
  readonly #id = `startMerger ${randomUUID()}`;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopping: Promise<void> | undefined;
  /**
   * The next tick goes straight to one call per part, in parallel (the last one was long, or left rows): a call over
   * every part would run alone first. Otherwise a tick begins with one call over every part, and fans out at once if
   * that call leaves rows.
   */
  #fanOut = false;
  /** How many parts staging had at the last call over every part (what a straight fan-out merges). */
  #parts: number | undefined;
  /** Whether this tick merged parts in parallel (MergeReport.parallel). */
  #tickParallel = false;
  /** Merge statements at once at most: no cap until a statement of the least row budget hits statement_timeout (#statement). */
  #parallelCap = Number.POSITIVE_INFINITY;
  /** Merge statements this merger has in flight (#statement). */
  #inFlight = 0;
  /** Statements waiting for one in flight to end (only while #inFlight is at the cap); each end wakes one. */
  readonly #slotWaiters: (() => void)[] = [];
  /** The lock episode last warned about (holder pid and since when), so each is warned once. */
  #warnedLock: string | undefined;
  /** Staged rows per statement: the maxRows option, halved each time the server's statement_timeout cuts one off. */
  #maxRows: number | null;
  /** Aligned: the grid slot (wall-clock ms / interval) of the next or running tick. */
  #slot: number | undefined;
  /** The LISTEN connection, while listening is on; aborted first thing in close(). */
  #listen: ListenSource | undefined;
  readonly #listenAbort = new AbortController();
  #listenLoop: Promise<void> | undefined;
  /** When another merger's merge of every part was last heard: performance.now(), and the wall clock (aligned ticks). */
  #heardAt: number | undefined;
  #heardAtWall: number | undefined;
  /** Ticks skipped in a row on notifications. */
  #skipsInRow = 0;
  /** Own notifications heard back on the LISTEN connection. */
  #echoes = 0;
  /** An own merge's notification that should come back: since when, and the count of echoes before it. */
  #echoDue: { since: number; echoesBefore: number } | undefined;
  /** Whether the last merge statement of a tick announced itself (NOTIFY). */
  #notified = false;
  /**
   * With listening: 'lead' after a tick whose merge of every part was announced, 'follow' after a tick skipped on
   * another's announcement, 'none' otherwise. Aligned ticks of a leader fall on the grid instant itself, a follower's
   * in the second half of the jitter window, so the leader's NOTIFY arrives before them (without this, two
   * replicas' random offsets a merge's duration apart both merge, and neither merges every part).
   */
  #role: 'lead' | 'follow' | 'none' = 'none';

  /** Set when the LISTEN connection was reset for a missed own notification (so reconnects back off). */
  #echoMissed = false;
  /** Ticks in a row that found every part merged by another merger without having heard it. */
  #deafTicks = 0;

  /**
   * The least time between two status sweeps asked of the merge (sql/018): the gap the skip-recent check uses,
   * so replicas sweep about once per interval between them, and each merger at least once per own tick.
   */
  get #sweepMinGapMs(): number {
    return this.#minIntervalMs;
  }

  constructor(
    private readonly pool: pg.Pool,
    private readonly owned: boolean,
    private readonly logger: Logger,
    private readonly config: LoopConfig,
  ) {
    setMaxListeners(0, this.#abort.signal); // every merge in flight listens to it
    setMaxListeners(0, this.#listenAbort.signal);
    this.#maxRows = config.maxRows;
    if (config.listenConfig) this.#listenLoop = this.#keepListening(config.listenConfig);
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
    this.#listenAbort.abort();
    const listenClosed = (async () => {
      await this.#listenLoop;
      await this.#listen?.close(1000);
    })();
    if (this.#running) {
      const cutOff = setTimeout(() => this.#abort.abort(), this.config.stopTimeoutMs);
      await this.#running;
      clearTimeout(cutOff);
    }
    this.#abort.abort(); // nothing queued runs after this
    await listenClosed;
    if (this.owned) await endPool(this.pool, 5000, this.logger);
  }

  /**
   * Keeps one LISTEN connection open while the merger runs: connects (within queryTimeoutMs), LISTENs, waits until
   * it breaks or is reset (a missed own notification), then reconnects after a backoff. Never rejects; failures are
   * a warning once per episode (ticks are merely not skipped meanwhile).
   */
  async #keepListening(config: pg.ClientConfig): Promise<void> {
    const signal = this.#listenAbort.signal;
    const source = new ListenSource(config, { timeoutMs: this.config.queryTimeoutMs, signal }, MERGED_CHANNEL, (payload) => this.#heard(payload));
    this.#listen = source;
    let failures = 0;
    while (!signal.aborted) {
      try {
        await source.open();
        this.#stats.listenConnections++;
        if (failures > 0) this.logger.info('merger: listening for other mergers\' merges again', { failures });
        // until the connection breaks, or #tick() resets it (its own notification did not come back)
        await source.wait(2 ** 31 - 1, Number.MAX_SAFE_INTEGER);
        if (signal.aborted) break;
        // a connection that listened until it broke counts as one failure, after which backoff starts over
        failures = this.#echoMissed ? failures + 1 : 1;
        this.#echoMissed = false;
      } catch (err) {
        if (signal.aborted) break;
        failures++;
        if (failures === 1) {
          this.logger.warn(`merger: cannot listen for other mergers' merges (${toHeartbeatError(err, 'listening for merges').message}); ` +
            'merging on its own schedule meanwhile, retrying with backoff');
        }
      }
      source.reset();
      this.#echoDue = undefined;
      const base = Math.min(LISTEN_RETRY_MS[1], LISTEN_RETRY_MS[0] * 2 ** Math.min(failures - 1, 20));
      await interruptibleSleep(base / 2 + Math.random() * (base / 2), signal);
    }
    source.reset();
  }

  /** A notification on pg_heartbeat_merged: the payload is the merger's id ('' for mergeNow()). */
  #heard(payload: string): void {
    if (payload === this.#id) {
      this.#echoes++;
      return;
    }
    this.#heardAt = performance.now();
    this.#heardAtWall = Date.now();
  }

  /**
   * Whether this tick can be skipped: another merger's merge of every part was heard since this tick's grid instant
   * (aligned: it merged what the stagers flushed for this instant), or less than the skip-recent interval ago (not
   * aligned: the SQL would skip every part as merged recently); and fewer than MAX_SKIPS_HEARD ticks were skipped
   * in a row. Also checks the LISTEN connection: an own merge's notification that has not come back by
   * now means it is not delivering (frozen, or a transaction pooler): it is reset, and reconnected after a backoff.
   */
  #skipHeard(minIntervalMs: number): boolean {
    const now = performance.now();
    if (this.#echoDue !== undefined && this.#echoes > this.#echoDue.echoesBefore) this.#echoDue = undefined;
    if (this.#echoDue !== undefined && now - this.#echoDue.since > Math.max(1000, this.config.intervalMs / 2)) {
      this.logger.warn('merger: the LISTEN connection did not deliver this merger\'s own notification; reconnecting it');
      this.#echoDue = undefined;
      this.#echoMissed = true;
      this.#heardAt = undefined;
      this.#heardAtWall = undefined;
      this.#listen?.reset();
      return false;
    }
    if (this.#skipsInRow >= MAX_SKIPS_HEARD) return false;
    return this.#heardRecently(minIntervalMs);
  }

  /** Another merger's merge of every part was heard since this tick's grid instant (aligned), or less than minIntervalMs ago. */
  #heardRecently(minIntervalMs: number): boolean {
    if (this.config.align) {
      return this.#heardAtWall !== undefined && this.#slot !== undefined && this.#heardAtWall >= this.#slot * this.config.intervalMs;
    }
    return this.#heardAt !== undefined && performance.now() - this.#heardAt < minIntervalMs;
  }

  /**
   * A tick the database answered with "every part was merged by another merger just now" while nothing was heard:
   * such merges are announced (unless pg_cron's loop or an older version merged), so the LISTEN connection may be
   * deaf (frozen while this merger only follows). After DEAF_TICKS such ticks in a row it is reset and reconnected,
   * with the backoff of a missed own notification.
   */
  #checkDeaf(result: MergeResult, listening: boolean, minIntervalMs: number): void {
    const allRecent = result.parts > 0 && result.partsMerged === 0 && result.partsSkippedRecent === result.parts;
    if (!listening || !allRecent || this.#heardRecently(minIntervalMs)) {
      this.#deafTicks = 0;
      return;
    }
    if (++this.#deafTicks < DEAF_TICKS) return;
    this.#deafTicks = 0;
    this.logger.warn('merger: other mergers merged every part but the LISTEN connection delivered nothing; reconnecting it');
    this.#echoMissed = true;
    this.#listen?.reset();
  }

  /**
   * Schedules the next tick, at once when `now` or when its time is past. Aligned: in the grid slot after the last
   * one (never one already over), 0 to jitter x interval after its grid instant. Otherwise `interval ± jitter`
   * after `since` (the last tick's start).
   */
  #schedule(since = performance.now(), now = false): void {
    if (this.#stopping) return;
    const { intervalMs, jitter } = this.config;
    let delay: number;
    if (this.config.align) {
      const wall = Date.now();
      const current = Math.floor(wall / intervalMs);
      if (now) {
        this.#slot = current;
        delay = 0;
      } else {
        this.#slot = this.#slot === undefined ? current + 1 : Math.max(this.#slot + 1, current);
        const window = jitter * intervalMs;
        const offset = this.#role === 'lead' ? 0 : this.#role === 'follow' ? window / 2 + (Math.random() * window) / 2 : Math.random() * window;
        delay = this.#slot * intervalMs + offset - wall;
      }
    } else {
      delay = now ? 0 : since + intervalMs * (1 + jitter * (2 * Math.random() - 1)) - performance.now();
    }
    this.#timer = setTimeout(() => this.#tick(), Math.min(MAX_TIMER_MS, Math.max(0, delay)));
    this.#timer.unref();
  }

  /** The least time since another merger's merge for this merger to skip a part (the SQL's min_interval). */
  get #minIntervalMs(): number {
    return Math.round(this.config.intervalMs * (1 - this.config.jitter) * 0.8);
  }

  #tick(): void {
    this.#timer = undefined;
    if (this.#stopping) return;
    if (this.#skipHeard(this.#minIntervalMs)) {
      this.#skipsInRow++;
      this.#stats.skippedNotified++;
      this.#role = 'follow';
      this.logger.debug('merge tick skipped: another merger merged every part just now (heard by NOTIFY)');
      this.#schedule();
      return;
    }
    this.#skipsInRow = 0;
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
    const { intervalMs } = this.config;
    // parts another replica merged less than this long ago (and left empty) are skipped
    const minIntervalMs = this.#minIntervalMs;
    // an own merge of every part is announced (NOTIFY): its echo on the LISTEN connection shows that it delivers
    const listening = this.#listen?.listening === true;
    const echoesBefore = this.#echoes;
    this.#notified = false;
    // a tick drains for at most one interval, then lets the next tick start
    const budgetEnd = t0 + intervalMs;
    let result: MergeResult;
    this.#tickParallel = false;
    try {
      result = this.#fanOut && this.#parts !== undefined
        ? await this.#mergeParts(emptyMergeResult(), Array.from({ length: this.#parts }, (_, part) => part), minIntervalMs, budgetEnd)
        : await this.#mergeSeries(minIntervalMs, budgetEnd);
    } catch (err) {
      const error = toHeartbeatError(err, 'merge');
      if (this.#stopping && this.#abort.signal.aborted) return false;
      this.#stats.failures++;
      this.#stats.consecutiveFailures++;
      this.#role = 'none';
      this.logger.error(`${error.message}; retrying in about ${Math.round(intervalMs)} ms`, {
        error,
        consecutiveFailures: this.#stats.consecutiveFailures,
      });
      callHook(this.config.onError, error, 'onError', this.logger);
      return false;
    }
    const durationMs = Math.round((performance.now() - t0) * 10) / 10;
    if (listening && this.#notified && this.#listen?.listening) this.#echoDue ??= { since: performance.now(), echoesBefore };
    if (this.config.listenConfig) this.#role = this.#notified ? 'lead' : 'none';
    this.#checkDeaf(result, listening, minIntervalMs);
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
    // straight to one call per part next time when this tick left rows (its budget ran out: a backlog, also when
    // the first call over every part took the whole tick, so it never fanned out), or fanned out and took a large
    // share of the interval; back to one call first when a tick left nothing and did not fan out or was quick.
    // (A tick that is merely slow, with no backlog, stays one call, and announces itself: NOTIFY.)
    if ((parallelism ?? 2) > 1) {
      if (result.more || (this.#tickParallel && durationMs > intervalMs * 0.5)) this.#fanOut = true;
      else if (!this.#tickParallel || durationMs < intervalMs * 0.2) this.#fanOut = false;
    }
    const report: MergeReport = { ...result, startedAt, durationMs, parallel: this.#tickParallel };
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

  /**
   * Every part in one call; when that leaves rows, the parts with rows left in parallel at once (#mergeParts), or,
   * when this merger merges one part at a time, again in one call while rows are left and the tick's budget lasts.
   */
  async #mergeSeries(minIntervalMs: number, budgetEnd: number): Promise<MergeResult> {
    const total = emptyMergeResult();
    const fanOut = (this.config.parallelism ?? 2) > 1;
    let first = true;
    for (;;) {
      const r = await this.#statement({ part: null, minIntervalMs: first ? minIntervalMs : null });
      // the statement sent NOTIFY (merge.ts: it merged every part and left no rows)
      this.#notified = !r.more && r.partsMerged === r.parts;
      addMergeResults(total, r);
      total.parts = r.parts;
      this.#parts = r.parts;
      total.partsWithMore = r.partsWithMore;
      total.more = r.more;
      total.skippedConcurrent = first ? r.skippedConcurrent : total.skippedConcurrent && r.skippedConcurrent;
      first = false;
      if (!r.more || performance.now() > budgetEnd || this.#stopping) return total;
      if (fanOut) {
        this.#notified = false;
        return this.#mergeParts(total, r.partsWithMore, null, budgetEnd);
      }
    }
  }

  /**
   * `parts` in parallel (at most `parallelism` at once, one call per part at a time), each drained while the budget
   * lasts; their counts are added to `total`. `minIntervalMs` goes with each part's first call (skip a part another
   * merger just merged). A part that no longer exists (staging has fewer parts since) is left out, and the next tick
   * begins with a call over every part again.
   */
  async #mergeParts(total: MergeResult, parts: number[], minIntervalMs: number | null, budgetEnd: number): Promise<MergeResult> {
    this.#tickParallel = true;
    if (total.parts === 0) total.parts = parts.length;
    const limit = Math.max(1, Math.min(this.#partsAtOnce(), parts.length));
    const queue = [...parts];
    const left: number[] = [];
    const workers = Array.from({ length: limit }, async () => {
      for (let part = queue.shift(); part !== undefined; part = queue.shift()) {
        for (let first = true; ; first = false) {
          let r: MergeResult;
          try {
            r = await this.#statement({ part, minIntervalMs: first ? minIntervalMs : null });
          } catch (err) {
            if ((err as { code?: unknown }).code !== '22023' || !first) throw err;
            this.#parts = undefined;   // 'staging has parts 0 to n, not <part>'
            break;
          }
          addMergeResults(total, r);
          if (!r.more || performance.now() > budgetEnd || this.#stopping) {
            if (r.more) left.push(part);
            break;
          }
        }
      }
    });
    const outcomes = await Promise.allSettled(workers);
    const failed = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
    total.partsWithMore = left.sort((x, y) => x - y);
    total.more = left.length > 0;
    total.skippedConcurrent = total.partsMerged === 0 && total.partsSkippedConcurrent > 0;
    if (failed) throw failed.reason;
    return total;
  }

  /** Parts merged at once at most: the parallelism option (default 4 on an own pool, 1 on yours), capped (#statement). */
  #partsAtOnce(): number {
    return Math.min(this.config.parallelism ?? (this.owned ? OWN_POOL_PARALLELISM : 1), this.#parallelCap);
  }

  async #statement(args: { part: number | null; minIntervalMs: number | null }): Promise<MergeResult> {
    for (let attempt = 1; ; attempt++) {
      // no more statements at once than the cap (none until lowered below, so normally no wait); a statement in
      // flight ends within its deadline, or at once when close() cuts it off, and wakes one waiter
      while (this.#inFlight >= this.#parallelCap) await new Promise<void>((r) => this.#slotWaiters.push(r));
      const sent = this.#maxRows;
      const atOnceSent = this.#partsAtOnce();
      // statements of this merger in flight with this one (itself included)
      const together = ++this.#inFlight;
      try {
        return await withClient(
          this.pool,
          (client) => mergeStatement(client, this.pool, {
            maxRows: sent, merger: this.#id, ownTransaction: true, sweepMinGapMs: this.#sweepMinGapMs, ...args,
          }),
          { deadlineMs: this.config.queryTimeoutMs, what: 'merge', signal: this.#abort.signal },
        );
      } catch (err) {
        // the server's statement_timeout cut a merge statement short (a large backlog on a busy
        // server): it rolled back, nothing lost; merge fewer rows per statement from now on
        if ((err as { code?: unknown }).code !== '57014' || attempt > 8 || this.#stopping) throw err;
        const used = sent ?? (await this.#defaultMaxRows());
        // another statement of this tick (parts in parallel) lowered the budget meanwhile: retry with that
        if (this.#maxRows !== null && this.#maxRows < used) continue;
        const lower = Math.max(MIN_ROWS_PER_STATEMENT, Math.floor(used / 2));
        if (lower < used) {
          this.#maxRows = lower;
          this.logger.warn(
            `a merge statement hit the server's statement_timeout; this merger now merges at most ${lower} staged rows per statement`,
            { maxRows: lower },
          );
          continue;
        }
        // the least budget timed out too: when it ran beside other parts' merges, which share the server's CPU,
        // fewer at once from now on (unless another statement lowered that meanwhile: retry); alone, give up
        const atOnce = this.#partsAtOnce();
        if (atOnce < atOnceSent) continue;
        if (together > 1 && atOnce > 1) {
          this.#parallelCap = Math.max(1, Math.floor(Math.min(atOnce, together) / 2));
          this.logger.warn(
            `a merge statement of ${used} rows hit the server's statement_timeout; this merger now merges at most ${this.#parallelCap} part(s) at once`,
            { parallelism: this.#parallelCap },
          );
          continue;
        }
        throw err;
      } finally {
        this.#inFlight--;
        this.#slotWaiters.shift()?.();
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

/**
 * watchStatusChanges(): the status changes of agents (connected, disconnected, timeout), as durable events
 * read from heartbeat.status_events with their monotonic ids (docs/events.md).
 *
 * Delivery is at-least-once across restarts (persist `lastId`, pass it back as `since`) and exactly-once within
 * one watcher: the watcher reads `status_events_after(cursor)` and moves the cursor past what it handed over, so
 * a reconnect resumes where it was and never hands an event over twice. Ids are published in commit order, so
 * "after the last id seen" loses nothing; an id gap is normal.
 */
import { setMaxListeners } from 'node:events';
import pg from 'pg';
import { type ConnectionOptions, endPool, isPool, listenClientConfig, resolvePool } from './connection.ts';
import { ClosedError, DatabaseError, EventsPurgedError, HeartbeatError, InvalidOptionError, toHeartbeatError } from './errors.ts';
import { EventChannel } from './event-channel.ts';
import { type EventsSource, interruptibleSleep, ListenSource, PollSource } from './events-source.ts';
import { toLogger, type Logger } from './logger.ts';
import { checkOptionNames, countOption, durationOption, functionOption } from './options.ts';
import { callHook, safeLogger } from './safe-logger.ts';
import type { AgentConnectionStatus } from './status.ts';

/** Why a status changed. */
export type StatusChangeReason = 'first_heartbeat' | 'reconnect' | 'disconnect' | 'inactivity' | 'connection_timeout';

/** One row of heartbeat.status_events. */
export interface StatusChange {
  /** Monotonic (in commit order, with gaps); a safe integer (the watcher fails on an id above 2^53 - 1). */
  id: number;
  agentId: string;
  from: AgentConnectionStatus;
  to: AgentConnectionStatus;
  reason: StatusChangeReason;
  /** When the change happened (database clock); an invalid Date if the database holds a time a Date cannot. */
  at: Date;
  /** When the event was recorded. */
  recordedAt: Date;
}

export interface WatchOptions {
  /** Deliver the events after this id (a `lastId` you persisted), or `'now'` (default): those after the newest at start. */
  since?: number | 'now';
  /**
   * Called with each event, in id order, one at a time (awaited: the watcher reads no further meanwhile). A throw or
   * rejection is reported (logger, onError) and the same event is offered again, up to `handlerAttempts` times in
   * all; then it is skipped (counted in lastId) and the next one follows. Without onChange, iterate the watcher.
   */
  onChange?: (event: StatusChange) => void | Promise<void>;
  /** Aborting closes the watcher. */
  signal?: AbortSignal;
  /** LISTEN for notifications (default true); false polls only (pgbouncer in transaction mode). */
  listen?: boolean;
  /** Backstop poll (and liveness check) while listening (default 5 000 ms); the poll interval without LISTEN (default 1 000 ms). */
  pollIntervalMs?: number;
  /** Events per read at most (default 1 000). */
  batchSize?: number;
  /** Deadline of every query and of connecting (default 10 000 ms): past it the connection is destroyed and rebuilt. */
  timeoutMs?: number;
  /** Backoff after a failure: first delay, doubling (with jitter) up to the max (defaults 250 / 10 000 ms). */
  retryInitialDelayMs?: number;
  retryMaxDelayMs?: number;
  /** How many times onChange is offered one event before it is skipped (default 3). */
  handlerAttempts?: number;
  /**
   * What to do when events after the cursor were purged by retention: `'fail'` (default) stops the watcher with an
   * EventsPurgedError; `'skip'` reports it (onError) and goes on from the oldest event still retained.
   */
  onPurged?: 'fail' | 'skip';
  logger?: Logger;
  /** Called with every failure (a HeartbeatError); the watcher retries unless it is fatal (EventsPurgedError). */
  onError?: (error: HeartbeatError) => void;
  /** application_name of the watcher's connections (default 'pg-heartbeat watch'). */
  applicationName?: string;
}

export interface WatcherStats {
  /** Events handed over (to onChange or the iterator). */
  delivered: number;
  /** Events onChange failed on every attempt (skipped). */
  skipped: number;
  /** Reads of status_events_after(). */
  reads: number;
  /** Failures (each reported to onError). */
  errors: number;
  /** Connections opened (LISTEN mode). */
  connections: number;
}

export interface StatusWatcher extends AsyncIterable<StatusChange>, AsyncDisposable {
  /** Resolves once the watcher is listening (or polling) with its cursor set: changes caused after it are delivered. Rejects if it stopped first. */
  readonly ready: Promise<void>;
  /** The id of the last event handed over (onChange finished, or taken by the iterator); `since` until the first. */
  readonly lastId: number;
  /** Resolves when the watcher has stopped: to null after close(), to the error that stopped it otherwise. Never rejects. */
  readonly done: Promise<HeartbeatError | null>;
  readonly closed: boolean;
  stats(): WatcherStats;
  /** Stops reading, ends the iteration, drops the connection. Resolves within ~timeoutMs even when the database is unreachable. Idempotent. */
  close(): Promise<void>;
}

const KNOWN = [
  'since', 'onChange', 'signal', 'listen', 'pollIntervalMs', 'batchSize', 'timeoutMs', 'retryInitialDelayMs', 'retryMaxDelayMs',
  'handlerAttempts', 'onPurged', 'logger', 'onError', 'applicationName',
];

const us = (column: string): string =>
  `CASE WHEN isfinite(e.${column}) AND e.${column} < '275760-09-13 00:00:00.001+00'::timestamptz ` +
  `THEN (extract(epoch FROM e.${column}) * 1000000)::int8::text END AS ${column}_us`;
const READ_SQL = `SELECT e.id::text AS id, e.agent_id::text AS agent_id, e.from_status, e.to_status, e.reason, ${us('at')}, ${us('recorded_at')}
  FROM heartbeat.status_events_after($1::int8, $2::int4) e ORDER BY e.id`;
const HEAD_SQL = 'SELECT heartbeat.status_events_head()::text AS head';

interface Row {
  id: string; agent_id: string; from_status: string; to_status: string; reason: string; at_us: string | null; recorded_at_us: string | null;
}

function safeId(text: string, what: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new DatabaseError(`${what}: id ${text} is beyond what a JavaScript number holds exactly (2^53 - 1)`, { code: 'ID_OVERFLOW' });
  }
  return n;
}

const date = (us: string | null): Date => (us === null ? new Date(NaN) : new Date(Number(us) / 1000));

function toEvent(r: Row): StatusChange {
  return {
    id: safeId(r.id, 'heartbeat.status_events'),
    agentId: r.agent_id,
    from: r.from_status as AgentConnectionStatus,
    to: r.to_status as AgentConnectionStatus,
    reason: r.reason as StatusChangeReason,
    at: date(r.at_us),
    recordedAt: date(r.recorded_at_us),
  };
}

function sinceOption(value: unknown): number | 'now' {
  if (value === undefined || value === 'now') return 'now';
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new InvalidOptionError('since', `must be 'now' or a whole number from 0 to 2^53 - 1 (an event id), got ${typeof value === 'number' ? value : typeof value}`);
  }
  return value;
}

/**
 * Watches heartbeat.status_events: delivers every status change after `since` to `onChange`, or to whoever
 * iterates the returned watcher (`for await (const event of watcher)`). Runs until close(), `signal`, breaking
 * out of the loop, or a fatal error (events purged by retention). Everything else (the database down, a frozen
 * connection, a killed backend) is reported to the logger and onError and retried with backoff, resuming after
 * the last event handed over.
 */
export function watchStatusChanges(connection: ConnectionOptions, options: WatchOptions = {}): StatusWatcher {
  if (!options || typeof options !== 'object') throw new InvalidOptionError('options', 'must be an object');
  checkOptionNames(options, KNOWN, 'watchStatusChanges');
  const listen = options.listen ?? true;
  if (typeof listen !== 'boolean') throw new InvalidOptionError('listen', 'must be true or false');
  const onPurged = options.onPurged ?? 'fail';
  if (onPurged !== 'fail' && onPurged !== 'skip') throw new InvalidOptionError('onPurged', `must be 'fail' or 'skip'`);
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw new InvalidOptionError('signal', 'must be an AbortSignal');
  const config: Config = {
    since: sinceOption(options.since),
    listen,
    pollIntervalMs: durationOption(options.pollIntervalMs, 'pollIntervalMs', listen ? 5_000 : 1_000),
    batchSize: countOption(options.batchSize, 'batchSize', 1_000, 1, 100_000),
    timeoutMs: durationOption(options.timeoutMs, 'timeoutMs', 10_000),
    retryInitialDelayMs: durationOption(options.retryInitialDelayMs, 'retryInitialDelayMs', 250),
    retryMaxDelayMs: durationOption(options.retryMaxDelayMs, 'retryMaxDelayMs', 10_000),
    handlerAttempts: countOption(options.handlerAttempts, 'handlerAttempts', 3, 1, 1_000),
    onPurged,
    onChange: functionOption(options.onChange, 'onChange'),
    onError: functionOption(options.onError, 'onError'),
  };
  const logger = safeLogger(toLogger(options.logger));
  if (options.applicationName !== undefined && typeof options.applicationName !== 'string') {
    throw new InvalidOptionError('applicationName', 'must be a string');
  }
  const applicationName = options.applicationName;
  return new Watcher(connection, config, logger, applicationName, options.signal);
}

interface Config {
  since: number | 'now';
  listen: boolean;
  pollIntervalMs: number;
  batchSize: number;
  timeoutMs: number;
  retryInitialDelayMs: number;
  retryMaxDelayMs: number;
  handlerAttempts: number;
  onPurged: 'fail' | 'skip';
  onChange: ((event: StatusChange) => void | Promise<void>) | undefined;
  onError: ((error: HeartbeatError) => void) | undefined;
}

class Watcher implements StatusWatcher {
  readonly ready: Promise<void>;
  readonly done: Promise<HeartbeatError | null>;
  readonly #abort = new AbortController();
  readonly #source: EventsSource;
  readonly #pool: { pool: pg.Pool; owned: boolean } | undefined;
  readonly #channel: EventChannel<StatusChange> | undefined;
  readonly #stats: WatcherStats = { delivered: 0, skipped: 0, reads: 0, errors: 0, connections: 0 };
  #readyResolve!: () => void;
  #readyReject!: (err: unknown) => void;
  #isReady = false;
  #finish!: (error: HeartbeatError | null) => void;
  /** The last id read and handed on (to onChange, or into the iterator's buffer); undefined until resolved from `since`. */
  #cursor: number | undefined;
  /** Where to start: `since`, or 'now' (again after a purge skipped to the head). */
  #since: number | 'now';
  #lastId: number;
  #closing: Promise<void> | undefined;
  readonly #loop: Promise<void>;

  constructor(
    connection: ConnectionOptions,
    private readonly config: Config,
    private readonly logger: Logger,
    applicationName: string | undefined,
    signal: AbortSignal | undefined,
  ) {
    setMaxListeners(0, this.#abort.signal);
    this.#since = config.since;
    this.#lastId = config.since === 'now' ? 0 : config.since;
    this.ready = new Promise<void>((resolve, reject) => {
      this.#readyResolve = resolve;
      this.#readyReject = reject;
    });
    this.ready.catch(() => {}); // rejected only when the watcher stopped first; awaiting it still throws
    this.done = new Promise((resolve) => (this.#finish = resolve));
    const sourceOptions = { timeoutMs: config.timeoutMs, signal: this.#abort.signal };
    if (config.listen) {
      this.#source = new ListenSource(listenClientConfig(connection, applicationName, 'pg-heartbeat watch', 'listen: false'), sourceOptions);
    } else {
      const resolved = resolvePool(connection, logger, applicationName ?? 'pg-heartbeat watch', 1);
      this.#pool = resolved;
      this.#source = new PollSource(resolved.pool, sourceOptions);
    }
    if (!config.onChange) {
      this.#channel = new EventChannel(config.batchSize, (event) => {
        this.#lastId = event.id;
        this.#stats.delivered++;
      });
    }
    if (signal) {
      if (signal.aborted) void this.close();
      else signal.addEventListener('abort', () => void this.close(), { once: true });
    }
    this.#loop = this.#run();
  }

  get lastId(): number {
    return this.#lastId;
  }

  get closed(): boolean {
    return this.#closing !== undefined;
  }

  stats(): WatcherStats {
    return { ...this.#stats };
  }

  [Symbol.asyncIterator](): AsyncIterator<StatusChange> {
    const channel = this.#channel;
    if (!channel) throw new InvalidOptionError('onChange', 'is set: the events go to onChange; iterate a watcher started without it');
    return {
      next: () => channel.next(),
      return: async () => {
        await this.close();
        return { value: undefined, done: true };
      },
    };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  close(): Promise<void> {
    this.#closing ??= this.#shutdown(null);
    return this.#closing;
  }

  async #shutdown(error: HeartbeatError | null): Promise<void> {
    this.#abort.abort();
    if (error) this.#channel?.fail(error);
    else this.#channel?.end();
    if (!this.#isReady) this.#readyReject(error ?? new ClosedError('status events watcher'));
    // the loop stops at once (every wait and query listens to the abort); an onChange still running is not waited for
    await this.#loop;
    await this.#source.close(Math.min(this.config.timeoutMs, 5_000));
    if (this.#pool?.owned) await endPool(this.#pool.pool, 5_000, this.logger);
    this.#finish(error);
  }

  get #stopping(): boolean {
    return this.#abort.signal.aborted;
  }

  /** The read loop; never rejects. */
  async #run(): Promise<void> {
    let failures = 0;
    while (!this.#stopping) {
      try {
        await this.#source.open();
        if (this.config.listen) this.#stats.connections++;
        await this.#start();
        for (;;) {
          this.#source.takeNotified(this.#cursor!);
          await this.#drain();
          failures = 0;
          if (this.#stopping) return;
          await this.#source.wait(this.config.pollIntervalMs, this.#cursor!);
          if (this.#stopping) return;
        }
      } catch (err) {
        if (this.#stopping) return;
        const error = toHeartbeatError(err, 'watching status events');
        this.#source.reset();
        this.#stats.errors++;
        if (error instanceof EventsPurgedError) {
          if (this.config.onPurged === 'fail') return this.#fatal(error);
          this.#skipPurged(error);
          continue;
        }
        const delay = this.#backoff(failures++);
        this.logger.warn(`${error.message}; retrying in ${delay} ms`, { error, consecutiveFailures: failures });
        callHook(this.config.onError, error, 'onError', this.logger);
        await interruptibleSleep(delay, this.#abort.signal);
      }
    }
  }

  /** Sets the cursor on the first connection (`since`, or the head for 'now'); resolves `ready`. */
  async #start(): Promise<void> {
    if (this.#cursor === undefined) {
      const rows = await this.#source.query<{ head: string }>(HEAD_SQL, [], 'heartbeat.status_events_head()');
      const head = safeId(rows[0]?.head ?? '0', 'heartbeat.status_events_head()');
      this.#cursor = this.#since === 'now' ? head : this.#since;
      if (!this.#isReady) this.#lastId = this.#cursor;
      if (this.#cursor > head) {
        this.logger.warn(
          `watching status events after id ${this.#cursor}, but the newest event is ${head}: events ${head + 1} to ${this.#cursor} ` +
            'will not be delivered (a cursor from another database, or one restored from a backup?)',
          { since: this.#cursor, head },
        );
      }
    }
    this.#isReady = true;
    this.#readyResolve();
  }

  /** Reads and hands over until a read returns fewer than batchSize events. */
  async #drain(): Promise<void> {
    for (;;) {
      const after = this.#cursor!;
      let rows: Row[];
      try {
        rows = await this.#source.query<Row>(READ_SQL, [after, this.config.batchSize], 'heartbeat.status_events_after()');
      } catch (err) {
        const e = toHeartbeatError(err, 'heartbeat.status_events_after()');
        if (e instanceof EventsPurgedError && e.afterId === undefined) (e as { afterId: number | undefined }).afterId = after;
        throw e;
      }
      this.#stats.reads++;
      for (const row of rows) {
        if (this.#stopping) return;
        const event = toEvent(row);
        if (event.id <= this.#cursor!) continue; // never twice (a function that did not honour after_id)
        await this.#deliver(event);
        if (this.#stopping) return;
        this.#cursor = event.id;
      }
      if (rows.length < this.config.batchSize || this.#stopping) return;
    }
  }

  async #deliver(event: StatusChange): Promise<void> {
    if (this.#channel) return this.#channel.push(event);
    const onChange = this.config.onChange!;
    for (let attempt = 1; ; attempt++) {
      try {
        const result = onChange(event);
        // closed while an async onChange ran: it is not waited for, and the event does not count as handed over
        if (result && typeof (result as Promise<void>).then === 'function' && !(await this.#unlessClosed(result as Promise<void>))) return;
        this.#lastId = event.id;
        this.#stats.delivered++;
        return;
      } catch (err) {
        if (this.#stopping) return;
        const last = attempt >= this.config.handlerAttempts;
        const error = new HeartbeatError(
          `onChange failed on event #${event.id} (attempt ${attempt} of ${this.config.handlerAttempts}): ${err instanceof Error ? err.message : String(err)}; ` +
            (last ? 'skipped it' : 'offering it again'),
          { code: 'HANDLER_FAILED', cause: err },
        );
        this.#stats.errors++;
        if (last) this.logger.error(error.message, { error, eventId: event.id });
        else this.logger.warn(error.message, { error, eventId: event.id });
        callHook(this.config.onError, error, 'onError', this.logger);
        if (last) {
          this.#lastId = event.id;
          this.#stats.skipped++;
          return;
        }
        await interruptibleSleep(Math.min(100 * 2 ** (attempt - 1), 5_000), this.#abort.signal);
        if (this.#stopping) return;
      }
    }
  }

  /** Awaits `p` (true once it resolved), or stops waiting when the watcher closes (false; the handler goes on alone). */
  #unlessClosed(p: Promise<void>): Promise<boolean> {
    return new Promise((resolve, reject) => {
      const onAbort = (): void => resolve(false);
      this.#abort.signal.addEventListener('abort', onAbort, { once: true });
      p.then(() => resolve(true), reject).finally(() => this.#abort.signal.removeEventListener('abort', onAbort));
    });
  }

  #fatal(error: EventsPurgedError): void {
    this.logger.error(`${error.message}; the watcher stopped`, { error });
    callHook(this.config.onError, error, 'onError', this.logger);
    this.#closing ??= this.#shutdown(error).catch(() => {});
  }

  #skipPurged(error: EventsPurgedError): void {
    const to = error.purgedThrough;
    if (to === undefined || to <= this.#cursor!) {
      // the database did not say where retention starts: from the newest event on
      this.#cursor = undefined;
      this.#since = 'now';
    } else {
      this.#cursor = to;
    }
    const where = this.#cursor === undefined ? 'the newest event' : `id ${this.#cursor}`;
    this.logger.error(`${error.message}; onPurged is 'skip': going on after ${where}`, { error });
    callHook(this.config.onError, error, 'onError', this.logger);
  }

  #backoff(failures: number): number {
    const { retryInitialDelayMs: first, retryMaxDelayMs: max } = this.config;
    const base = Math.min(max, first * 2 ** Math.min(failures, 30));
    return Math.round(base * (0.8 + 0.4 * Math.random()));
  }
}

/**
 * Where a status-events watcher reads from, and how it learns there is something to read.
 *
 * - {@link ListenSource}: one dedicated pg.Client (never a connection held from your pool), with TCP keepalive
 *   and a connect deadline; `LISTEN pg_heartbeat_status_events` on it, and the reads on it too. A notification,
 *   a broken connection or the backstop poll timer wakes the watcher. Every query has a deadline: past it the
 *   socket is destroyed (a frozen, half-open connection answers nothing, and keepalive does not notice while a
 *   middlebox still acknowledges), so the backstop poll is also the liveness check of the idle connection.
 * - {@link PollSource}: no LISTEN; each read is one statement on a pool connection (works through pgbouncer in
 *   transaction mode), woken by the poll timer only.
 *
 * Neither ever emits an unhandled 'error': a client's error is recorded and thrown by the next call.
 */
import pg from 'pg';
import { destroyClient, withClient } from './connection.ts';
import { ClosedError, ConnectionError, TimeoutError } from './errors.ts';
import { MERGED_CHANNEL } from './merge.ts';

export const EVENTS_CHANNEL = 'pg_heartbeat_status_events';

/** The channels a {@link ListenSource} listens to, each with its statement (constant SQL text). */
const LISTEN_SQL = {
  [EVENTS_CHANNEL]: 'LISTEN pg_heartbeat_status_events',
  [MERGED_CHANNEL]: 'LISTEN pg_heartbeat_merged',
} as const;
export type ListenChannel = keyof typeof LISTEN_SQL;

export interface EventsSource {
  /** Connects (and LISTENs) if needed; a no-op while connected. */
  open(): Promise<void>;
  /** One statement within the deadline. */
  query<R extends pg.QueryResultRow>(text: string, values: unknown[], what: string): Promise<R[]>;
  /** Resolves after `ms`, or earlier on a notification newer than `after`, a broken connection, or abort. */
  wait(ms: number, after: number): Promise<void>;
  /** Whether a notification of an id above `after` arrived since the last call (and forgets it). */
  takeNotified(after: number): boolean;
  /** Drops the connection after a failure (the next open() makes a new one). */
  reset(): void;
  /** Drops everything within `ms`. */
  close(ms: number): Promise<void>;
}

interface SourceOptions {
  timeoutMs: number;
  signal: AbortSignal;
}

/** Sleeps `ms`, or less when `signal` aborts or `wake` is called. */
function sleep(ms: number, signal: AbortSignal, setWake?: (wake: (() => void) | undefined) => void): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      setWake?.(undefined);
      resolve();
    };
    const timer = setTimeout(done, ms);
    if (signal.aborted) return done();
    signal.addEventListener('abort', done, { once: true });
    setWake?.(done);
  });
}

export { sleep as interruptibleSleep };

/** Runs `text` on a dedicated client within `ms`; on time-out or abort the client's socket is destroyed. */
function timedQuery<R extends pg.QueryResultRow>(
  client: pg.Client, text: string, values: unknown[], ms: number, what: string, signal: AbortSignal,
): Promise<pg.QueryResult<R>> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (err: unknown, result?: pg.QueryResult<R>): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      if (err === undefined) resolve(result!);
      else reject(err);
    };
    const onAbort = (): void => {
      destroyClient(client);
      finish(new ClosedError(what, 'the watcher is closing'));
    };
    const timer = setTimeout(() => {
      destroyClient(client);
      finish(new TimeoutError(`${what} did not finish within ${ms} ms`, { code: 'TIMEOUT' }));
    }, ms);
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    client.query<R>(text, values).then((r) => finish(undefined, r), (e: unknown) => finish(e));
  });
}

export class ListenSource implements EventsSource {
  #client: pg.Client | undefined;
  #broken: unknown;
  #notifiedId = -1;
  #wake: (() => void) | undefined;
  #listening = false;

  /**
   * `channel`: what to LISTEN to (status events by default). `onPayload`: called with each notification's payload
   * on that channel (a throwing callback is ignored); without it a payload is read as an event id (takeNotified).
   */
  constructor(
    private readonly config: pg.ClientConfig,
    private readonly options: SourceOptions,
    private readonly channel: ListenChannel = EVENTS_CHANNEL,
    private readonly onPayload?: (payload: string) => void,
  ) {}

  /** Connected and listening, as far as the client knows (a frozen connection still looks connected). */
  get listening(): boolean {
    return this.#client !== undefined && this.#broken === undefined && this.#listening;
  }

  async open(): Promise<void> {
    if (this.#client) {
      if (this.#broken === undefined) return;
      this.reset();
    }
    const { timeoutMs, signal } = this.options;
    if (signal.aborted) throw new ClosedError('status events watcher');
    const client = new pg.Client({
      ...this.config,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    });
    this.#client = client;
    this.#broken = undefined;
    this.#listening = false;
    const fail = (err: unknown): void => {
      if (this.#client !== client) return;
      this.#broken ??= err;
      this.#wake?.();
    };
    client.on('error', fail);
    client.on('end', () => fail(new ConnectionError('the LISTEN connection was closed by the server', { code: 'CONNECTION' })));
    client.on('notification', (msg) => {
      if (this.#client !== client || msg.channel !== this.channel) return;
      if (this.onPayload) {
        try {
          this.onPayload(msg.payload ?? '');
        } catch {
          // the callback's own problem; the connection goes on
        }
        return;
      }
      const id = Number(msg.payload);
      // a payload that is not an id still means "something was published"
      this.#notifiedId = Math.max(this.#notifiedId, Number.isSafeInteger(id) ? id : Number.MAX_SAFE_INTEGER);
      this.#wake?.();
    });
    await this.#connect(client, timeoutMs, signal);
    await this.query(LISTEN_SQL[this.channel], [], LISTEN_SQL[this.channel]);
    if (this.#client === client) this.#listening = true;
  }

  /** client.connect() within `ms`: a server that accepts and never answers (a blackhole) is given up on, the socket destroyed. */
  #connect(client: pg.Client, ms: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (err?: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        if (err === undefined) return resolve();
        destroyClient(client);
        reject(err);
      };
      const onAbort = (): void => finish(new ClosedError('connecting the status events watcher', 'the watcher is closing'));
      const timer = setTimeout(() => finish(new TimeoutError(`connecting to the database did not finish within ${ms} ms`, { code: 'TIMEOUT' })), ms);
      signal.addEventListener('abort', onAbort, { once: true });
      client.connect().then(() => finish(), (e: unknown) => finish(e));
    });
  }

  async query<R extends pg.QueryResultRow>(text: string, values: unknown[], what: string): Promise<R[]> {
    const client = this.#client;
    if (!client) throw new ConnectionError(`${what}: not connected`, { code: 'CONNECTION' });
    if (this.#broken !== undefined) throw this.#broken;
    const result = await timedQuery<R>(client, text, values, this.options.timeoutMs, what, this.options.signal);
    if (this.#broken !== undefined) throw this.#broken;
    return result.rows;
  }

  takeNotified(after: number): boolean {
    const notified = this.#notifiedId > after;
    this.#notifiedId = -1;
    return notified;
  }

  async wait(ms: number, after: number): Promise<void> {
    if (this.#broken !== undefined || this.#notifiedId > after) return;
    await sleep(ms, this.options.signal, (wake) => (this.#wake = wake));
  }

  /** Drops the connection; a wait() in progress returns. */
  reset(): void {
    const client = this.#client;
    this.#client = undefined;
    this.#broken = undefined;
    this.#listening = false;
    if (client) destroyClient(client);
    this.#wake?.();
  }

  async close(ms: number): Promise<void> {
    const client = this.#client;
    this.#client = undefined;
    this.#listening = false;
    if (!client) return;
    if (this.#broken !== undefined) {
      destroyClient(client);
      return;
    }
    // a polite goodbye when the connection answers; destroyed when it does not (frozen) within ms
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), ms)));
    const outcome = await Promise.race([client.end().catch(() => {}), late]);
    clearTimeout(timer);
    if (outcome === 'late') destroyClient(client);
  }
}

export class PollSource implements EventsSource {
  constructor(private readonly pool: pg.Pool, private readonly options: SourceOptions) {}

  async open(): Promise<void> {}

  async query<R extends pg.QueryResultRow>(text: string, values: unknown[], what: string): Promise<R[]> {
    return withClient(this.pool, async (client) => (await client.query<R>(text, values)).rows, {
      deadlineMs: this.options.timeoutMs, what, signal: this.options.signal,
    });
  }

  takeNotified(): boolean {
    return false;
  }

  async wait(ms: number): Promise<void> {
    await sleep(ms, this.options.signal);
  }

  reset(): void {}

  async close(): Promise<void> {}
}

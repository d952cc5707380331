/**
 * A faithful TypeScript model of the reference batcher (coder's
 * coderd/agentconnectionbatcher, the later version of its query), written
 * from its documented behaviour for the benchmark:
 *   - add() puts the update on a bounded channel (5 x batch size); when the
 *     channel is full it writes that one update directly (a one-row batch),
 *     and the caller waits for it (here: a heartbeat of an agent whose direct
 *     write is still in flight is counted as dropped, and at most 20,000
 *     direct writes are in flight, so the bench's memory stays bounded);
 *   - one consumer loop drains the channel into a map keyed by agent, keeping
 *     the newest update (an older one is ignored);
 *   - it flushes when the map reaches the batch size (500) or when the 5 s
 *     timer fires, and restarts the timer after every flush; while a flush
 *     runs the consumer does not drain the channel (as in the original, where
 *     the single goroutine is busy in the query);
 *   - a flush is one UPDATE ... FROM unnest($1::uuid[], ...) with NULLs sent
 *     as the zero time / zero uuid and mapped back with NULLIF, guarded by
 *     wa.updated_at <= new updated_at; a failed flush is dropped (no retry).
 */
import type pg from 'pg';

export interface ReferenceUpdate {
  id: string;
  firstConnectedAt: Date | null;
  lastConnectedAt: Date | null;
  lastConnectedReplicaId: string | null;
  disconnectedAt: Date | null;
  updatedAt: Date;
  /** Bench bookkeeping: how many heartbeats this entry stands for. */
  weight: number;
}

const ZERO_TIME = new Date('0001-01-01T00:00:00Z');
const ZERO_UUID = '00000000-0000-0000-0000-000000000000';

export const BATCH_UPDATE_SQL = `UPDATE public.workspace_agents AS wa SET
    first_connected_at = NULLIF(u.first_connected_at, '0001-01-01 00:00:00+00'::timestamptz),
    last_connected_at = NULLIF(u.last_connected_at, '0001-01-01 00:00:00+00'::timestamptz),
    last_connected_replica_id = NULLIF(u.last_connected_replica_id, '00000000-0000-0000-0000-000000000000'::uuid),
    disconnected_at = NULLIF(u.disconnected_at, '0001-01-01 00:00:00+00'::timestamptz),
    updated_at = u.updated_at
  FROM (SELECT unnest($1::uuid[]) AS id, unnest($2::timestamptz[]) AS first_connected_at,
               unnest($3::timestamptz[]) AS last_connected_at, unnest($4::uuid[]) AS last_connected_replica_id,
               unnest($5::timestamptz[]) AS disconnected_at, unnest($6::timestamptz[]) AS updated_at) AS u
 WHERE wa.id = u.id AND wa.updated_at <= u.updated_at`;

export interface ReferenceBatcherOptions {
  batchSize?: number;
  channelMultiplier?: number;
  intervalMs?: number;
  /** A separate pool for the batch flush (not in the original, where flushes and direct writes share the app's pool). */
  flushPool?: pg.Pool;
  /** Bench safety cap on direct writes in flight (beyond it heartbeats count as dropped). Default 20,000. */
  maxDirectInFlight?: number;
}

export class ReferenceBatcher {
  readonly #pool: pg.Pool;
  readonly #flushPool: pg.Pool;
  readonly #batchSize: number;
  readonly #intervalMs: number;
  readonly #channelSize: number;
  // the channel: a ring of updates
  readonly #channel: Array<ReferenceUpdate | undefined>;
  #head = 0;
  #size = 0;
  #batch = new Map<string, ReferenceUpdate>();
  #timerFired = false;
  #timer: NodeJS.Timeout | null = null;
  #wake: (() => void) | null = null;
  #stopped = false;
  #loop: Promise<void>;
  /** Agents with a direct write in flight: in the original, Add() blocks the calling agent's goroutine. */
  readonly #directAgents = new Set<string>();
  readonly #maxDirectInFlight: number;
  readonly counters = {
    flushes: 0, flushedRows: 0, applied: 0, failedFlushes: 0, droppedHeartbeats: 0, directWrites: 0, directFailed: 0,
    directInFlight: 0, directBlocked: 0,
  };

  constructor(pool: pg.Pool, options: ReferenceBatcherOptions = {}) {
    this.#pool = pool;
    this.#flushPool = options.flushPool ?? pool;
    this.#batchSize = options.batchSize ?? 500;
    this.#intervalMs = options.intervalMs ?? 5000;
    this.#channelSize = this.#batchSize * (options.channelMultiplier ?? 5);
    this.#channel = new Array(this.#channelSize);
    this.#maxDirectInFlight = options.maxDirectInFlight ?? 20_000;
    this.#resetTimer();
    this.#loop = this.#run();
  }

  /** Heartbeats waiting in the channel, the batch, or a direct write. */
  get backlog(): number {
    let n = this.#size + this.counters.directInFlight;
    for (const u of this.#batch.values()) n += u.weight;
    return n;
  }

  add(u: ReferenceUpdate): void {
    if (this.#size < this.#channelSize) {
      this.#channel[(this.#head + this.#size) % this.#channelSize] = u;
      this.#size++;
      this.#wake?.();
      return;
    }
    void this.#writeDirect(u);
  }

  async close(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#wake?.();
    await this.#loop;
  }

  async #writeDirect(u: ReferenceUpdate): Promise<void> {
    // In the original the caller (the agent's RPC goroutine) waits for its direct write, so an agent
    // has at most one in flight and sends nothing meanwhile: model that as the heartbeat not being sent.
    if (this.#directAgents.has(u.id) || this.counters.directInFlight >= this.#maxDirectInFlight) {
      this.counters.directBlocked++;
      this.counters.droppedHeartbeats += u.weight;
      return;
    }
    this.#directAgents.add(u.id);
    this.counters.directWrites++;
    this.counters.directInFlight++;
    try {
      await this.#write([u], this.#pool);
      this.counters.applied += u.weight;
    } catch {
      this.counters.directFailed++;
      this.counters.droppedHeartbeats += u.weight;
    } finally {
      this.counters.directInFlight--;
      this.#directAgents.delete(u.id);
    }
  }

  #resetTimer(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timerFired = false;
    this.#timer = setTimeout(() => {
      this.#timerFired = true;
      this.#wake?.();
    }, this.#intervalMs);
  }

  #process(u: ReferenceUpdate): void {
    const existing = this.#batch.get(u.id);
    if (existing !== undefined) {
      if (u.updatedAt < existing.updatedAt) {
        existing.weight += u.weight;
        return;
      }
      u.weight += existing.weight;
    }
    this.#batch.set(u.id, u);
  }

  async #run(): Promise<void> {
    while (!this.#stopped) {
      if (this.#size === 0 && !this.#timerFired) {
        await new Promise<void>((resolve) => (this.#wake = resolve));
        this.#wake = null;
        continue;
      }
      if (this.#timerFired) {
        await this.#flush();
        this.#resetTimer();
        continue;
      }
      // drain the channel one update at a time, flushing at capacity
      while (this.#size > 0 && !this.#stopped) {
        const u = this.#channel[this.#head]!;
        this.#channel[this.#head] = undefined;
        this.#head = (this.#head + 1) % this.#channelSize;
        this.#size--;
        this.#process(u);
        if (this.#batch.size >= this.#batchSize) {
          await this.#flush();
          this.#resetTimer();
        }
        if (this.#timerFired) break;
      }
    }
  }

  async #flush(): Promise<void> {
    if (this.#batch.size === 0) return;
    const batch = [...this.#batch.values()];
    this.#batch = new Map();
    let weight = 0;
    for (const u of batch) weight += u.weight;
    try {
      await this.#write(batch, this.#flushPool);
      this.counters.flushes++;
      this.counters.flushedRows += batch.length;
      this.counters.applied += weight;
    } catch {
      // dropped, as in the original: the next heartbeat will update them
      this.counters.failedFlushes++;
      this.counters.droppedHeartbeats += weight;
    }
  }

  #write(batch: ReferenceUpdate[], pool: pg.Pool): Promise<unknown> {
    const n = batch.length;
    const ids = new Array<string>(n), first = new Array<Date>(n), last = new Array<Date>(n);
    const replica = new Array<string>(n), disc = new Array<Date>(n), updated = new Array<Date>(n);
    for (let i = 0; i < n; i++) {
      const u = batch[i]!;
      ids[i] = u.id;
      first[i] = u.firstConnectedAt ?? ZERO_TIME;
      last[i] = u.lastConnectedAt ?? ZERO_TIME;
      replica[i] = u.lastConnectedReplicaId ?? ZERO_UUID;
      disc[i] = u.disconnectedAt ?? ZERO_TIME;
      updated[i] = u.updatedAt;
    }
    // named: prepared once per connection, like pgx's statement cache
    return pool.query({ name: 'reference_batch_update', text: BATCH_UPDATE_SQL, values: [ids, first, last, replica, disc, updated] });
  }
}

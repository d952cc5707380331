import type { HeartbeatSink } from '../load.ts';

export interface StrategyContext {
  /** Connection string of this phase's database. */
  url: string;
  ids: string[];
  /** first_connected_at every agent reports (the fleet's start). */
  firstConnectedAt: Date;
  /** Replica ids, one per simulated app replica. */
  replicaIds: string[];
}

export interface RunningStrategy extends HeartbeatSink {
  /** Heartbeats committed to workspace_agents so far (a heartbeat folded into a newer one that landed counts). */
  applied(): number;
  /** Heartbeats given up (failed flush, overflowing queue). */
  dropped(): number;
  /** Strategy-specific counters for the report. */
  extra(): Record<string, number>;
  /** Stops timers and closes connections; does not drain what is pending. */
  stop(): Promise<void>;
}

export interface Strategy {
  key: string;
  label: string;
  /** Changes to the phase's database before the phase (e.g. SET LOGGED), as the superuser. */
  prepareSql?: string[];
  start(ctx: StrategyContext): Promise<RunningStrategy>;
}

/** A FIFO of (agent index, time) pairs in typed arrays: no per-item objects. */
export class HeartbeatQueue {
  #index: Int32Array;
  #ms: Float64Array;
  #head = 0;
  #size = 0;

  constructor(readonly capacity: number) {
    this.#index = new Int32Array(capacity);
    this.#ms = new Float64Array(capacity);
  }

  get size(): number {
    return this.#size;
  }

  push(index: number, ms: number): boolean {
    if (this.#size === this.capacity) return false;
    const at = (this.#head + this.#size) % this.capacity;
    this.#index[at] = index;
    this.#ms[at] = ms;
    this.#size++;
    return true;
  }

  /** Removes the oldest item; returns its index and writes its time to out[0]. */
  shift(out: Float64Array): number {
    const index = this.#index[this.#head]!;
    out[0] = this.#ms[this.#head]!;
    this.#head = (this.#head + 1) % this.capacity;
    this.#size--;
    return index;
  }
}

/** A promise-based wake-up for waiting loops: notify() wakes every waiter. */
export class Signal {
  #waiters: Array<() => void> = [];

  wait(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const wake = (): void => {
        clearTimeout(timer);
        resolve();
      };
      this.#waiters.push(wake);
      if (ms !== undefined) {
        timer = setTimeout(() => {
          const i = this.#waiters.indexOf(wake);
          if (i >= 0) this.#waiters.splice(i, 1);
          resolve();
        }, ms);
      }
    });
  }

  notify(): void {
    if (this.#waiters.length === 0) return;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }
}

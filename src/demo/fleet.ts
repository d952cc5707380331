/**
 * The simulated fleet: agents that heartbeat at the real rate (every 15 s with
 * jitter), each first heartbeat spread over a start-up window, staged through
 * a real HeartbeatStager.
 */
import { randomUUID } from 'node:crypto';
import type { HeartbeatStager } from '../stager.ts';

export interface FleetOptions {
  /** Time between two heartbeats of one agent (default 15 000 ms). */
  periodMs?: number;
  /** Random spread of each period, as a fraction of it (default 0.1: ±10 %). */
  jitter?: number;
  /** Every agent's first heartbeat falls at a uniformly random moment this long after start(). */
  firstWithinMs: number;
}

export class Fleet {
  readonly ids: string[];
  readonly periodMs: number;
  readonly jitter: number;
  readonly replicaId = randomUUID();
  /** Heartbeats staged so far. */
  heartbeats = 0;
  readonly #due: Float64Array;
  readonly #first: Float64Array;
  readonly #gone: Uint8Array;
  readonly #firstWithinMs: number;

  constructor(size: number, options: FleetOptions) {
    this.periodMs = options.periodMs ?? 15_000;
    this.jitter = options.jitter ?? 0.1;
    this.ids = Array.from({ length: size }, () => randomUUID());
    this.#due = new Float64Array(size);
    this.#first = new Float64Array(size).fill(Number.NaN);
    this.#gone = new Uint8Array(size);
    this.#firstWithinMs = options.firstWithinMs;
  }

  /** Schedules every agent's first heartbeat in the window that opens at `nowMs` (epoch ms). */
  start(nowMs: number): void {
    for (let i = 0; i < this.ids.length; i++) this.#due[i] = nowMs + Math.random() * this.#firstWithinMs;
  }

  get size(): number {
    return this.ids.length;
  }

  /** Stages every heartbeat due at `now` (epoch ms) of the agents still connected; returns how many. */
  beat(stager: HeartbeatStager, now: number): number {
    let staged = 0;
    let at: Date | undefined;
    for (let i = 0; i < this.ids.length; i++) {
      if (this.#gone[i] || this.#due[i]! > now) continue;
      at ??= new Date(now);
      if (Number.isNaN(this.#first[i]!)) this.#first[i] = now;
      stager.stage({
        agentId: this.ids[i]!,
        firstConnectedAt: new Date(this.#first[i]!),
        lastConnectedAt: at,
        lastConnectedReplicaId: this.replicaId,
        updatedAt: at,
      });
      this.#due[i]! += this.periodMs * (1 + this.jitter * (2 * Math.random() - 1));
      staged++;
    }
    this.heartbeats += staged;
    return staged;
  }

  /**
   * Picks `count` random agents among `eligible` that have sent a heartbeat and
   * not left yet, stops their heartbeats and returns their ids.
   */
  leave(count: number, eligible: ReadonlySet<string>): string[] {
    const candidates: number[] = [];
    for (let i = 0; i < this.ids.length; i++) {
      if (!this.#gone[i] && !Number.isNaN(this.#first[i]!) && eligible.has(this.ids[i]!)) candidates.push(i);
    }
    const picked: string[] = [];
    for (let k = 0; k < count && candidates.length > 0; k++) {
      const j = Math.floor(Math.random() * candidates.length);
      const i = candidates[j]!;
      candidates[j] = candidates[candidates.length - 1]!;
      candidates.pop();
      this.#gone[i] = 1;
      picked.push(this.ids[i]!);
    }
    return picked;
  }
}

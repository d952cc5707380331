/**
 * What a stager keeps after COPYing it, until a merge has consumed it, so that
 * it can resend it when staging is reset.
 *
 * PostgreSQL empties every UNLOGGED table after crash recovery (a kill -9 of any
 * backend triggers one) and a promoted standby starts with them empty: whatever
 * was staged and not merged yet is gone. heartbeat.staging_epoch() tells: its
 * row lives in an UNLOGGED table too, so a reset gives a new epoch. The stager
 * reads it on every connection it has not used before (a crash or a failover
 * always means new connections) and every few seconds when idle; a new epoch
 * means "resend everything kept". The same call says how far every part of
 * staging has been drained (the start of the last merge that left a part
 * empty, on the database clock): what was COPYed before then is released.
 *
 * Memory: one snapshot per agent at most (the newest COPYed one), the same as
 * a pending update: a stager holds at most twice what it did without resends.
 */
import { combine, type Snapshot } from './update.ts';

export class Retained {
  #snapshots = new Map<string, Snapshot>();
  #epoch: string | null = null;
  #clients = new WeakSet<object>();
  #lastCheck = -Infinity;
  /** The database has no heartbeat.staging_epoch() (older than 1.2): nothing is kept until it has. */
  #unsupported = false;

  get unsupported(): boolean {
    return this.#unsupported;
  }

  /** Records that the database cannot tell resets (no staging_epoch()); drops what was kept. */
  markUnsupported(client: object, at = performance.now()): void {
    this.#unsupported = true;
    this.#lastCheck = at;
    this.#clients.add(client);
    this.#snapshots.clear();
  }

  get size(): number {
    return this.#snapshots.size;
  }

  /** Keeps a COPYed chunk (newest per agent, earliest first connection). */
  add(chunk: Map<string, Snapshot>, at = performance.now()): void {
    if (this.#unsupported) return;
    for (const [agentId, snapshot] of chunk) {
      const kept = this.#snapshots.get(agentId);
      if (kept === undefined) {
        snapshot.copied = at;
        this.#snapshots.set(agentId, snapshot);
      } else {
        combine(kept, snapshot).copied = at;
      }
    }
  }

  /** A disconnect at least as new was written to workspace_agents: a resend of the kept update would be stale. */
  dropOlder(agentId: string, updatedMs: number): void {
    const kept = this.#snapshots.get(agentId);
    if (kept !== undefined && kept.updated <= updatedMs) this.#snapshots.delete(agentId);
  }

  /** Everything kept, for a resend; the store is empty afterwards. */
  takeAll(): Map<string, Snapshot> {
    const all = this.#snapshots;
    this.#snapshots = new Map();
    for (const snapshot of all.values()) snapshot.copied = NaN;
    return all;
  }

  /** Whether `client` (a connection) has had its epoch read. */
  knows(client: object): boolean {
    return this.#clients.has(client);
  }

  /** Whether the last epoch check is older than `everyMs`. */
  checkDue(everyMs: number, now = performance.now()): boolean {
    return now - this.#lastCheck >= everyMs;
  }

  /**
   * Records an epoch reading made on `client`, sent at `sentAt`
   * (performance.now()): `drainedUs` and `checkedUs` are the database clock's
   * staging_epoch().drained_through and checked_at in microseconds. Returns true
   * when the epoch changed (staging was reset since the last reading).
   */
  observe(client: object, epoch: string, sentAt: number, drainedUs: number | null, checkedUs: number): boolean {
    this.#unsupported = false;
    this.#lastCheck = sentAt;
    this.#clients.add(client);
    if (this.#epoch !== null && this.#epoch !== epoch) {
      this.#epoch = epoch;
      return true;
    }
    this.#epoch = epoch;
    if (drainedUs !== null) {
      // drained_through was (checked_at - drained_through) before a moment that came after sentAt
      const before = sentAt - (checkedUs - drainedUs) / 1000;
      for (const [agentId, snapshot] of this.#snapshots) {
        if (snapshot.copied < before) this.#snapshots.delete(agentId);
      }
    }
    return false;
  }
}

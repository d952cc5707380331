/**
 * The oracle: what public.workspace_agents may hold for one agent after a set
 * of staged heartbeats and direct disconnects have all been merged, computed
 * in TypeScript from the same inputs, in any arrival and merge order.
 *
 * It models what the SQL really does (sql/004_merge.sql, sql/005_disconnect.sql):
 *   - a staged snapshot is applied only when its updated_at is STRICTLY newer
 *     than the row's; disconnect_agent likewise; so the event with the greatest
 *     updated_at always ends up in the row, and nothing older undoes it;
 *   - ties on updated_at between events that reach the database in different
 *     merges (or a disconnect and a heartbeat) go to whichever is applied first
 *     (the strict guard keeps it): the oracle accepts any event of the tied
 *     newest set. Within one COPY batch or one merge the tie-break order is
 *     deterministic, but which events share a batch depends on timing;
 *   - disconnect_agent sets disconnected_at, updated_at and (when given) the
 *     replica; last_connected_at only when the stager passes on a pending
 *     heartbeat it drops; so when a disconnect is the newest event
 *     last_connected_at comes from whichever heartbeat was applied or dropped
 *     last before it (timing), or the initial row;
 *   - first_connected_at is exact and order-independent: the earliest of the
 *     initial row's and every heartbeat's. Every heartbeat's value reaches the
 *     row: the client keeps the earliest when it dedupes, the merge applies it
 *     even from a stale snapshot, and stager.disconnect() passes on the one of a
 *     pending heartbeat it drops (disconnect_agent keeps it even when stale).
 * Times are epoch ms; NaN stands for NULL.
 */

export interface OracleRow {
  first: number;
  last: number;
  disconnected: number;
  replica: string | null;
  updated: number;
}

export interface HeartbeatEvent {
  kind: 'heartbeat';
  first: number;
  last: number;
  disconnected: number;
  replica: string | null;
  updated: number;
}

export interface DisconnectEvent {
  kind: 'disconnect';
  disconnected: number;
  /** Non-null in the property test; NULL keeps the stored replica (COALESCE). */
  replica: string | null;
  updated: number;
}

export type AgentEvent = HeartbeatEvent | DisconnectEvent;

const least = (a: number, b: number): number => (Number.isNaN(a) ? b : Number.isNaN(b) ? a : Math.min(a, b));
const same = (a: number, b: number): boolean => (Number.isNaN(a) ? Number.isNaN(b) : a === b);

/**
 * Returns null when `actual` is a state the database may legitimately reach
 * from `initial` and `events`, else a description of why not.
 */
export function checkAgent(initial: OracleRow, events: AgentEvent[], actual: OracleRow): string | null {
  const newest = Math.max(initial.updated, ...events.map((e) => e.updated));
  if (actual.updated !== newest) return `updated_at ${actual.updated} is not the newest event's ${newest}`;
  const heartbeats = events.filter((e): e is HeartbeatEvent => e.kind === 'heartbeat');
  const earliestFirst = heartbeats.reduce((m, h) => least(m, h.first), initial.first);
  if (!same(actual.first, earliestFirst)) {
    return `first_connected_at ${actual.first} is not the earliest ever seen (${earliestFirst})`;
  }
  if (events.every((e) => e.updated <= initial.updated)) {
    return rowEquals({ ...initial, first: earliestFirst }, actual) ? null : 'no event was newer than the initial row, yet the row changed';
  }
  const tied = events.filter((e) => e.updated === newest);
  for (const e of tied) {
    if (e.kind === 'heartbeat') {
      // the tied heartbeat was applied: its columns
      if (
        same(actual.last, e.last) && same(actual.disconnected, e.disconnected) && actual.replica === e.replica
      ) return null;
    } else {
      // the disconnect was applied; last comes from the last heartbeat applied (or dropped) before it, or the initial row
      if (!same(actual.disconnected, e.disconnected)) continue;
      const before = heartbeats.filter((h) => h.updated <= newest);
      const replicaOk = (r: string | null): boolean => (e.replica !== null ? actual.replica === e.replica : actual.replica === r);
      if (same(actual.last, initial.last) && replicaOk(initial.replica)) return null;
      for (const h of before) {
        if (same(actual.last, h.last) && (e.replica !== null || replicaOk(h.replica))) {
          return null;
        }
      }
      // with a NULL replica the stored one may also come from an earlier disconnect
      if (e.replica === null && events.some((d) => d.kind === 'disconnect' && d.replica === actual.replica)) {
        if (same(actual.last, initial.last) || before.some((h) => same(actual.last, h.last))) return null;
      }
    }
  }
  return `row ${fmt(actual)} matches none of the ${tied.length} newest event(s) at ${newest}: ${tied.map((e) => JSON.stringify(e)).join(', ')}`;
}

export function rowEquals(a: OracleRow, b: OracleRow): boolean {
  return same(a.first, b.first) && same(a.last, b.last) && same(a.disconnected, b.disconnected) && a.replica === b.replica && a.updated === b.updated;
}

function fmt(r: OracleRow): string {
  const t = (x: number): string => (Number.isNaN(x) ? 'NULL' : String(x));
  return `{first ${t(r.first)}, last ${t(r.last)}, disconnected ${t(r.disconnected)}, replica ${r.replica ?? 'NULL'}, updated ${r.updated}}`;
}

/** The row as read from workspace_agents, in oracle form. */
export function fromDbRow(r: {
  first_connected_at: Date | null; last_connected_at: Date | null; disconnected_at: Date | null;
  last_connected_replica_id: string | null; updated_at: Date;
}): OracleRow {
  const ms = (d: Date | null): number => (d === null ? NaN : d.getTime());
  return {
    first: ms(r.first_connected_at), last: ms(r.last_connected_at), disconnected: ms(r.disconnected_at),
    replica: r.last_connected_replica_id, updated: r.updated_at.getTime(),
  };
}

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
 *     replica, and never touches first_connected_at or last_connected_at, so
 *     when a disconnect is the newest event those two columns come from
 *     whichever heartbeat was applied last before it (timing), or the initial row;
 *   - first_connected_at = LEAST(row, min first_connected_at of the staged rows
 *     of each merge that APPLIED). A merge whose newest staged snapshot is stale
 *     does not apply its first_connected_at, and stager.disconnect() drops a
 *     pending snapshot (with its first_connected_at). So the final value is the
 *     initial one or the first_connected_at of some heartbeat, never later than
 *     the initial value nor than the applied snapshot's own first_connected_at.
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
/** a <= b where NULL (NaN) is treated as +infinity, as LEAST treats it. */
const notLater = (a: number, b: number): boolean => Number.isNaN(b) || (!Number.isNaN(a) && a <= b);

/**
 * Returns null when `actual` is a state the database may legitimately reach
 * from `initial` and `events`, else a description of why not.
 */
export function checkAgent(initial: OracleRow, events: AgentEvent[], actual: OracleRow): string | null {
  const newest = Math.max(initial.updated, ...events.map((e) => e.updated));
  if (actual.updated !== newest) return `updated_at ${actual.updated} is not the newest event's ${newest}`;
  if (events.every((e) => e.updated <= initial.updated)) {
    return rowEquals(initial, actual) ? null : 'no event was newer than the initial row, yet the row changed';
  }
  const heartbeats = events.filter((e): e is HeartbeatEvent => e.kind === 'heartbeat');
  const firstOk = (first: number, upperBound: number): boolean =>
    notLater(first, upperBound) &&
    (same(first, initial.first) || heartbeats.some((h) => same(first, least(initial.first, h.first)) || same(first, h.first)));
  const tied = events.filter((e) => e.updated === newest);
  for (const e of tied) {
    if (e.kind === 'heartbeat') {
      // the tied heartbeat was applied: its columns, and first no later than its own (LEAST)
      if (
        same(actual.last, e.last) && same(actual.disconnected, e.disconnected) && actual.replica === e.replica &&
        firstOk(actual.first, least(initial.first, e.first))
      ) return null;
    } else {
      // the disconnect was applied; last/first come from the last heartbeat applied before it (or the initial row)
      if (!same(actual.disconnected, e.disconnected)) continue;
      const before = heartbeats.filter((h) => h.updated < newest);
      const replicaOk = (r: string | null): boolean => (e.replica !== null ? actual.replica === e.replica : actual.replica === r);
      if (same(actual.last, initial.last) && same(actual.first, initial.first) && replicaOk(initial.replica)) return null;
      for (const h of before) {
        if (same(actual.last, h.last) && firstOk(actual.first, least(initial.first, h.first)) && (e.replica !== null || replicaOk(h.replica))) {
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

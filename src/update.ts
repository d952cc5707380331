import { InvalidUpdateError } from './errors.ts';

/** One agent's connection snapshot, as the application reports it. */
export interface AgentUpdate {
  /** The agent's id: a UUID, hyphenated, in any case, optionally in braces. */
  agentId: string;
  firstConnectedAt?: Date | null;
  lastConnectedAt?: Date | null;
  lastConnectedReplicaId?: string | null;
  disconnectedAt?: Date | null;
  /** When this snapshot was taken; the newest snapshot per agent wins. */
  updatedAt: Date;
}

/** A disconnect, written straight to workspace_agents by {@link HeartbeatStager.disconnect}. */
export interface AgentDisconnect {
  agentId: string;
  disconnectedAt: Date;
  updatedAt: Date;
  /** The replica that saw the disconnect; NULL keeps the stored one. */
  replicaId?: string | null;
  /** When the agent first connected, if known (the earliest value ever seen is kept). */
  firstConnectedAt?: Date | null;
  /** The agent's last connection, if known (replaces the stored one). */
  lastConnectedAt?: Date | null;
}

/**
 * A validated snapshot as kept in memory: the uuid in canonical lowercase form
 * and times as epoch milliseconds, NaN standing for NULL (numbers keep every
 * entry the same shape, which keeps memory per pending agent small).
 */
export interface Snapshot {
  agentId: string;
  first: number;
  last: number;
  replica: string | null;
  disconnected: number;
  updated: number;
  /** When (performance.now()) a COPY committed this snapshot to staging; NaN until then. */
  copied: number;
}

const UPDATE_FIELDS = new Set([
  'agentId', 'firstConnectedAt', 'lastConnectedAt', 'lastConnectedReplicaId', 'disconnectedAt', 'updatedAt',
]);
const DISCONNECT_FIELDS = new Set([
  'agentId', 'disconnectedAt', 'updatedAt', 'replicaId', 'firstConnectedAt', 'lastConnectedAt',
]);
/**
 * Earliest accepted timestamp, the same bound as the database's
 * heartbeat.valid_time(): anything earlier is a bug, not a heartbeat.
 */
export const MIN_TIMESTAMP_MS = Date.UTC(1970, 0, 1);

const hasOwn = Object.prototype.hasOwnProperty;
const getTime = Date.prototype.getTime;

/**
 * Reads an own property only (never one inherited from a polluted prototype);
 * a getter that throws becomes an {@link InvalidUpdateError} for that field.
 */
function own(obj: object, field: string): unknown {
  try {
    // inside the try: a Proxy's getOwnPropertyDescriptor trap runs here and may throw too
    if (!hasOwn.call(obj, field)) return undefined;
    return (obj as Record<string, unknown>)[field];
  } catch (err) {
    throw new InvalidUpdateError(field, `could not be read (${describeThrown(err)})`);
  }
}

/**
 * What was thrown, as text, without ever throwing itself (a thrown Proxy or an
 * object whose toString throws must not escape as a raw error).
 */
function describeThrown(err: unknown): string {
  try {
    const text = err instanceof Error ? err.message : String(err);
    return text.length > 200 ? `${text.slice(0, 200)}…` : text;
  } catch {
    return 'an unprintable value';
  }
}

/** Rejects fields outside `known` (own enumerable keys only: prototype pollution is ignored). */
function checkFields(obj: object, known: Set<string>): void {
  for (const key in obj) {
    if (hasOwn.call(obj, key) && !known.has(key)) throw new InvalidUpdateError(key, 'is not a known field');
  }
}

/** True when `s[from..from+36)` is a hyphenated uuid in lowercase hex. */
function isCanonicalUuid(s: string, from: number): boolean {
  for (let i = 0; i < 36; i++) {
    const c = s.charCodeAt(from + i);
    if (i === 8 || i === 13 || i === 18 || i === 23) {
      if (c !== 45) return false; // '-'
    } else if (!((c >= 48 && c <= 57) || (c >= 97 && c <= 102))) return false; // 0-9 a-f
  }
  return true;
}

/**
 * Canonical form of a uuid (lowercase, hyphenated), or an {@link InvalidUpdateError}.
 * A string already in canonical form is returned as is (no copy), which keeps
 * stage() allocation-free for well-behaved callers.
 */
export function canonicalUuid(value: unknown, field: string): string {
  if (typeof value !== 'string') throw new InvalidUpdateError(field, `must be a uuid string, got ${typeName(value)}`);
  if (value.length === 36 && isCanonicalUuid(value, 0)) return value;
  let inner = value;
  if (value.length === 38 && value.charCodeAt(0) === 123 && value.charCodeAt(37) === 125) inner = value.slice(1, 37); // {…}
  if (inner.length === 36) {
    const lower = inner.toLowerCase();
    if (isCanonicalUuid(lower, 0)) return lower;
  }
  throw new InvalidUpdateError(field, `must be a uuid like 0b4a2c3e-5f67-4d89-a1b2-c3d4e5f60718, got ${JSON.stringify(value.slice(0, 60))}`);
}

/** True for a real Date. Date.prototype.getTime checks the internal slot: it runs no Proxy trap, getter or toStringTag. */
function isRealDate(value: object): boolean {
  try {
    getTime.call(value);
    return true;
  } catch {
    return false;
  }
}

function typeName(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'object' && isRealDate(value)) return 'Date';
  return typeof value;
}

/** The time of a real Date (not a look-alike or a Proxy around one), or an {@link InvalidUpdateError}. */
function dateMs(value: unknown, field: string): number {
  if (typeof value !== 'object' || value === null) throw new InvalidUpdateError(field, `must be a Date, got ${typeName(value)}`);
  try {
    return getTime.call(value);
  } catch {
    throw new InvalidUpdateError(field, 'must be a Date, got an object that only looks like one (a look-alike, or a Proxy around a Date)');
  }
}

function time(value: unknown, field: string, maxMs: number, required: boolean): number {
  if (value === undefined || value === null) {
    if (required) throw new InvalidUpdateError(field, 'is required');
    return NaN;
  }
  const ms = dateMs(value, field);
  if (Number.isNaN(ms)) throw new InvalidUpdateError(field, 'is an invalid Date');
  if (ms < MIN_TIMESTAMP_MS) throw new InvalidUpdateError(field, `is before 1970-01-01 (${new Date(ms).toISOString()})`);
  if (ms > maxMs) {
    throw new InvalidUpdateError(field, `is too far in the future (${new Date(ms).toISOString()}): more than the allowed clock skew ahead`);
  }
  return ms;
}

let lastReplicaIn: unknown;
let lastReplicaOut: string | null = null;

/**
 * Validates an update and returns its snapshot, or throws an
 * {@link InvalidUpdateError} naming the first bad field. `maxSkewMs` bounds how
 * far ahead of this process's clock a timestamp may be.
 */
export function toSnapshot(update: AgentUpdate, maxSkewMs: number, now = Date.now()): Snapshot {
  if (update === null || typeof update !== 'object') {
    throw new InvalidUpdateError('update', `must be an object, got ${typeName(update)}`);
  }
  try {
    checkFields(update, UPDATE_FIELDS);
  } catch (err) {
    // a Proxy's ownKeys/has traps may throw anything
    if (err instanceof InvalidUpdateError) throw err;
    throw new InvalidUpdateError('update', `could not be read (${describeThrown(err)})`);
  }
  const maxMs = now + maxSkewMs;
  const replica = own(update, 'lastConnectedReplicaId');
  // a fleet has few replicas: remember the last one validated
  if (replica !== lastReplicaIn && replica !== undefined && replica !== null) {
    lastReplicaOut = canonicalUuid(replica, 'lastConnectedReplicaId');
    lastReplicaIn = replica;
  }
  return {
    agentId: canonicalUuid(own(update, 'agentId'), 'agentId'),
    first: time(own(update, 'firstConnectedAt'), 'firstConnectedAt', maxMs, false),
    last: time(own(update, 'lastConnectedAt'), 'lastConnectedAt', maxMs, false),
    replica: replica === undefined || replica === null ? null : lastReplicaOut,
    disconnected: time(own(update, 'disconnectedAt'), 'disconnectedAt', maxMs, false),
    updated: time(own(update, 'updatedAt'), 'updatedAt', maxMs, true),
    copied: NaN,
  };
}

/** Validates a disconnect; returns the canonical ids and times (NaN for NULL). */
export function checkDisconnect(d: AgentDisconnect, maxSkewMs: number, now = Date.now()): {
  agentId: string; replicaId: string | null; disconnectedAt: number; updatedAt: number; first: number; last: number;
} {
  if (d === null || typeof d !== 'object') throw new InvalidUpdateError('disconnect', `must be an object, got ${typeName(d)}`);
  try {
    checkFields(d, DISCONNECT_FIELDS);
  } catch (err) {
    if (err instanceof InvalidUpdateError) throw err;
    throw new InvalidUpdateError('disconnect', `could not be read (${describeThrown(err)})`);
  }
  const maxMs = now + maxSkewMs;
  const replicaId = own(d, 'replicaId');
  return {
    agentId: canonicalUuid(own(d, 'agentId'), 'agentId'),
    replicaId: replicaId === undefined || replicaId === null ? null : canonicalUuid(replicaId, 'replicaId'),
    disconnectedAt: time(own(d, 'disconnectedAt'), 'disconnectedAt', maxMs, true),
    updatedAt: time(own(d, 'updatedAt'), 'updatedAt', maxMs, true),
    first: time(own(d, 'firstConnectedAt'), 'firstConnectedAt', maxMs, false),
    last: time(own(d, 'lastConnectedAt'), 'lastConnectedAt', maxMs, false),
  };
}

const REPLICA_DISCONNECT_FIELDS = new Set(['disconnectedAt', 'updatedAt']);

/**
 * The `at` argument of disconnectReplica(): its own fields only (a polluted
 * Object.prototype fills nothing), unknown fields rejected like stage() does;
 * the times themselves are validated by {@link checkDisconnect}.
 */
export function checkReplicaDisconnectTimes(at: unknown): { disconnectedAt?: Date; updatedAt?: Date } {
  if (at === null || typeof at !== 'object') throw new InvalidUpdateError('at', `must be an object, got ${typeName(at)}`);
  try {
    checkFields(at, REPLICA_DISCONNECT_FIELDS);
  } catch (err) {
    if (err instanceof InvalidUpdateError) throw err;
    throw new InvalidUpdateError('at', `could not be read (${describeThrown(err)})`);
  }
  const disconnectedAt = own(at, 'disconnectedAt') ?? undefined;
  const updatedAt = own(at, 'updatedAt') ?? undefined;
  return { disconnectedAt: disconnectedAt as Date | undefined, updatedAt: updatedAt as Date | undefined };
}

/** NULL-last descending order on a nullable time: positive when a ranks before b. */
function cmpTime(a: number, b: number): number {
  const an = Number.isNaN(a);
  const bn = Number.isNaN(b);
  if (an || bn) return an === bn ? 0 : an ? -1 : 1;
  return a - b;
}

/**
 * The total order the merge uses (sql/004_merge.sql), so the client keeps the
 * same snapshot the database would: newer updated_at wins; on a tie a
 * disconnect wins, then the later last_connected_at, then the greater replica id.
 * Positive when `a` wins over `b`.
 */
export function compareSnapshots(a: Snapshot, b: Snapshot): number {
  return (
    a.updated - b.updated ||
    cmpTime(a.disconnected, b.disconnected) ||
    cmpTime(a.last, b.last) ||
    (a.replica === b.replica ? 0 : a.replica === null ? -1 : b.replica === null ? 1 : a.replica < b.replica ? -1 : 1)
  );
}

/** The earlier of two nullable times (NULL loses, like SQL's LEAST). */
export function earliest(a: number, b: number): number {
  if (Number.isNaN(a)) return b;
  if (Number.isNaN(b)) return a;
  return a < b ? a : b;
}

/**
 * Folds `incoming` into `kept` (same agent), in place: `kept` becomes the
 * winning snapshot, with the earliest first_connected_at of both, and is
 * returned. Updating the long-lived object instead of keeping the new one
 * leaves `incoming` as short-lived garbage, which is what makes a repeat
 * heartbeat cheap (no promotion to the old generation).
 */
export function combine(kept: Snapshot, incoming: Snapshot): Snapshot {
  const first = earliest(kept.first, incoming.first);
  if (compareSnapshots(incoming, kept) > 0) {
    kept.last = incoming.last;
    kept.replica = incoming.replica;
    kept.disconnected = incoming.disconnected;
    kept.updated = incoming.updated;
  }
  kept.first = first;
  return kept;
}

import type { Snapshot } from './update.ts';

/**
 * Encodes snapshots in PostgreSQL's binary COPY format for
 * heartbeat.agent_connection_staging (agent_id, first_connected_at,
 * last_connected_at, last_connected_replica_id, disconnected_at, updated_at).
 * Binary COPY costs the server a fraction of text parsing: a uuid is 16 raw
 * bytes and a timestamptz an int64 of microseconds since 2000-01-01.
 * Rows are written into large buffers, never one write per row.
 */
const SIGNATURE = Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1');
const HEADER = Buffer.concat([SIGNATURE, Buffer.alloc(8)]); // flags int32 = 0, extension length int32 = 0
const TRAILER = Buffer.from([0xff, 0xff]);
const FIELDS = 6;
/** The largest encoded row: field count, 2 uuids and 4 timestamps with their lengths. */
export const MAX_ROW_BYTES = 2 + 2 * (4 + 16) + 4 * (4 + 8);
const PG_EPOCH_MS = Date.UTC(2000, 0, 1);
const TWO_32 = 4294967296;
/** Default size of one buffer handed to the COPY stream. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;

function writeUuid(buf: Buffer, at: number, uuid: string | null): number {
  if (uuid === null) {
    buf.writeInt32BE(-1, at);
    return at + 4;
  }
  buf.writeInt32BE(16, at);
  // canonical form: 8-4-4-4-12 hex digits
  buf.write(uuid.slice(0, 8), at + 4, 4, 'hex');
  buf.write(uuid.slice(9, 13), at + 8, 2, 'hex');
  buf.write(uuid.slice(14, 18), at + 10, 2, 'hex');
  buf.write(uuid.slice(19, 23), at + 12, 2, 'hex');
  buf.write(uuid.slice(24, 36), at + 14, 6, 'hex');
  return at + 20;
}

function writeTime(buf: Buffer, at: number, ms: number): number {
  if (Number.isNaN(ms)) {
    buf.writeInt32BE(-1, at);
    return at + 4;
  }
  buf.writeInt32BE(8, at);
  // exact in a double for any time within ±285 years of 2000 (validation keeps us there)
  const us = (ms - PG_EPOCH_MS) * 1000;
  const hi = Math.floor(us / TWO_32);
  buf.writeInt32BE(hi, at + 4);
  buf.writeUInt32BE(us - hi * TWO_32, at + 8);
  return at + 12;
}

/** Encodes one row at `at`; returns the offset after it. */
export function encodeRow(buf: Buffer, at: number, s: Snapshot): number {
  buf.writeInt16BE(FIELDS, at);
  let p = writeUuid(buf, at + 2, s.agentId);
  p = writeTime(buf, p, s.first);
  p = writeTime(buf, p, s.last);
  p = writeUuid(buf, p, s.replica);
  p = writeTime(buf, p, s.disconnected);
  return writeTime(buf, p, s.updated);
}

/** Yields the whole COPY payload (header, rows, trailer) in buffers of about `chunkBytes`. */
export function* encodeCopy(rows: Iterable<Snapshot>, chunkBytes = DEFAULT_CHUNK_BYTES): Generator<Buffer> {
  const size = Math.max(chunkBytes, MAX_ROW_BYTES + HEADER.length + TRAILER.length);
  let buf = Buffer.allocUnsafe(size);
  let at = HEADER.copy(buf, 0);
  for (const row of rows) {
    if (at + MAX_ROW_BYTES > size) {
      yield buf.subarray(0, at);
      buf = Buffer.allocUnsafe(size);
      at = 0;
    }
    at = encodeRow(buf, at, row);
  }
  if (at + TRAILER.length > size) {
    yield buf.subarray(0, at);
    buf = Buffer.allocUnsafe(TRAILER.length);
    at = 0;
  }
  at += TRAILER.copy(buf, at);
  yield buf.subarray(0, at);
}

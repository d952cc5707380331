/**
 * Issue 11, hostile values: fast-check feeds random hostile input through
 * stage(), disconnect(), raw INSERT/COPY into staging and direct
 * heartbeat.disconnect_agent() calls. Dates of every range (±8.64e15 ms, NaN,
 * before 1970, far future), strings, numbers, throwing getters, Proxies around
 * Dates and around the update object, unknown fields, a polluted
 * Object.prototype; in SQL 'infinity', '-infinity', '294276-12-31',
 * '4713-01-01 BC', NULLs. Each case either fails with a typed error
 * (InvalidUpdateError on the client; SQLSTATE 22008 or 22004 in SQL; skipped
 * and counted as invalid by the merge) or is stored exactly as an oracle
 * written here computes. After every case agent_status() (SQL and client) and
 * heartbeat.status (SQL and readStatus()) work for every agent, including rows
 * poisoned with such values before pg-heartbeat validated them, and a set of
 * sentinel agents is unaffected: their rows hold exactly their own updates,
 * staged in the same batch as the hostile one.
 * HEARTBEAT_FC_RUNS / HEARTBEAT_FC_SEED override the run count / seed.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { from as copyFrom } from 'pg-copy-streams';
import { InvalidUpdateError } from '../../src/errors.ts';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentStatus, readStatus } from '../../src/status.ts';
import { createTestDb, type TestDb } from '../support/db.ts';

const numRuns = Number(process.env.HEARTBEAT_FC_RUNS ?? 100);
const seed = process.env.HEARTBEAT_FC_SEED ? Number(process.env.HEARTBEAT_FC_SEED) : undefined;
const fcOptions = { numRuns, ...(seed === undefined ? {} : { seed }) };
/** How often each outcome must have come up for a run to count (the generators give each about half). */
const ENOUGH = Math.max(1, Math.floor(numRuns / 20));

const SKEW = 300_000; // the stager's default maxClockSkewMs, and heartbeat.clock_horizon()'s 5 minutes
const EPOCH = new Date(0);
/** Times a hostile case may use as valid: never near either bound. */
const VALID_MAX_AGO = 2_000;

let db: TestDb;
let stager: HeartbeatStager;
const SENTINELS = 5;
const sentinels: string[] = [];
/** Each sentinel's newest update (ms), what its row must hold. */
const sentinelAt = new Map<string, number>();
let tick = Date.now() - 3_600_000;
/** Rows written straight into workspace_agents with values the merge no longer accepts. */
const poisoned: Array<{ id: string; values: Record<string, string | null> }> = [];

const POISON = ['infinity', '-infinity', '294276-12-31 00:00:00+00', '4713-01-01 00:00:00+00 BC'];

before(async () => {
  db = await createTestDb('fault_hostile_values');
  stager = new HeartbeatStager({ connectionString: db.url, max: 2 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
  for (let i = 0; i < SENTINELS; i++) sentinels.push(randomUUID());
  await db.pool.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), $2', [sentinels, new Date('2020-01-01Z')]);
  // rows poisoned before pg-heartbeat validated timestamps (or by the table's owner): every column, every value
  for (const column of ['first_connected_at', 'last_connected_at', 'disconnected_at', 'updated_at']) {
    for (const value of POISON) {
      const id = randomUUID();
      const values: Record<string, string | null> = { first_connected_at: null, last_connected_at: null, disconnected_at: null, updated_at: '2020-01-01 00:00:00+00' };
      values[column] = value;
      if (column !== 'first_connected_at') values.first_connected_at = '2020-01-01 00:00:00+00';
      await db.pool.query(
        `INSERT INTO public.workspace_agents (id, first_connected_at, last_connected_at, disconnected_at, updated_at)
         VALUES ($1, $2::text::timestamptz, $3::text::timestamptz, $4::text::timestamptz, $5::text::timestamptz)`,
        [id, values.first_connected_at, values.last_connected_at, values.disconnected_at, values.updated_at],
      );
      poisoned.push({ id, values });
    }
  }
});
after(async () => {
  await stager?.close();
  await db?.drop();
});

/** A fresh agent whose row says nothing yet, updated_at at the earliest valid instant. */
async function freshVictim(): Promise<string> {
  const id = randomUUID();
  await db.pool.query('INSERT INTO public.workspace_agents (id, updated_at) VALUES ($1, $2)', [id, EPOCH]);
  return id;
}

interface Row { first: number | null; last: number | null; disconnected: number | null; replica: string | null; updated: number }
async function rowOf(id: string): Promise<Row> {
  const { rows } = await db.pool.query(
    `SELECT (extract(epoch FROM first_connected_at) * 1000)::float8 AS first, (extract(epoch FROM last_connected_at) * 1000)::float8 AS last,
            (extract(epoch FROM disconnected_at) * 1000)::float8 AS disconnected, last_connected_replica_id::text AS replica,
            (extract(epoch FROM updated_at) * 1000)::float8 AS updated
       FROM public.workspace_agents WHERE id = $1`,
    [id],
  );
  assert.ok(rows[0], `row ${id}`);
  return rows[0];
}
const UNTOUCHED: Row = { first: null, last: null, disconnected: null, replica: null, updated: 0 };

/** Stages one new update per sentinel (in the same stager as the hostile case). */
function stageSentinels(): void {
  for (const id of sentinels) {
    tick += 1000;
    stager.stage({ agentId: id, lastConnectedAt: new Date(tick), updatedAt: new Date(tick) });
    sentinelAt.set(id, tick);
  }
}

/** SQL for the sentinels' rows in a raw batch. */
function sentinelSqlRows(): Array<[string, string | null, string | null, string | null, string | null, string | null]> {
  return sentinels.map((id) => {
    tick += 1000;
    sentinelAt.set(id, tick);
    const t = new Date(tick).toISOString();
    return [id, null, t, null, null, t];
  });
}

/** After every case: the sentinels hold exactly their own newest update; every status call works for every agent. */
async function assertEverythingStillWorks(): Promise<void> {
  for (const id of sentinels) {
    const t = sentinelAt.get(id);
    if (t === undefined) continue;
    assert.deepEqual(await rowOf(id), { first: null, last: t, disconnected: null, replica: null, updated: t }, `sentinel ${id}`);
  }
  await assertStatusWorks();
}

/** agent_status() and heartbeat.status, in SQL and through the client, answer for every agent. */
async function assertStatusWorks(): Promise<void> {
  const { rows: total } = await db.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM public.workspace_agents');
  const { rows: sqlStatus } = await db.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM heartbeat.agent_status()');
  assert.equal(sqlStatus[0]!.n, total[0]!.n, 'heartbeat.agent_status() answers for every agent');
  const all = await agentStatus(db.pool);
  assert.equal(all.length, total[0]!.n, 'agentStatus() answers for every agent');
  for (const a of all) {
    assert.ok(['connecting', 'connected', 'disconnected', 'timeout'].includes(a.status), a.status);
    for (const t of [a.firstConnectedAt, a.lastConnectedAt, a.disconnectedAt]) assert.ok(t === null || t instanceof Date);
  }
  await db.pool.query('SELECT * FROM heartbeat.status');
  const status = await readStatus({ pool: db.pool });
  assert.ok(status.mergeLagMs === null || Number.isFinite(status.mergeLagMs), 'merge lag is finite or none');
}

/** Flushes (sentinels and whatever was accepted), merges, checks the sentinels and the status calls. */
async function settle(): Promise<void> {
  await stager.flush();
  await mergeNow(db.pool);
  await assertEverythingStillWorks();
}

// ------------------------------------------------------------------ client-side values

/** How one field of an update (or disconnect) is given. */
type FieldSpec =
  | { kind: 'absent' }
  | { kind: 'value'; value: unknown }
  | { kind: 'getter'; value: unknown }
  | { kind: 'throwingGetter'; thrown: 'error' | 'number' | 'unprintable' }
  | { kind: 'proxyDate'; ms: number; trap: 'none' | 'throwAll' | 'revoked' }
  | { kind: 'lookalike'; ms: number }
  | { kind: 'dateSubclass'; ms: number };

type Container = 'plain' | 'nullProto' | 'frozen' | 'classInstance' | 'proxy' | 'proxyThrowsOwnKeys' | 'proxyThrowsGetOwnProperty' | 'proxyThrowsGet';

interface ObjectSpec {
  fields: Record<string, FieldSpec>;
  extra: { key: string; value: unknown } | null;
  container: Container;
  pollute: { key: string; value: unknown } | null;
}

const validMs = (): fc.Arbitrary<number> => fc.integer({ min: 0, max: Date.now() - VALID_MAX_AGO });
const hostileMs = fc.oneof(
  fc.constantFrom(8.64e15, -8.64e15, Number.NaN, -1, Date.UTC(1969, 11, 31, 23, 59, 59, 999), Date.UTC(1900, 0, 1),
    Date.UTC(275760, 8, 13), Date.now() + 3_600_000, Date.now() + 10 * SKEW, Date.UTC(9999, 11, 31)),
  fc.date({ noInvalidDate: false }).map((d) => d.getTime()),
);
const anyMs = fc.oneof({ weight: 3, arbitrary: validMs() }, { weight: 2, arbitrary: hostileMs });

const strangeValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.constantFrom('infinity', '-infinity', '294276-12-31', '4713-01-01 BC', '1970-01-01T00:00:00Z', new Date().toISOString(), ''),
  fc.double(), fc.integer(), fc.bigInt(), fc.boolean(),
  fc.constant(null), fc.constant(undefined),
  fc.constant({}), fc.constant([]), fc.constant(Symbol('x')), fc.constant(() => new Date()),
);

function fieldArb(kind: 'time' | 'uuid', required: boolean, goodOnly = false): fc.Arbitrary<FieldSpec> {
  const good: fc.Arbitrary<unknown> = kind === 'time'
    ? fc.oneof(validMs().map((ms) => new Date(ms)), fc.constant(EPOCH), fc.constant(new Date(Date.now() - VALID_MAX_AGO)))
    : fc.oneof(fc.uuid().map((u) => u), fc.uuid().map((u) => u.toUpperCase()), fc.uuid().map((u) => `{${u}}`));
  if (goodOnly) {
    return fc.oneof(
      { weight: required ? 0 : 2, arbitrary: fc.constant<FieldSpec>({ kind: 'absent' }) },
      { weight: required ? 0 : 1, arbitrary: fc.constant<FieldSpec>({ kind: 'value', value: null }) },
      { weight: 6, arbitrary: good.map((value): FieldSpec => ({ kind: 'value', value })) },
      { weight: 1, arbitrary: good.map((value): FieldSpec => ({ kind: 'getter', value })) },
      ...(kind === 'time' ? [{ weight: 1, arbitrary: validMs().map((ms): FieldSpec => ({ kind: 'dateSubclass', ms })) }] : []),
    );
  }
  const bad: fc.Arbitrary<unknown> = kind === 'time' ? fc.oneof(hostileMs.map((ms) => new Date(ms)), strangeValue) : strangeValue;
  return fc.oneof(
    { weight: required ? 1 : 4, arbitrary: fc.constant<FieldSpec>({ kind: 'absent' }) },
    { weight: 8, arbitrary: good.map((value): FieldSpec => ({ kind: 'value', value })) },
    { weight: 3, arbitrary: bad.map((value): FieldSpec => ({ kind: 'value', value })) },
    { weight: 1, arbitrary: good.map((value): FieldSpec => ({ kind: 'getter', value })) },
    { weight: 1, arbitrary: fc.constantFrom('error', 'number', 'unprintable').map((thrown): FieldSpec => ({ kind: 'throwingGetter', thrown })) },
    ...(kind === 'time'
      ? [
          { weight: 1, arbitrary: fc.record({ ms: anyMs, trap: fc.constantFrom('none', 'throwAll', 'revoked') }).map((p): FieldSpec => ({ kind: 'proxyDate', ...p })) },
          { weight: 1, arbitrary: anyMs.map((ms): FieldSpec => ({ kind: 'lookalike', ms })) },
          { weight: 1, arbitrary: anyMs.map((ms): FieldSpec => ({ kind: 'dateSubclass', ms })) },
        ]
      : []),
  );
}

/**
 * Half of the cases are well-formed (every field valid, in any accepted shape: getters, a Date
 * subclass, a transparent Proxy, a frozen or prototype-less object, a polluted prototype), half
 * anything at all, so both outcomes are exercised.
 */
function objectArb(fieldKinds: Record<string, ['time' | 'uuid', boolean]>, known: string[]): fc.Arbitrary<ObjectSpec> {
  const fields = (goodOnly: boolean): fc.Arbitrary<Record<string, FieldSpec>> =>
    fc.record(Object.fromEntries(Object.entries(fieldKinds).map(([name, [kind, required]]) => [name, fieldArb(kind, required, goodOnly)])));
  const wellFormed = fc.record({
    fields: fields(true),
    extra: fc.constant(null),
    container: fc.constantFrom<Container>('plain', 'nullProto', 'frozen', 'classInstance', 'proxy'),
    pollute: fc.option(fc.record({
      key: fc.constantFrom('polluted', 'updatedAt', 'agentId', 'lastConnectedAt', 'disconnectedAt', 'firstConnectedAt', 'replicaId', 'lastConnectedReplicaId'),
      value: fc.oneof(validMs().map((ms) => new Date(ms)), fc.uuid(), fc.constant(1)),
    }), { freq: 3 }),
  });
  return fc.oneof(wellFormed, anyShape(fields(false), known));
}

function anyShape(fieldsArb: fc.Arbitrary<Record<string, FieldSpec>>, known: string[]): fc.Arbitrary<ObjectSpec> {
  return fc.record({
    fields: fieldsArb,
    extra: fc.option(fc.record({
      // ('__proto__' would set the prototype, not add a field)
      key: fc.oneof(fc.constantFrom('status', 'agent_id', 'updated_at', 'replicaId', 'lastConnectedReplicaId', '__proto__x', 'constructor'),
        fc.string({ minLength: 1, maxLength: 10 }).filter((k) => k !== '__proto__')),
      value: strangeValue,
    }), { freq: 5 }),
    container: fc.constantFrom<Container>('plain', 'plain', 'plain', 'nullProto', 'frozen', 'classInstance', 'proxy', 'proxyThrowsOwnKeys', 'proxyThrowsGetOwnProperty', 'proxyThrowsGet'),
    pollute: fc.option(fc.record({
      key: fc.constantFrom('polluted', 'updatedAt', 'agentId', 'lastConnectedAt', 'disconnectedAt', 'firstConnectedAt', 'replicaId', 'lastConnectedReplicaId'),
      value: fc.oneof(validMs().map((ms) => new Date(ms)), fc.uuid(), fc.constant(1)),
    }), { freq: 3 }),
  }).map((spec) => (spec.extra && known.includes(spec.extra.key) ? { ...spec, extra: null } : spec));
}

class SubDate extends Date {}
class Holder {}

function thrownValue(thrown: 'error' | 'number' | 'unprintable'): unknown {
  if (thrown === 'error') return new Error('getter exploded');
  if (thrown === 'number') return 42;
  return { toString() { throw new Error('cannot even print this'); } };
}

/** Builds the object a spec describes (fresh each time: getters and Proxies are not shrinkable values). */
function build(spec: ObjectSpec): object {
  const target: Record<string, unknown> = spec.container === 'nullProto' ? Object.create(null) : spec.container === 'classInstance' ? new Holder() as Record<string, unknown> : {};
  for (const [field, f] of Object.entries(spec.fields)) {
    switch (f.kind) {
      case 'absent':
        break;
      case 'value':
        target[field] = f.value;
        break;
      case 'getter':
        Object.defineProperty(target, field, { get: () => f.value, enumerable: true, configurable: true });
        break;
      case 'throwingGetter':
        Object.defineProperty(target, field, { get: () => { throw thrownValue(f.thrown); }, enumerable: true, configurable: true });
        break;
      case 'proxyDate': {
        const d = new Date(f.ms);
        if (f.trap === 'none') target[field] = new Proxy(d, {});
        else if (f.trap === 'throwAll') {
          const boom = (): never => { throw new Error('trap'); };
          target[field] = new Proxy(d, { get: boom, getPrototypeOf: boom, has: boom, ownKeys: boom, getOwnPropertyDescriptor: boom });
        } else {
          const r = Proxy.revocable(d, {});
          r.revoke();
          target[field] = r.proxy;
        }
        break;
      }
      case 'lookalike':
        target[field] = { getTime: () => f.ms, valueOf: () => f.ms, toISOString: () => new Date(0).toISOString(), [Symbol.toStringTag]: 'Date' };
        break;
      case 'dateSubclass':
        target[field] = new SubDate(f.ms);
        break;
    }
  }
  if (spec.extra) target[spec.extra.key] = spec.extra.value;
  if (spec.container === 'frozen') Object.freeze(target);
  const boom = (): never => { throw new TypeError('hostile trap'); };
  switch (spec.container) {
    case 'proxy': return new Proxy(target, {});
    case 'proxyThrowsOwnKeys': return new Proxy(target, { ownKeys: boom });
    case 'proxyThrowsGetOwnProperty': return new Proxy(target, { getOwnPropertyDescriptor: boom });
    case 'proxyThrowsGet': return new Proxy(target, { get: boom });
    default: return target;
  }
}

/** The oracle: what a field spec validates to (ms, NaN for none) or 'bad'. */
function timeOf(f: FieldSpec, required: boolean, now: number): number | 'bad' {
  let value: unknown;
  if (f.kind === 'absent') value = undefined;
  else if (f.kind === 'value' || f.kind === 'getter') value = f.value;
  else if (f.kind === 'dateSubclass') value = new Date(f.ms);
  else return 'bad'; // a throwing getter, a Proxy, a look-alike
  if (value === undefined || value === null) return required ? 'bad' : NaN;
  if (!(value instanceof Date)) return 'bad';
  const ms = value.getTime();
  if (Number.isNaN(ms) || ms < 0 || ms > now + SKEW) return 'bad';
  return ms;
}
function uuidOf(f: FieldSpec, required: boolean): string | null | 'bad' {
  let value: unknown;
  if (f.kind === 'absent') value = undefined;
  else if (f.kind === 'value' || f.kind === 'getter') value = f.value;
  else return 'bad';
  if (value === undefined || value === null) return required ? 'bad' : null;
  if (typeof value !== 'string') return 'bad';
  const m = /^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$/.exec(value);
  if (!m || (value.startsWith('{') !== value.endsWith('}'))) return 'bad';
  return m[1]!.toLowerCase();
}
/** Whether the container lets pg-heartbeat read it at all. */
const readable = (spec: ObjectSpec): boolean => !['proxyThrowsOwnKeys', 'proxyThrowsGetOwnProperty', 'proxyThrowsGet'].includes(spec.container);

function withPollution<T>(spec: ObjectSpec, fn: () => T): T {
  if (!spec.pollute) return fn();
  const proto = Object.prototype as Record<string, unknown>;
  proto[spec.pollute.key] = spec.pollute.value;
  let result: T;
  try {
    result = fn();
  } catch (err) {
    delete proto[spec.pollute.key];
    throw err;
  }
  if (result instanceof Promise) {
    return result.finally(() => delete proto[spec.pollute!.key]) as T;
  }
  delete proto[spec.pollute.key];
  return result;
}

function assertTypedRejection(err: unknown, what: string): void {
  assert.ok(err instanceof InvalidUpdateError, `${what}: expected InvalidUpdateError, got ${String((err as Error)?.constructor?.name)}: ${String((err as Error)?.message)}`);
  assert.equal(err.code, 'INVALID_UPDATE');
  assert.equal(typeof err.field, 'string');
}

const updateArb = objectArb({
  agentId: ['uuid', true],
  firstConnectedAt: ['time', false],
  lastConnectedAt: ['time', false],
  disconnectedAt: ['time', false],
  updatedAt: ['time', true],
  lastConnectedReplicaId: ['uuid', false],
}, ['agentId', 'firstConnectedAt', 'lastConnectedAt', 'disconnectedAt', 'updatedAt', 'lastConnectedReplicaId']);

const disconnectArb = objectArb({
  agentId: ['uuid', true],
  disconnectedAt: ['time', true],
  updatedAt: ['time', true],
  replicaId: ['uuid', false],
  firstConnectedAt: ['time', false],
  lastConnectedAt: ['time', false],
}, ['agentId', 'disconnectedAt', 'updatedAt', 'replicaId', 'firstConnectedAt', 'lastConnectedAt']);

/** A valid agentId spec is replaced by the victim's id (in the spec's spelling); an invalid one is kept. */
function aimAt(spec: ObjectSpec, victim: string): ObjectSpec {
  const f = spec.fields.agentId!;
  if ((f.kind === 'value' || f.kind === 'getter') && uuidOf(f, true) !== 'bad') {
    const s = f.value as string;
    const spelled = s.startsWith('{') ? `{${victim.toUpperCase()}}` : s === s.toUpperCase() ? victim.toUpperCase() : victim;
    return { ...spec, fields: { ...spec.fields, agentId: { ...f, value: spelled } } };
  }
  return spec;
}

describe('hostile values through the client', () => {
  test('stage(): a typed InvalidUpdateError, or stored exactly; the sentinels in the same COPY land; status keeps working', async () => {
    let accepted = 0;
    let rejected = 0;
    await fc.assert(fc.asyncProperty(updateArb, async (raw) => {
      const victim = await freshVictim();
      const spec = aimAt(raw, victim);
      stageSentinels();
      const now = Date.now();
      const f = spec.fields;
      const expect = {
        agent: uuidOf(f.agentId!, true), first: timeOf(f.firstConnectedAt!, false, now), last: timeOf(f.lastConnectedAt!, false, now),
        disconnected: timeOf(f.disconnectedAt!, false, now), updated: timeOf(f.updatedAt!, true, now), replica: uuidOf(f.lastConnectedReplicaId!, false),
      };
      const valid = readable(spec) && !spec.extra && Object.values(expect).every((v) => v !== 'bad');
      let thrown: unknown = null;
      try {
        withPollution(spec, () => stager.stage(build(spec) as never));
      } catch (err) {
        thrown = err;
      }
      if (valid) {
        assert.equal(thrown, null, `accepted by the oracle, but: ${String(thrown)}`);
        accepted++;
      } else {
        assertTypedRejection(thrown, 'stage()');
        rejected++;
      }
      await settle();
      const n = (v: number | string | null | 'bad'): number | null => (typeof v === 'number' && !Number.isNaN(v) ? v : null);
      let expected = UNTOUCHED;
      if (valid && (expect.updated as number) > 0) {
        expected = { first: n(expect.first), last: n(expect.last), disconnected: n(expect.disconnected), replica: expect.replica as string | null, updated: expect.updated as number };
      } else if (valid && n(expect.first) !== null) {
        expected = { ...UNTOUCHED, first: n(expect.first) }; // too old to apply, but it knows the first connection
      }
      assert.deepEqual(await rowOf(victim), expected, 'the victim row: exactly the update, or untouched');
    }), fcOptions);
    assert.ok(accepted >= ENOUGH && rejected >= ENOUGH, `both outcomes were exercised (accepted ${accepted}, rejected ${rejected})`);
  });

  test('disconnect(): a typed InvalidUpdateError before the database, or applied exactly; nothing else changes', async () => {
    let accepted = 0;
    let rejected = 0;
    await fc.assert(fc.asyncProperty(disconnectArb, async (raw) => {
      const victim = await freshVictim();
      const spec = aimAt(raw, victim);
      stageSentinels();
      const now = Date.now();
      const f = spec.fields;
      const expect = {
        agent: uuidOf(f.agentId!, true), disconnected: timeOf(f.disconnectedAt!, true, now), updated: timeOf(f.updatedAt!, true, now),
        replica: uuidOf(f.replicaId!, false), first: timeOf(f.firstConnectedAt!, false, now), last: timeOf(f.lastConnectedAt!, false, now),
      };
      const valid = readable(spec) && !spec.extra && Object.values(expect).every((v) => v !== 'bad');
      let result: unknown;
      let thrown: unknown = null;
      try {
        result = await withPollution(spec, () => stager.disconnect(build(spec) as never));
      } catch (err) {
        thrown = err;
      }
      const n = (v: number | string | null | 'bad'): number | null => (typeof v === 'number' && !Number.isNaN(v) ? v : null);
      let expected = UNTOUCHED;
      if (valid) {
        assert.equal(thrown, null, `accepted by the oracle, but: ${String(thrown)}`);
        const applied = (expect.updated as number) > 0;
        assert.equal(result, applied, 'disconnect() resolves to whether the row changed');
        if (applied) {
          expected = { first: n(expect.first), last: n(expect.last), disconnected: expect.disconnected as number, replica: expect.replica as string | null, updated: expect.updated as number };
        } else if (n(expect.first) !== null) {
          expected = { ...UNTOUCHED, first: n(expect.first) }; // too old to apply, but it knows the first connection
        }
        accepted++;
      } else {
        assertTypedRejection(thrown, 'disconnect()');
        rejected++;
      }
      await settle();
      assert.deepEqual(await rowOf(victim), expected, 'the victim row');
    }), fcOptions);
    assert.ok(accepted >= ENOUGH && rejected >= ENOUGH, `both outcomes were exercised (accepted ${accepted}, rejected ${rejected})`);
  });

  test('a polluted Object.prototype fills no missing field and breaks no valid update', async () => {
    const victim = await freshVictim();
    const proto = Object.prototype as Record<string, unknown>;
    const t = new Date(Date.now() - 10_000);
    try {
      proto.polluted = 1;
      proto.updatedAt = t;
      proto.lastConnectedAt = t;
      assert.throws(() => stager.stage({ agentId: victim } as never), (e: unknown) => e instanceof InvalidUpdateError && e.field === 'updatedAt');
      await assert.rejects(stager.disconnect({ agentId: victim, disconnectedAt: t } as never), (e: unknown) => e instanceof InvalidUpdateError && e.field === 'updatedAt');
      await assert.rejects(stager.disconnectReplica(randomUUID(), { disconnectedAt: t, bogus: 1 } as never), (e: unknown) => e instanceof InvalidUpdateError && e.field === 'bogus');
      stager.stage({ agentId: victim, updatedAt: t });
      stageSentinels();
      await stager.flush();
    } finally {
      delete proto.polluted;
      delete proto.updatedAt;
      delete proto.lastConnectedAt;
    }
    await mergeNow(db.pool);
    assert.deepEqual(await rowOf(victim), { ...UNTOUCHED, updated: t.getTime() }, 'lastConnectedAt was not taken from the prototype');
    await assertEverythingStillWorks();
  });
});

// ------------------------------------------------------------------ SQL-side values

/** SQL literals for a timestamp column, with whether heartbeat.valid_time() accepts them. */
function sqlTimeArb(): fc.Arbitrary<{ text: string | null; valid: boolean; ms: number | null }> {
  const now = Date.now();
  return fc.oneof(
    { weight: 3, arbitrary: fc.constant({ text: null, valid: true, ms: null }) },
    { weight: 5, arbitrary: validMs().map((ms) => ({ text: new Date(ms).toISOString(), valid: true, ms })) },
    { weight: 1, arbitrary: fc.constant({ text: '1970-01-01 00:00:00+00', valid: true, ms: 0 }) },
    { weight: 1, arbitrary: fc.constant({ text: new Date(now + SKEW - 60_000).toISOString(), valid: true, ms: now + SKEW - 60_000 }) },
    {
      weight: 4,
      arbitrary: fc.constantFrom('infinity', '-infinity', '294276-12-31 00:00:00+00', '4713-01-01 00:00:00+00 BC', '1969-12-31 23:59:59.999999+00',
        new Date(now + 3_600_000).toISOString(), '2500-01-01 00:00:00+00').map((text) => ({ text, valid: false, ms: null })),
    },
  );
}

describe('hostile values through SQL', () => {
  test('raw INSERT or COPY into staging: invalid rows are skipped and counted, valid ones stored exactly, the sentinels in the same batch land', async () => {
    const rowArb = fc.record({
      agent: fc.constantFrom('victim', 'victim', 'victim', 'null', 'unknown'),
      first: sqlTimeArb(), last: sqlTimeArb(), disconnected: sqlTimeArb(), updated: sqlTimeArb(),
      how: fc.constantFrom('insert', 'copy'),
    });
    let skipped = 0;
    await fc.assert(fc.asyncProperty(rowArb, async (r) => {
      const victim = await freshVictim();
      const agentId = r.agent === 'victim' ? victim : r.agent === 'unknown' ? randomUUID() : null;
      const hostile: [string | null, string | null, string | null, string | null, string | null, string | null] =
        [agentId, r.first.text, r.last.text, null, r.disconnected.text, r.updated.text];
      const batch = [...sentinelSqlRows(), hostile];
      if (r.how === 'insert') {
        await db.pool.query(
          `INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
           SELECT a, f::timestamptz, l::timestamptz, NULL, d::timestamptz, u::timestamptz
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(a, f, l, d, u)`,
          [batch.map((b) => b[0]), batch.map((b) => b[1]), batch.map((b) => b[2]), batch.map((b) => b[4]), batch.map((b) => b[5])],
        );
      } else {
        const client = await db.pool.connect();
        try {
          const text = batch.map((b) => b.map((v) => v ?? '\\N').join('\t')).join('\n') + '\n';
          await pipeline(Readable.from([text]), client.query(copyFrom(
            'COPY heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at) FROM STDIN',
          )));
        } finally {
          client.release();
        }
      }
      // status reads a staging table holding the hostile row
      await assertStatusWorks();
      const valid = agentId !== null && r.updated.text !== null && r.first.valid && r.last.valid && r.disconnected.valid && r.updated.valid;
      const merged = await mergeNow(db.pool);
      assert.equal(merged.skippedInvalid, valid ? 0 : 1, 'the hostile row is skipped as invalid exactly when it is');
      assert.equal(merged.skippedUnknown, valid && r.agent === 'unknown' ? 1 : 0);
      assert.equal(merged.deadLettered, 0);
      if (!valid) skipped++;
      const applied = valid && r.agent === 'victim' && (r.updated.ms as number) > 0;
      const expected: Row = applied
        ? { first: r.first.ms, last: r.last.ms, disconnected: r.disconnected.ms, replica: null, updated: r.updated.ms as number }
        : valid && r.agent === 'victim' && r.first.ms !== null ? { ...UNTOUCHED, first: r.first.ms } : UNTOUCHED;
      assert.deepEqual(await rowOf(victim), expected, 'the victim row');
      await assertEverythingStillWorks();
    }), fcOptions);
    assert.ok(skipped >= ENOUGH, `invalid rows were exercised (${skipped})`);
  });

  test('direct heartbeat.disconnect_agent() calls: 22004 for a NULL, 22008 for an invalid time, both changing nothing; otherwise applied exactly', async () => {
    const callArb = fc.record({
      agent: fc.constantFrom('victim', 'victim', 'victim', 'null', 'unknown'),
      disconnected: sqlTimeArb(), updated: sqlTimeArb(), first: sqlTimeArb(), last: sqlTimeArb(),
      replica: fc.option(fc.uuid(), { freq: 2 }),
    });
    const seen = new Set<string>();
    await fc.assert(fc.asyncProperty(callArb, async (c) => {
      const victim = await freshVictim();
      const agentId = c.agent === 'victim' ? victim : c.agent === 'unknown' ? randomUUID() : null;
      const outcome = await db.pool.query<{ applied: boolean }>(
        'SELECT heartbeat.disconnect_agent($1::uuid, $2::text::timestamptz, $3::text::timestamptz, $4::uuid, $5::text::timestamptz, $6::text::timestamptz) AS applied',
        [agentId, c.disconnected.text, c.updated.text, c.replica, c.first.text, c.last.text],
      ).then((res) => res.rows[0]!.applied, (err: { code?: string }) => `error ${err.code}`);
      let expectedOutcome: boolean | string;
      let expected = UNTOUCHED;
      if (agentId === null || c.disconnected.text === null || c.updated.text === null) expectedOutcome = 'error 22004';
      else if (![c.disconnected, c.updated, c.first, c.last].every((t) => t.valid)) expectedOutcome = 'error 22008';
      else if (c.agent === 'unknown') expectedOutcome = false;
      else if ((c.updated.ms as number) > 0) {
        expectedOutcome = true;
        expected = { first: c.first.ms, last: c.last.ms, disconnected: c.disconnected.ms, replica: c.replica, updated: c.updated.ms as number };
      } else {
        expectedOutcome = false;
        if (c.first.ms !== null) expected = { ...UNTOUCHED, first: c.first.ms };
      }
      seen.add(String(expectedOutcome));
      assert.equal(outcome, expectedOutcome);
      assert.deepEqual(await rowOf(victim), expected, 'the victim row');
      stageSentinels();
      await settle();
    }), fcOptions);
    if (numRuns >= 50) assert.ok(seen.has('error 22004') && seen.has('error 22008') && seen.has('true'), `every outcome was exercised: ${[...seen].join(', ')}`);
  });

  test('rows poisoned before validation (infinity, -infinity, year 294276, 4713 BC in any column): every status call answers for them', async () => {
    const statuses = await agentStatus(db.pool, { agentIds: poisoned.map((p) => p.id) });
    assert.equal(statuses.length, poisoned.length);
    for (const p of poisoned) {
      const s = statuses.find((x) => x.agentId === p.id)!;
      const date = (v: string | null): Date | null => {
        if (v === null || v === 'infinity' || v === '-infinity' || v.startsWith('294276')) return null; // not a Date a JS Date can hold
        return new Date(v.startsWith('4713') ? Date.UTC(-4712, 0, 1) : v.replace(' ', 'T').replace('+00', 'Z'));
      };
      assert.deepEqual(
        { first: s.firstConnectedAt, last: s.lastConnectedAt, disconnected: s.disconnectedAt },
        { first: date(p.values.first_connected_at!), last: date(p.values.last_connected_at!), disconnected: date(p.values.disconnected_at!) },
        JSON.stringify(p.values),
      );
      const updated = date(p.values.updated_at!);
      if (updated === null) assert.ok(Number.isNaN(s.updatedAt.getTime()), 'an updated_at a Date cannot hold is an Invalid Date');
      else assert.deepEqual(s.updatedAt, updated);
    }
    await assertEverythingStillWorks();
  });
});

describe('the clock-skew bound (heartbeat.clock_horizon(), 5 minutes)', () => {
  test('prevents freezing a row far ahead; does not prevent a writer lying within it: honest updates are stale until real time passes the lie', async () => {
    const victim = await freshVictim();
    // beyond the bound: skipped by the merge, refused by disconnect_agent (22008)
    await db.pool.query(
      "INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now() + interval '6 minutes', now() + interval '6 minutes')",
      [victim],
    );
    const beyond = await mergeNow(db.pool);
    assert.equal(beyond.skippedInvalid, 1);
    assert.deepEqual(await rowOf(victim), UNTOUCHED);
    await assert.rejects(db.pool.query("SELECT heartbeat.disconnect_agent($1, now(), now() + interval '6 minutes')", [victim]), { code: '22008' });

    // within the bound: a lie 4 minutes ahead is applied ...
    await db.pool.query(
      "INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at) VALUES ($1, now(), now() + interval '4 minutes', now() + interval '4 minutes')",
      [victim],
    );
    assert.equal((await mergeNow(db.pool)).agentsUpdated, 1);
    const lie = await rowOf(victim);
    assert.ok(lie.updated - Date.now() > 3 * 60_000 && lie.updated - Date.now() <= SKEW, 'stored 4 minutes ahead, never more than 5');
    // ... and freezes the row against honest updates until then: a heartbeat and a disconnect of now are stale
    const now = new Date();
    stager.stage({ agentId: victim, lastConnectedAt: now, updatedAt: now });
    await stager.flush();
    assert.equal((await mergeNow(db.pool)).skippedStale, 1);
    assert.equal(await stager.disconnect({ agentId: victim, disconnectedAt: now, updatedAt: now }), false);
    const [status] = await agentStatus(db.pool, { agentIds: [victim] });
    assert.equal(status!.status, 'connected', 'the liar keeps it connected (at most 5 minutes ahead, plus the inactive timeout)');
    // once real time passes the lie, honest updates apply again (simulated: one just after it)
    const after = new Date(lie.updated + 1);
    stager.stage({ agentId: victim, lastConnectedAt: after, disconnectedAt: after, updatedAt: after });
    await stager.flush();
    assert.equal((await mergeNow(db.pool)).agentsUpdated, 1);
    assert.equal((await agentStatus(db.pool, { agentIds: [victim] }))[0]!.status, 'disconnected');
  });
});

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { InvalidOptionError, InvalidUpdateError } from '../src/errors.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { startMerger } from '../src/merger.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { agentStatus, readStatus } from '../src/status.ts';
import { canonicalUuid, checkDisconnect, checkReplicaDisconnectTimes, combine, compareSnapshots, type Snapshot, toSnapshot } from '../src/update.ts';

const id = '0b4a2c3e-5f67-4d89-a1b2-c3d4e5f60718';
const skew = 300_000;
const at = (s: number): Date => new Date(Date.UTC(2026, 0, 1, 0, 0, s));

describe('update validation', () => {
  test('uuids: any case and braces are accepted and normalised; anything else is rejected', () => {
    assert.equal(canonicalUuid(id.toUpperCase(), 'agentId'), id);
    assert.equal(canonicalUuid(`{${id}}`, 'agentId'), id);
    for (const bad of [`{${id}`, `${id}}`, id.replace(/-/g, ''), `${id}0`, '', 'x', `urn:uuid:${id}`]) {
      assert.throws(() => canonicalUuid(bad, 'agentId'), InvalidUpdateError, bad);
    }
  });

  test('times: Dates only, valid, from 1970 on (the database\'s heartbeat.valid_time()), not beyond the clock-skew bound', () => {
    const now = at(0).getTime();
    const ok = toSnapshot({ agentId: id, updatedAt: new Date('1970-01-01T00:00:00Z') }, skew, now);
    assert.equal(ok.updated, 0);
    assert.throws(() => toSnapshot({ agentId: id, updatedAt: new Date('1969-12-31T23:59:59.999Z') }, skew, now), /before 1970/);
    assert.throws(() => toSnapshot({ agentId: id, updatedAt: new Date(now + skew + 1) }, skew, now), /too far in the future/);
    assert.doesNotThrow(() => toSnapshot({ agentId: id, updatedAt: new Date(now + skew) }, skew, now));
    assert.throws(() => toSnapshot({ agentId: id, updatedAt: at(1), lastConnectedAt: new Date(now + 86_400_000) }, skew, now), (e: InvalidUpdateError) => e.field === 'lastConnectedAt');
  });

  test('the error names the field', () => {
    const cases: [unknown, string][] = [
      [{ agentId: id }, 'updatedAt'],
      [{ agentId: id, updatedAt: null }, 'updatedAt'],
      [{ agentId: id, updatedAt: at(1), firstConnectedAt: 'yesterday' }, 'firstConnectedAt'],
      [{ agentId: id, updatedAt: at(1), disconnectedAt: new Date('nope') }, 'disconnectedAt'],
      [{ agentId: id, updatedAt: at(1), lastConnectedReplicaId: 7 }, 'lastConnectedReplicaId'],
      [{ agentId: id, updatedAt: at(1), extra: true }, 'extra'],
      [{ updatedAt: at(1) }, 'agentId'],
      ['string', 'update'],
    ];
    for (const [input, field] of cases) {
      assert.throws(() => toSnapshot(input as never, skew, at(0).getTime()), (e: unknown) => e instanceof InvalidUpdateError && e.field === field, JSON.stringify(input));
    }
  });
});

describe('snapshot order (mirrors the merge)', () => {
  const snap = (over: Partial<Snapshot>): Snapshot => ({ agentId: id, first: NaN, last: NaN, replica: null, disconnected: NaN, updated: 10, copied: NaN, ...over });
  test('newer updated wins; ties: disconnect, later last_connected_at, greater replica', () => {
    assert.ok(compareSnapshots(snap({ updated: 11 }), snap({ updated: 10, disconnected: 10 })) > 0);
    assert.ok(compareSnapshots(snap({ disconnected: 1 }), snap({ last: 5 })) > 0);
    assert.ok(compareSnapshots(snap({ disconnected: 2 }), snap({ disconnected: 1 })) > 0);
    assert.ok(compareSnapshots(snap({ last: 6 }), snap({ last: 5 })) > 0);
    assert.ok(compareSnapshots(snap({ last: 5 }), snap({})) > 0);
    assert.ok(compareSnapshots(snap({ replica: 'b' }), snap({ replica: 'a' })) > 0);
    assert.ok(compareSnapshots(snap({ replica: 'a' }), snap({})) > 0);
    assert.equal(compareSnapshots(snap({}), snap({})), 0);
  });
  test('combine keeps the winner with the earliest first_connected_at of both', () => {
    const kept = snap({ updated: 20, first: 15 });
    const older = snap({ updated: 5, first: 3 });
    const result = combine(kept, older);
    assert.equal(result, kept);
    assert.equal(result.first, 3);
    assert.equal(result.updated, 20, 'the older snapshot lost');
    const newer = snap({ updated: 30, last: 29, replica: 'r', disconnected: 28 });
    assert.equal(combine(kept, newer), kept, 'updated in place');
    assert.deepEqual(kept, { ...newer, first: 3 });
  });
});

describe('hostile update objects (issue 11)', () => {
  const now = at(0).getTime();
  const field = (f: string) => (e: unknown): boolean => e instanceof InvalidUpdateError && e.field === f && e.code === 'INVALID_UPDATE';
  const proto = Object.prototype as Record<string, unknown>;

  test('a polluted Object.prototype fills no missing field, and an unrelated polluted key breaks nothing', () => {
    try {
      proto.updatedAt = at(1);
      proto.agentId = id;
      proto.lastConnectedAt = at(1);
      proto.polluted = 1;
      assert.throws(() => toSnapshot({ agentId: id } as never, skew, now), field('updatedAt'));
      assert.throws(() => toSnapshot({ updatedAt: at(1) } as never, skew, now), field('agentId'));
      assert.throws(() => checkDisconnect({ agentId: id, disconnectedAt: at(1) } as never, skew, now), field('updatedAt'));
      assert.throws(() => checkReplicaDisconnectTimes({ bogus: 1 }), field('bogus'));
      assert.deepEqual(checkReplicaDisconnectTimes({}), { disconnectedAt: undefined, updatedAt: undefined });
      const s = toSnapshot({ agentId: id, updatedAt: at(2) }, skew, now);
      assert.ok(Number.isNaN(s.last), 'lastConnectedAt not taken from the prototype');
      assert.equal(s.updated, at(2).getTime());
      assert.doesNotThrow(() => checkDisconnect({ agentId: id, disconnectedAt: at(2), updatedAt: at(2) }, skew, now));
    } finally {
      delete proto.updatedAt;
      delete proto.agentId;
      delete proto.lastConnectedAt;
      delete proto.polluted;
    }
    // a prototype-less object and a class instance are fine
    assert.equal(toSnapshot(Object.assign(Object.create(null), { agentId: id, updatedAt: at(1) }), skew, now).agentId, id);
  });

  test('throwing getters and Proxies: an InvalidUpdateError naming the field, never a raw Error or TypeError', () => {
    const unprintable = { toString(): string { throw new Error('no'); } };
    const boom = (): never => { throw new Error('trap'); };
    const revoked = Proxy.revocable(new Date(), {});
    revoked.revoke();
    const revokedUpdate = Proxy.revocable({ agentId: id, updatedAt: at(1) }, {});
    revokedUpdate.revoke();
    const cases: [string, () => unknown, string][] = [
      ['getter throwing an Error', () => toSnapshot({ agentId: id, get updatedAt(): Date { throw new Error('x'); } }, skew, now), 'updatedAt'],
      ['getter throwing a number', () => toSnapshot({ agentId: id, updatedAt: at(1), get lastConnectedAt(): Date { throw 42; } }, skew, now), 'lastConnectedAt'],
      ['getter throwing an unprintable value', () => toSnapshot({ get agentId(): string { throw unprintable; }, updatedAt: at(1) }, skew, now), 'agentId'],
      ['Proxy around a Date', () => toSnapshot({ agentId: id, updatedAt: new Proxy(at(1), {}) }, skew, now), 'updatedAt'],
      ['Proxy around a Date with throwing traps', () => toSnapshot({ agentId: id, updatedAt: new Proxy(at(1), { get: boom, getPrototypeOf: boom }) }, skew, now), 'updatedAt'],
      ['revoked Proxy as a Date', () => toSnapshot({ agentId: id, updatedAt: revoked.proxy }, skew, now), 'updatedAt'],
      ['a Date look-alike (toStringTag Date)', () => toSnapshot({ agentId: id, updatedAt: { getTime: () => 1, [Symbol.toStringTag]: 'Date' } as never }, skew, now), 'updatedAt'],
      ['Proxy update, ownKeys throws', () => toSnapshot(new Proxy({ agentId: id, updatedAt: at(1) }, { ownKeys: boom }), skew, now), 'update'],
      ['Proxy update, getOwnPropertyDescriptor throws', () => toSnapshot(new Proxy({ agentId: id, updatedAt: at(1) }, { getOwnPropertyDescriptor: boom }), skew, now), 'update'],
      ['Proxy update, get throws', () => toSnapshot(new Proxy({ agentId: id, updatedAt: at(1) }, { get: boom }), skew, now), 'agentId'],
      ['revoked Proxy update', () => toSnapshot(revokedUpdate.proxy, skew, now), 'update'],
      ['disconnect: getter throwing', () => checkDisconnect({ agentId: id, disconnectedAt: at(1), get updatedAt(): Date { throw new TypeError('t'); } }, skew, now), 'updatedAt'],
      ['disconnect: Proxy around a Date', () => checkDisconnect({ agentId: id, disconnectedAt: new Proxy(at(1), {}), updatedAt: at(1) }, skew, now), 'disconnectedAt'],
      ['disconnect: Proxy with throwing traps', () => checkDisconnect(new Proxy({ agentId: id, disconnectedAt: at(1), updatedAt: at(1) }, { ownKeys: boom }), skew, now), 'disconnect'],
      ['disconnectReplica times: getter throwing', () => checkReplicaDisconnectTimes({ get updatedAt(): Date { throw new Error('x'); } }), 'updatedAt'],
      ['disconnectReplica times: Proxy', () => checkReplicaDisconnectTimes(new Proxy({}, { ownKeys: boom })), 'at'],
    ];
    for (const [what, fn, name] of cases) assert.throws(fn, field(name), what);
    // a transparent Proxy around the update object and a Date subclass are real enough
    assert.equal(toSnapshot(new Proxy({ agentId: id, updatedAt: at(1) }, {}), skew, now).updated, at(1).getTime());
    class MyDate extends Date {}
    assert.equal(toSnapshot({ agentId: id, updatedAt: new MyDate(at(1).getTime()) }, skew, now).updated, at(1).getTime());
  });

  test('disconnect() rejects unknown fields like stage() does (each its own set)', async () => {
    assert.throws(() => checkDisconnect({ agentId: id, disconnectedAt: at(1), updatedAt: at(1), status: 'gone' } as never, skew, now), field('status'));
    assert.throws(() => checkDisconnect({ agentId: id, disconnectedAt: at(1), updatedAt: at(1), lastConnectedReplicaId: id } as never, skew, now), field('lastConnectedReplicaId'));
    assert.throws(() => toSnapshot({ agentId: id, updatedAt: at(1), replicaId: id } as never, skew, now), field('replicaId'));
    const stager = new HeartbeatStager({ connectionString: NOWHERE }, { logger: silentLogger, flushIntervalMs: 3_600_000 });
    try {
      const t = new Date();
      assert.throws(() => stager.stage({ agentId: id, updatedAt: t, agent_id: id } as never), field('agent_id'));
      await assert.rejects(stager.disconnect({ agentId: id, disconnectedAt: t, updatedAt: t, agent_id: id } as never), field('agent_id'));
      await assert.rejects(stager.disconnectReplica(id, { disconnectedAt: t, when: t } as never), field('when'));
      await assert.rejects(stager.disconnectReplica(id, null as never), field('at'));
    } finally {
      await stager.close();
    }
  });
});

/** Connection options that are never used: every call below fails validation first. */
const NOWHERE = 'postgresql://nobody@127.0.0.1:9/nowhere';

describe('numeric options at 2^31 ms and above are rejected with an InvalidOptionError naming them', () => {
  const TOO_BIG = [2 ** 31, 2 ** 31 + 0.5, 2 ** 32, Number.MAX_SAFE_INTEGER, Number.MAX_VALUE, Number.POSITIVE_INFINITY];
  const option = (name: string) => (e: unknown): boolean => e instanceof InvalidOptionError && e.option === name && e.code === 'INVALID_OPTION';

  const STAGER = ['flushIntervalMs', 'maxBatchSize', 'maxRowsPerCopy', 'retryInitialDelayMs', 'retryMaxDelayMs', 'queryTimeoutMs',
    'closeTimeoutMs', 'maxClockSkewMs', 'resendCheckIntervalMs', 'flushLeadMs'] as const;
  const MERGER = ['intervalMs', 'jitter', 'maxRows', 'queryTimeoutMs', 'parallelism', 'stopTimeoutMs', 'heartbeatIntervalMs',
    'flushIntervalMs', 'inactiveTimeoutMs'] as const;
  const MERGE = ['maxRows', 'part', 'minIntervalMs', 'timeoutMs'] as const;

  test('StagerOptions', () => {
    for (const name of STAGER) {
      for (const value of TOO_BIG) {
        assert.throws(() => new HeartbeatStager({ connectionString: NOWHERE }, { [name]: value, logger: silentLogger }), option(name), `${name}: ${value}`);
      }
    }
  });

  test('MergerOptions (the timing options too)', () => {
    for (const name of MERGER) {
      for (const value of TOO_BIG) {
        assert.throws(() => startMerger({ connectionString: NOWHERE }, { [name]: value, logger: silentLogger }), option(name), `${name}: ${value}`);
      }
    }
    for (const name of ['heartbeatIntervalMs', 'flushIntervalMs', 'inactiveTimeoutMs'] as const) {
      for (const value of [-1, Number.NaN, '15000']) {
        assert.throws(() => startMerger({ connectionString: NOWHERE }, { [name]: value as never, logger: silentLogger }), option(name), `${name}: ${value}`);
      }
    }
  });

  test('MergeOptions, readStatus and agentStatus', async () => {
    for (const value of TOO_BIG) {
      for (const name of MERGE) await assert.rejects(mergeNow({ connectionString: NOWHERE }, { [name]: value }), option(name), `${name}: ${value}`);
      await assert.rejects(readStatus({ connectionString: NOWHERE }, { timeoutMs: value }), option('timeoutMs'));
      await assert.rejects(agentStatus({ connectionString: NOWHERE }, { timeoutMs: value }), option('timeoutMs'));
      await assert.rejects(agentStatus({ connectionString: NOWHERE }, { inactiveTimeoutMs: value }), option('inactiveTimeoutMs'));
    }
  });

  test('2^31 - 1 ms, the longest delay a timer honours, is accepted', async () => {
    const stager = new HeartbeatStager({ connectionString: NOWHERE }, { flushIntervalMs: 2 ** 31 - 1, closeTimeoutMs: 2 ** 31 - 1, logger: silentLogger });
    await stager.close();
    const merger = startMerger({ connectionString: NOWHERE }, { intervalMs: 2 ** 31 - 1, inactiveTimeoutMs: 2 ** 31 - 1, logger: silentLogger });
    await merger.close();
  });
});

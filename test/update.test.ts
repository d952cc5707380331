import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { InvalidUpdateError } from '../src/errors.ts';
import { canonicalUuid, combine, compareSnapshots, type Snapshot, toSnapshot } from '../src/update.ts';

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

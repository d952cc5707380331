/**
 * Bad input, client side and SQL side: each gets a clear typed error (or is
 * skipped and counted by the merge) and nothing else is lost.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { DatabaseError, InvalidUpdateError, toHeartbeatError } from '../../src/errors.ts';
import { mergeNow } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import type { AgentUpdate } from '../../src/update.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('fault_bad_input');
});
after(async () => {
  await db?.drop();
});

const newStager = (options = {}): HeartbeatStager =>
  new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger, ...options });

function rejects(stager: HeartbeatStager, update: unknown, field: string): void {
  assert.throws(
    () => stager.stage(update as AgentUpdate),
    (err: unknown) => err instanceof InvalidUpdateError && err.field === field && err.code === 'INVALID_UPDATE',
    `expected InvalidUpdateError on ${field} for ${JSON.stringify(update)}`,
  );
}

describe('bad input to the stager', () => {
  test('each bad update is rejected with an InvalidUpdateError naming the field; good ones in the same flush all land', async () => {
    const [good1, good2, upper, braced] = await createAgents(db.pool, 4);
    const stager = newStager();
    const now = new Date();
    const ok = (agentId: string): AgentUpdate => ({ agentId, lastConnectedAt: now, updatedAt: now });
    stager.stage(ok(good1!));
    const bad: [unknown, string][] = [
      [{ ...ok(good2!), agentId: 'not-a-uuid' }, 'agentId'],
      [{ ...ok(good2!), agentId: '' }, 'agentId'],
      [{ ...ok(good2!), agentId: 42 }, 'agentId'],
      [{ ...ok(good2!), agentId: null }, 'agentId'],
      [{ ...ok(good2!), agentId: `{${good2}` }, 'agentId'],
      [{ ...ok(good2!), agentId: `${good2}0` }, 'agentId'],
      [{ ...ok(good2!), agentId: `'; DROP TABLE public.workspace_agents; --` }, 'agentId'],
      [{ ...ok(good2!), updatedAt: new Date(NaN) }, 'updatedAt'],
      [{ agentId: good2, lastConnectedAt: now }, 'updatedAt'],
      [{ ...ok(good2!), updatedAt: now.toISOString() }, 'updatedAt'],
      [{ ...ok(good2!), updatedAt: now.getTime() }, 'updatedAt'],
      [{ ...ok(good2!), lastConnectedAt: 'yesterday' }, 'lastConnectedAt'],
      [{ ...ok(good2!), disconnectedAt: 0 }, 'disconnectedAt'],
      [{ ...ok(good2!), firstConnectedAt: new Date('1899-12-31T23:59:59Z') }, 'firstConnectedAt'],
      [{ ...ok(good2!), updatedAt: new Date(Date.now() + 6 * 60_000) }, 'updatedAt'],
      [{ ...ok(good2!), lastConnectedReplicaId: 'replica-1' }, 'lastConnectedReplicaId'],
      [{ ...ok(good2!), status: 'connected' }, 'status'],
      [{ ...ok(good2!), agent_id: good2 }, 'agent_id'],
    ];
    for (const [update, field] of bad) rejects(stager, update, field);
    assert.throws(() => stager.stage(null as unknown as AgentUpdate), InvalidUpdateError);
    // accepted and normalised to lowercase
    stager.stage(ok(upper!.toUpperCase()));
    stager.stage(ok(`{${braced!.toUpperCase()}}`));
    stager.stage(ok(good2!));
    assert.equal(stager.stats().rejected, bad.length + 1);
    assert.equal(stager.stats().pendingAgents, 4);
    await stager.close();
    const merged = await mergeNow(db.pool);
    assert.equal(merged.agentsUpdated, 4);
    assert.equal(merged.skippedInvalid + merged.skippedUnknown, 0);
    for (const id of [good1!, good2!, upper!, braced!]) assert.deepEqual((await agentRow(db.pool, id)).updated_at, now);
  });

  test('timestamps before 1970 are rejected by stage() with the field named, and skipped as invalid by the database', async () => {
    const [old] = await createAgents(db.pool, 1, new Date('2020-01-01T00:00:00Z'));
    const stager = newStager();
    rejects(stager, { agentId: old!, firstConnectedAt: new Date('1969-12-31T23:59:59.999Z'), updatedAt: new Date() }, 'firstConnectedAt');
    rejects(stager, { agentId: old!, updatedAt: new Date('1900-01-01T00:00:00Z') }, 'updatedAt');
    const epoch = new Date('1970-01-01T00:00:00.000Z');
    stager.stage({ agentId: old!, firstConnectedAt: epoch, lastConnectedAt: epoch, updatedAt: new Date('2021-01-01T00:00:00Z') });
    await stager.close();
    await db.pool.query(
      "INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, '1969-07-20T20:17:40Z', now())",
      [old],
    );
    const merged = await mergeNow(db.pool);
    assert.equal(merged.skippedInvalid, 1, 'the row written around the client is skipped');
    const row = await agentRow(db.pool, old!);
    assert.deepEqual([row.first_connected_at, row.last_connected_at], [epoch, epoch], 'the valid update landed, exactly');
  });

  test('the future: the client rejects beyond maxClockSkewMs; the database skips beyond heartbeat.clock_horizon()', async () => {
    const [a, b] = await createAgents(db.pool, 2);
    const strict = newStager();
    strict.stage({ agentId: a!, updatedAt: new Date(Date.now() + 4 * 60_000) }); // inside the default 5 min
    rejects(strict, { agentId: a!, updatedAt: new Date(Date.now() + 5 * 60_000 + 5_000) }, 'updatedAt');
    await strict.close();
    // a client with a laxer bound than the database: the database has the last word
    const lax = newStager({ maxClockSkewMs: 60 * 60_000 });
    lax.stage({ agentId: b!, updatedAt: new Date(Date.now() + 10 * 60_000) });
    await lax.close();
    const merged = await mergeNow(db.pool);
    assert.equal(merged.agentsUpdated, 1);
    assert.equal(merged.skippedInvalid, 1, 'the row 10 min ahead is counted as invalid');
    assert.deepEqual((await agentRow(db.pool, b!)).updated_at, new Date('2020-01-01T00:00:00Z'), 'and not applied');
    assert.equal(await stagedCount(db.pool), 0, 'nor kept');
  });

  test('a million updates within one flush interval: memory bounded by distinct agents, the newest per agent lands', async () => {
    const AGENTS = 10_000;
    const ids = await createAgents(db.pool, AGENTS);
    const stager = newStager();
    const T0 = Date.UTC(2026, 0, 1);
    const newest = new Array<number>(AGENTS).fill(0);
    for (let k = 0; k < 1_000_000; k++) {
      const i = (k * 7919) % AGENTS;
      const t = T0 + ((k * 104_729) % 1_000_003); // shuffled, out of order
      stager.stage({ agentId: ids[i]!, lastConnectedAt: new Date(t), updatedAt: new Date(t) });
      if (t > newest[i]!) newest[i] = t;
      if (k % 100_000 === 0) assert.ok(stager.stats().pendingAgents <= AGENTS);
    }
    const stats = stager.stats();
    assert.equal(stats.pendingAgents, AGENTS);
    assert.equal(stats.deduped, 1_000_000 - AGENTS);
    await stager.close();
    assert.equal(stager.stats().copies, 1, 'one COPY');
    const merged = await mergeNow(db.pool);
    assert.equal(merged.rowsConsumed, AGENTS);
    const { rows } = await db.pool.query<{ id: string; updated_at: Date }>(
      'SELECT id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])', [ids],
    );
    const index = new Map(ids.map((id, i) => [id, i]));
    assert.equal(rows.filter((r) => r.updated_at.getTime() !== newest[index.get(r.id)!]).length, 0);
  });

  test('bad disconnects are rejected before the database; an unknown agent returns false', async () => {
    const stager = newStager();
    const now = new Date();
    await assert.rejects(stager.disconnect({ agentId: 'x', disconnectedAt: now, updatedAt: now }), InvalidUpdateError);
    await assert.rejects(stager.disconnect({ agentId: randomUUID(), disconnectedAt: new Date(NaN), updatedAt: now }), InvalidUpdateError);
    await assert.rejects(
      stager.disconnect({ agentId: randomUUID(), disconnectedAt: now, updatedAt: undefined as unknown as Date }),
      InvalidUpdateError,
    );
    assert.equal(await stager.disconnect({ agentId: randomUUID(), disconnectedAt: now, updatedAt: now }), false);
    await stager.close();
  });
});

describe('bad input on the SQL side', () => {
  test('NULL arguments to disconnect_agent: SQLSTATE 22004, mapped to a DatabaseError; the row is untouched', async () => {
    const [a] = await createAgents(db.pool, 1);
    const now = new Date();
    for (const args of [[null, now, now], [a, null, now], [a, now, null]]) {
      const err = await db.pool.query('SELECT heartbeat.disconnect_agent($1, $2, $3)', args).then(() => null, (e: { code?: string }) => e);
      assert.equal(err?.code, '22004', `NULL in ${JSON.stringify(args.map((x) => x === null))}`);
    }
    const mapped = toHeartbeatError(
      await db.pool.query('SELECT heartbeat.disconnect_agent(NULL, now(), now())').catch((e: unknown) => e), 'disconnect',
    );
    assert.ok(mapped instanceof DatabaseError && mapped.sqlState === '22004');
    assert.deepEqual((await agentRow(db.pool, a!)).updated_at, new Date('2020-01-01T00:00:00Z'));
    const unknown = await db.pool.query<{ d: boolean }>('SELECT heartbeat.disconnect_agent($1, now(), now()) AS d', [randomUUID()]);
    assert.equal(unknown.rows[0]!.d, false, 'an unknown agent is not an error: false');
  });

  test('garbage written straight into staging is skipped and counted; good rows in the same batch land; nothing is stuck', async () => {
    const [good, dup] = await createAgents(db.pool, 2);
    await mergeNow(db.pool); // start from an empty staging table
    assert.equal(await stagedCount(db.pool), 0);
    const t = new Date(Date.UTC(2026, 0, 3));
    await db.pool.query(
      `INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
       VALUES ($1, $3, $3, NULL, NULL, $3),                                   -- good
              ($2, $3, $3, NULL, NULL, $3), ($2, $3, $3, NULL, NULL, $3),   -- exact duplicates of a good row
              (NULL, $3, $3, NULL, NULL, $3),                               -- no agent_id
              ($1, $3, $3, NULL, NULL, NULL),                               -- no updated_at
              (NULL, NULL, NULL, NULL, NULL, NULL),                         -- all NULL
              ($1, NULL, NULL, NULL, NULL, now() + interval '1 day'),       -- far future
              ($1, NULL, NULL, NULL, NULL, 'infinity'),                     -- infinity
              ($2, NULL, NULL, NULL, NULL, '-infinity'),                    -- not a finite time
              ($4, $3, $3, NULL, NULL, $3)                                  -- unknown agent`,
      [good, dup, t, randomUUID()],
    );
    const merged = await mergeNow(db.pool);
    const { rowsConsumed, agentsUpdated, skippedStale, skippedUnknown, skippedInvalid, deferredLocked, deadLettered, skippedConcurrent } = merged;
    assert.deepEqual(
      { rowsConsumed, agentsUpdated, skippedStale, skippedUnknown, skippedInvalid, deferredLocked, deadLettered, skippedConcurrent },
      { rowsConsumed: 10, agentsUpdated: 2, skippedStale: 0, skippedUnknown: 1, skippedInvalid: 6, deferredLocked: 0, deadLettered: 0, skippedConcurrent: false },
    );
    assert.deepEqual((await agentRow(db.pool, good!)).updated_at, t);
    assert.deepEqual((await agentRow(db.pool, dup!)).updated_at, t);
    assert.equal(await stagedCount(db.pool), 0, 'the garbage is gone, not blocking the next batch');
    const next = await mergeNow(db.pool);
    assert.equal(next.rowsConsumed, 0);
  });
});

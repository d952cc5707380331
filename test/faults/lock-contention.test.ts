/**
 * Lock contention end to end: a long transaction holds a row lock on one
 * workspace_agents row while stagers keep staging for the whole fleet and the
 * merge keeps running. Each merge returns while the lock is still held
 * (bounded by the function's lock_timeout, 2 s), lands every other agent and
 * puts the locked agent's newest snapshot back into staging (deferred_locked);
 * once the lock is released the next merge lands that agent's newest update.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { mergeNow, type MergeResult } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('fault_locks');
});
after(async () => {
  await db?.drop();
});

test('a row lock held by a long transaction defers one agent, never stalls the fleet', async (t) => {
  const ids = await createAgents(db.pool, 300);
  const locked = ids[17]!;
  const others = ids.filter((id) => id !== locked);
  const stagers = [0, 1].map(() => new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger }));
  const T0 = Date.UTC(2026, 0, 1);
  const at = (round: number): Date => new Date(T0 + round * 1000);
  const stageRound = async (round: number): Promise<void> => {
    ids.forEach((agentId, i) => stagers[i % 2]!.stage({ agentId, lastConnectedAt: at(round), updatedAt: at(round) }));
    await Promise.all(stagers.map((s) => s.flush()));
  };
  const holder = new pg.Client({ connectionString: db.url });
  await holder.connect();
  const merges: { result: MergeResult; ms: number }[] = [];
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [locked]);
    let holding = true;
    for (let round = 1; round <= 3; round++) {
      await stageRound(round);
      const started = performance.now();
      const result = await mergeNow(db.pool);
      merges.push({ result, ms: performance.now() - started });
      assert.ok(holding, 'the merge returned while the lock was still held');
      assert.equal(result.deferredLocked, 1, `round ${round}: the locked agent is deferred`);
      assert.equal(result.agentsUpdated, others.length, `round ${round}: every other agent landed`);
      const { rows } = await db.pool.query<{ n: string }>(
        'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [others, at(round)],
      );
      assert.equal(Number(rows[0]!.n), others.length, `round ${round}: others hold this round`);
      assert.equal(await stagedCount(db.pool), 1, 'only the deferred snapshot is left in staging');
    }
    // the locked row is untouched so far
    const before = await db.pool.query<{ updated_at: Date }>('SELECT updated_at FROM public.workspace_agents WHERE id = $1', [locked]);
    assert.deepEqual(before.rows[0]!.updated_at, new Date('2020-01-01T00:00:00Z'));
    await holder.query('COMMIT');
    holding = false;
    const released = await mergeNow(db.pool);
    assert.equal(released.deferredLocked, 0);
    assert.equal(released.agentsUpdated, 1, 'the deferred agent lands once the lock is gone');
    const { rows } = await db.pool.query<{ updated_at: Date; last_connected_at: Date }>(
      'SELECT updated_at, last_connected_at FROM public.workspace_agents WHERE id = $1', [locked],
    );
    assert.deepEqual(rows[0]!.updated_at, at(3), 'with its newest update (the deferred one was folded with newer rounds)');
    assert.equal(await stagedCount(db.pool), 0);
  } finally {
    await holder.query('ROLLBACK').catch(() => {});
    await holder.end();
    await Promise.all(stagers.map((s) => s.close()));
  }
  t.diagnostic(`merge durations while a row was locked: ${merges.map((m) => `${m.ms.toFixed(0)} ms`).join(', ')} (lock_timeout 2 s)`);
});

test('a lock on a row the merge has nothing for does not delay it at all', async () => {
  const ids = await createAgents(db.pool, 50);
  const holder = new pg.Client({ connectionString: db.url });
  await holder.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids[0]]);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    const t = new Date(Date.UTC(2026, 0, 2));
    for (const agentId of ids.slice(1)) stager.stage({ agentId, lastConnectedAt: t, updatedAt: t });
    await stager.close();
    const result = await mergeNow(db.pool);
    assert.equal(result.deferredLocked, 0, 'no fallback needed: the locked row is not a target');
    assert.equal(result.agentsUpdated, ids.length - 1);
  } finally {
    await holder.query('ROLLBACK');
    await holder.end();
  }
});

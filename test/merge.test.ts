import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { mergeNow } from '../src/merge.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('merge');
});
after(async () => {
  await db.drop();
});

type Row = [string | null, Date | null, Date | null, string | null, Date | null, Date | null];
async function stageRows(rows: Row[]): Promise<void> {
  for (const r of rows) {
    await db.pool.query(
      'INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)',
      r,
    );
  }
}
const t = (s: number): Date => new Date(Date.UTC(2026, 0, 1, 0, 0, s));

describe('heartbeat.merge_agent_connections()', () => {
  test('applies the newest staged snapshot per agent and consumes every row', async () => {
    const [a, b] = await createAgents(db.pool, 2);
    const replica = randomUUID();
    await stageRows([
      [a!, t(1), t(1), null, null, t(1)],
      [a!, t(2), t(3), replica, null, t(3)],
      [a!, t(0), t(2), null, null, t(2)],
      [b!, null, t(5), null, null, t(5)],
    ]);
    const result = await mergeNow(db.pool);
    assert.deepEqual(result, {
      rowsConsumed: 4, agentsUpdated: 2, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0,
      deadLettered: 0, skippedConcurrent: false, parts: 4, partsMerged: 4, partsSkippedConcurrent: 0, partsSkippedRecent: 0,
      partsWithMore: [], more: false, lockHolderPid: null, lockBusySince: null, statements: 1,
      swept: true, statusEvents: 1,   // a: connecting -> disconnected (its heartbeat is from January 2026); b has no first_connected_at
    });
    const rowA = await agentRow(db.pool, a!);
    assert.deepEqual(rowA.last_connected_at, t(3));
    assert.equal(rowA.last_connected_replica_id, replica);
    assert.deepEqual(rowA.updated_at, t(3));
    assert.deepEqual(rowA.first_connected_at, t(0), 'earliest first_connected_at of all staged rows');
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('an older or equal snapshot never overwrites; merging the same row twice is a no-op', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([[a!, t(10), t(10), null, null, t(10)]]);
    await mergeNow(db.pool);
    await stageRows([[a!, t(10), t(11), null, null, t(10)], [a!, null, t(4), null, null, t(9)]]);
    const again = await mergeNow(db.pool);
    assert.equal(again.agentsUpdated, 0);
    assert.equal(again.skippedStale, 1);
    const row = await agentRow(db.pool, a!);
    assert.deepEqual(row.last_connected_at, t(10), 'equal updated_at did not overwrite');
  });

  test('equal updated_at in one batch: the tie-break is deterministic (a disconnect wins)', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([
      [a!, null, t(20), null, null, t(20)],
      [a!, null, t(19), null, t(20), t(20)],
      [a!, null, t(21), null, null, t(20)],
    ]);
    await mergeNow(db.pool);
    const row = await agentRow(db.pool, a!);
    assert.deepEqual(row.disconnected_at, t(20));
    assert.deepEqual(row.last_connected_at, t(19));
  });

  test('NULL means NULL: a newer snapshot clears disconnected_at; no sentinels are stored', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([[a!, t(1), t(1), randomUUID(), t(2), t(2)]]);
    await mergeNow(db.pool);
    await stageRows([[a!, null, null, null, null, t(3)]]);
    await mergeNow(db.pool);
    const row = await agentRow(db.pool, a!);
    assert.equal(row.disconnected_at, null);
    assert.equal(row.last_connected_at, null);
    assert.equal(row.last_connected_replica_id, null);
    assert.deepEqual(row.first_connected_at, t(1), 'first_connected_at is never erased');
  });

  test('first_connected_at never moves later', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([[a!, t(5), t(5), null, null, t(5)]]);
    await mergeNow(db.pool);
    await stageRows([[a!, t(30), t(30), null, null, t(30)]]);
    await mergeNow(db.pool);
    assert.deepEqual((await agentRow(db.pool, a!)).first_connected_at, t(5));
    await stageRows([[a!, t(1), t(31), null, null, t(31)]]);
    await mergeNow(db.pool);
    assert.deepEqual((await agentRow(db.pool, a!)).first_connected_at, t(1));
  });

  test('first_connected_at: the earliest ever seen, also from a snapshot too old to apply', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([[a!, null, t(300), null, t(301), t(301)]]);
    await mergeNow(db.pool);
    await stageRows([[a!, t(200), t(200), null, null, t(250)]]); // stale, but knows an earlier first connection
    const result = await mergeNow(db.pool);
    assert.equal(result.skippedStale, 1);
    assert.equal(result.agentsUpdated, 0);
    const row = await agentRow(db.pool, a!);
    assert.deepEqual(row.first_connected_at, t(200));
    assert.deepEqual(row.updated_at, t(301), 'nothing else changed');
    assert.deepEqual(row.disconnected_at, t(301));
    await stageRows([[a!, t(250), t(250), null, null, t(260)]]); // stale and not earlier: no change
    await mergeNow(db.pool);
    assert.deepEqual((await agentRow(db.pool, a!)).first_connected_at, t(200));
  });

  test('disconnect_agent keeps given connection facts, and an earlier first connection even when stale', async () => {
    const [a] = await createAgents(db.pool, 1);
    const q = 'SELECT heartbeat.disconnect_agent($1, $2, $3, NULL, $4, $5) AS applied';
    assert.equal((await db.pool.query(q, [a, t(402), t(402), t(400), t(401)])).rows[0].applied, true);
    let row = await agentRow(db.pool, a!);
    assert.deepEqual([row.first_connected_at, row.last_connected_at, row.disconnected_at], [t(400), t(401), t(402)]);
    assert.equal((await db.pool.query(q, [a, t(399), t(399), t(390), null])).rows[0].applied, false);
    row = await agentRow(db.pool, a!);
    assert.deepEqual([row.first_connected_at, row.last_connected_at, row.updated_at], [t(390), t(401), t(402)]);
  });

  test('a session cannot widen the clock-skew bound', async () => {
    const [a] = await createAgents(db.pool, 1);
    const future = new Date(Date.now() + 3600_000);
    const c = await db.pool.connect();
    try {
      await c.query("SET heartbeat.max_clock_skew = '100 years'");
      await c.query('INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES ($1, $2)', [a, future]);
      const { rows } = await c.query('SELECT skipped_invalid FROM heartbeat.merge_agent_connections()');
      assert.equal(rows[0].skipped_invalid, '1');
      await assert.rejects(c.query('SELECT heartbeat.disconnect_agent($1, $2, $2)', [a, future]), { code: '22008' });
      await assert.rejects(c.query('SELECT heartbeat.disconnect_replica($1, $2, $2)', [randomUUID(), future]), {
        code: '22008', message: /heartbeat\.disconnect_replica: .* is too far ahead of the database clock/,
      });
    } finally {
      c.release();
    }
  });

  test('unknown agents and invalid rows are discarded and counted, never an error', async () => {
    const [a] = await createAgents(db.pool, 1);
    const farFuture = new Date(Date.now() + 24 * 3600_000);
    await stageRows([
      [randomUUID(), null, t(1), null, null, t(1)],
      [null, null, t(1), null, null, t(1)],
      [a!, null, t(1), null, null, null],
      [a!, null, farFuture, null, null, farFuture],
      [a!, null, t(40), null, null, t(40)],
    ]);
    const result = await mergeNow(db.pool);
    assert.equal(result.rowsConsumed, 5);
    assert.equal(result.skippedUnknown, 1);
    assert.equal(result.skippedInvalid, 3);
    assert.equal(result.agentsUpdated, 1);
    assert.deepEqual((await agentRow(db.pool, a!)).updated_at, t(40));
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('the stale-disconnect race: a heartbeat staged before a disconnect never reconnects the agent', async () => {
    const [a] = await createAgents(db.pool, 1);
    await stageRows([[a!, t(1), t(50), null, null, t(50)]]);
    const { rows } = await db.pool.query('SELECT heartbeat.disconnect_agent($1, $2, $3) AS applied', [a, t(51), t(51)]);
    assert.equal(rows[0].applied, true);
    const result = await mergeNow(db.pool);
    assert.equal(result.skippedStale, 1);
    const row = await agentRow(db.pool, a!);
    assert.deepEqual(row.disconnected_at, t(51));
    assert.ok(row.disconnected_at! >= row.last_connected_at!);
  });

  test('disconnect_agent is guarded, keeps the replica when none is given, and rejects NULLs', async () => {
    const [a] = await createAgents(db.pool, 1);
    const replica = randomUUID();
    await stageRows([[a!, t(1), t(60), replica, null, t(60)]]);
    await mergeNow(db.pool);
    const q = 'SELECT heartbeat.disconnect_agent($1, $2, $3) AS applied';
    assert.equal((await db.pool.query(q, [a, t(59), t(59)])).rows[0].applied, false, 'older');
    assert.equal((await db.pool.query(q, [a, t(60), t(60)])).rows[0].applied, false, 'equal');
    assert.equal((await db.pool.query(q, [randomUUID(), t(61), t(61)])).rows[0].applied, false, 'unknown');
    assert.equal((await db.pool.query(q, [a, t(61), t(61)])).rows[0].applied, true);
    assert.equal((await agentRow(db.pool, a!)).last_connected_replica_id, replica);
    await assert.rejects(db.pool.query(q, [null, t(62), t(62)]), { code: '22004' });
    await assert.rejects(db.pool.query(q, [a, t(62), null]), { code: '22004' });
    const future = new Date(Date.now() + 3600_000);
    await assert.rejects(db.pool.query(q, [a, future, future]), { code: '22008' });
  });

  test('two concurrent merges: one works, the other returns at once without waiting', async () => {
    const ids = await createAgents(db.pool, 50);
    await stageRows(ids.map((id) => [id, null, t(70), null, null, t(70)] as Row));
    const holder = await db.pool.connect();
    try {
      await holder.query('BEGIN');
      const first = (await holder.query('SELECT * FROM heartbeat.merge_agent_connections()')).rows[0];
      assert.equal(first.skipped_concurrent, false);
      const started = Date.now();
      const second = await mergeNow(db.pool);
      assert.equal(second.skippedConcurrent, true);
      assert.equal(second.rowsConsumed, 0);
      assert.ok(Date.now() - started < 1000, 'the second merge did not wait');
      await holder.query('COMMIT');
    } finally {
      holder.release();
    }
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('many merges racing many COPY-sized inserts lose nothing', async () => {
    const ids = await createAgents(db.pool, 200);
    const writer = new pg.Pool({ connectionString: db.url, max: 4 });
    let stop = false;
    const mergers = [0, 1, 2].map(async () => {
      let merges = 0;
      while (!stop) {
        await mergeNow(db.pool);
        merges++;
      }
      return merges;
    });
    // 40 rounds: every round stages a newer snapshot for every agent in one statement
    for (let round = 1; round <= 40; round++) {
      await writer.query(
        'INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) SELECT unnest($1::uuid[]), $2, $2',
        [ids, t(100 + round)],
      );
    }
    stop = true;
    await Promise.all(mergers);
    await writer.end();
    await mergeNow(db.pool);
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM public.workspace_agents WHERE id = ANY($1) AND updated_at = $2', [ids, t(140)]);
    assert.equal(rows[0].n, 200);
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('a row locked by another transaction delays the merge by at most lock_timeout and is merged later', async () => {
    const ids = await createAgents(db.pool, 20);
    const locked = ids[0]!;
    await stageRows(ids.map((id) => [id, null, t(200), null, null, t(200)] as Row));
    const holder = await db.pool.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [locked]);
      const started = Date.now();
      const result = await mergeNow(db.pool);
      const took = Date.now() - started;
      assert.ok(took < 5000, `merge took ${took} ms`);
      assert.equal(result.agentsUpdated, 19);
      assert.equal(result.deferredLocked, 1);
      assert.equal(await stagedCount(db.pool), 1, 'the locked agent waits in staging');
      await holder.query('COMMIT');
    } finally {
      holder.release();
    }
    const next = await mergeNow(db.pool);
    assert.equal(next.agentsUpdated, 1);
    assert.deepEqual((await agentRow(db.pool, locked)).updated_at, t(200));
  });

  test('refuses to run outside READ COMMITTED', async () => {
    const c = await db.pool.connect();
    try {
      await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await assert.rejects(c.query('SELECT * FROM heartbeat.merge_agent_connections()'), /READ COMMITTED/);
      await c.query('ROLLBACK');
    } finally {
      c.release();
    }
  });
});

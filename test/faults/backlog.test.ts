/**
 * A backlog of 1,000,000 staged rows drains under statement_timeout = '5s'
 * (set on the database, as a careful DBA would, with max_rows_per_merge 10,000
 * to go with it): every merge statement consumes at most max_rows
 * (heartbeat.settings.max_rows_per_merge), so no statement runs into the timeout, with startMerger() and with
 * mergeNow(); staging reaches 0. A stager holding a pending backlog of
 * 1,000,000 agents also COPYs it under the same timeout, in chunks of
 * maxRowsPerCopy. The drain times are printed (docs/failure-modes.md quotes them).
 * HEARTBEAT_BACKLOG_ROWS changes the size (default 1,000,000).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import type { HeartbeatError } from '../../src/errors.ts';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { startMerger, type MergeReport } from '../../src/merger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createTestDb, type TestDb } from '../support/db.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

const N = Number(process.env.HEARTBEAT_BACKLOG_ROWS ?? 1_000_000);
/** The statement_timeout set on the test's database, in seconds. */
const TIMEOUT_S = 5;
/** heartbeat.settings.max_rows_per_merge for this test: sized for the timeout. */
const ROWS_PER_MERGE = 10_000;
let db: TestDb;
let setup: pg.Client;
before(async () => {
  db = await createTestDb('fault_backlog');
  // the setup connection opts out of the timeout the test puts on the database
  setup = new pg.Client({ connectionString: db.url });
  await setup.connect();
  await setup.query('SET statement_timeout = 0');
  await setup.query(`INSERT INTO public.workspace_agents (id, updated_at)
                     SELECT gen_random_uuid(), '2020-01-01' FROM generate_series(1, $1::int)`, [N]);
  await setup.query('VACUUM ANALYZE public.workspace_agents');
  // every row of this backlog changes its agent's status (an event each): a statement of 50,000 such rows takes
  // 0.8-1.7 s here, too close to 2 s on a loaded machine; with a 2 s timeout one of 25,000 overran it (PG18), and
  // a drain of 10,000 per statement too (PG14, in a loaded local CI run: the last statement also sweeps every
  // agent); a DBA sizes statements and the timeout for each other
  await setup.query('UPDATE heartbeat.settings SET max_rows_per_merge = $1', [ROWS_PER_MERGE]);
  await setup.query(`ALTER DATABASE ${pg.escapeIdentifier(db.name)} SET statement_timeout = '${TIMEOUT_S}s'`);
});
after(async () => {
  await setup?.end().catch(() => {});
  await db?.drop();
});

let round = 0;
/**
 * Stages one row per agent straight into staging (the shape a stager's COPY leaves), with a new updated_at.
 * What an earlier test left (it failed half-way) goes first, so one failure does not fail the rest.
 */
async function restageEveryAgent(): Promise<Date> {
  round++;
  const t = new Date(Date.UTC(2026, 0, 1) + round * 1000);
  await setup.query('DELETE FROM heartbeat.agent_connection_staging');
  await setup.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
                     SELECT id, $1, $1 FROM public.workspace_agents`, [t]);
  assert.equal(await staged(), N);
  return t;
}

async function staged(): Promise<number> {
  return Number((await setup.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging')).rows[0]!.n);
}

async function applied(t: Date): Promise<number> {
  return Number((await setup.query<{ n: string }>('SELECT count(*) AS n FROM public.workspace_agents WHERE updated_at = $1', [t])).rows[0]!.n);
}

async function assertTimeoutIsOn(): Promise<void> {
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  try {
    assert.equal((await c.query<{ s: string }>("SELECT current_setting('statement_timeout') AS s")).rows[0]!.s, `${TIMEOUT_S}s`);
    await assert.rejects(c.query(`SELECT pg_sleep(${TIMEOUT_S + 1})`), (err: unknown) => (err as { code?: string }).code === '57014', 'the timeout is real');
  } finally {
    await c.end();
  }
}

describe(`a backlog of ${N} staged rows under statement_timeout = ${TIMEOUT_S}s`, () => {
  test('mergeNow() drains it in bounded statements: no statement times out, staging reaches 0', async (t) => {
    await assertTimeoutIsOn();
    const target = await restageEveryAgent();
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    pool.on('error', () => {});
    const started = performance.now();
    let statements = 0;
    let slowest = 0;
    try {
      for (;;) {
        const s0 = performance.now();
        const r = await mergeNow(pool, { drain: false }); // one statement per call, so each can be timed
        slowest = Math.max(slowest, performance.now() - s0);
        statements++;
        if (!r.more && r.rowsConsumed === 0) break;
        assert.ok(statements < 10 * (N / ROWS_PER_MERGE) + 20, 'the drain ends');
      }
    } finally {
      await pool.end();
    }
    const ms = performance.now() - started;
    assert.equal(await staged(), 0);
    assert.equal(await applied(target), N, 'every agent updated');
    t.diagnostic(`mergeNow drained ${N} rows in ${Math.round(ms)} ms, ${statements} statements, slowest ${Math.round(slowest)} ms`);
    console.log(`backlog: mergeNow drained ${N} staged rows under statement_timeout ${TIMEOUT_S}s in ${(ms / 1000).toFixed(1)} s ` +
      `(${statements} statements, slowest ${Math.round(slowest)} ms)`);
    assert.ok(slowest < TIMEOUT_S * 1000, 'every statement finished inside the timeout');
  });

  test('mergeNow() with its default drain (one call loops) also never times out', async () => {
    const target = await restageEveryAgent();
    const started = performance.now();
    let calls = 0;
    for (;;) {
      const r = await mergeNow({ connectionString: db.url }, { timeoutMs: 60_000 });
      calls++;
      if (!r.more) break;
    }
    const ms = performance.now() - started;
    assert.equal(await staged(), 0);
    assert.equal(await applied(target), N);
    console.log(`backlog: mergeNow (drain) emptied ${N} staged rows in ${(ms / 1000).toFixed(1)} s (${calls} call(s))`);
  });

  test('startMerger() drains it: no failed tick, staging reaches 0', async () => {
    const target = await restageEveryAgent();
    const log = recordingLogger();
    const errors: HeartbeatError[] = [];
    const reports: MergeReport[] = [];
    const started = performance.now();
    const merger = startMerger({ connectionString: db.url }, {
      intervalMs: 1000, logger: log, onError: (e) => errors.push(e), onMerge: (r) => reports.push(r),
    });
    try {
      await waitFor(async () => (await staged()) === 0, 'staging drained by the merger', 600_000, 250);
      const ms = performance.now() - started;
      assert.deepEqual(errors.map(String), [], 'no merge failed (no statement timeout)');
      assert.equal(merger.stats().failures, 0);
      await waitFor(async () => (await applied(target)) === N, 'every agent updated', 30_000);
      const parallel = reports.filter((r) => r.parallel).length;
      console.log(`backlog: startMerger (interval 1 s) drained ${N} staged rows under statement_timeout ${TIMEOUT_S}s in ${(ms / 1000).toFixed(1)} s ` +
        `(${reports.length} ticks, ${parallel} in parallel over the parts)`);
    } finally {
      await merger.close();
    }
  });

  test(`a stager with ${N} agents pending COPYs them under the timeout, in chunks of maxRowsPerCopy`, async () => {
    await setup.query('DELETE FROM heartbeat.agent_connection_staging'); // what a failed test left
    const { rows } = await setup.query<{ id: string }>('SELECT id::text AS id FROM public.workspace_agents');
    const t = new Date(Date.UTC(2026, 0, 1) + 100_000);
    const errors: HeartbeatError[] = [];
    const flushes: number[] = [];
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, {
      flushIntervalMs: 3_600_000, maxBatchSize: 10 * N, logger: silentLogger,
      onError: (e) => errors.push(e), onFlush: (f) => flushes.push(f.rows),
    });
    try {
      for (const r of rows) stager.stage({ agentId: r.id, lastConnectedAt: t, updatedAt: t });
      assert.equal(stager.stats().pendingAgents, N);
      const started = performance.now();
      await stager.flush();
      const ms = performance.now() - started;
      assert.deepEqual(errors.map(String), []);
      assert.equal(stager.stats().failedCopies, 0, 'no COPY timed out');
      assert.equal(await staged(), N);
      assert.ok(flushes.every((n) => n <= 50_000), 'each COPY at most maxRowsPerCopy (50,000) rows');
      assert.equal(flushes.reduce((a, b) => a + b, 0), N);
      console.log(`backlog: a stager COPYed ${N} pending agents under statement_timeout ${TIMEOUT_S}s in ${(ms / 1000).toFixed(1)} s (${flushes.length} COPYs)`);
    } finally {
      await stager.close();
    }
    await setup.query('TRUNCATE heartbeat.agent_connection_staging');
  });
});

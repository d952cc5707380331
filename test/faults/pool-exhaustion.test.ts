/**
 * Pool exhaustion: the application's own pool (max: 1), passed as { pool }, is
 * held by the application, so pg-heartbeat cannot get a connection. Nothing
 * hangs: flush() and disconnect() reject with a TimeoutError after
 * queryTimeoutMs (pool checkout included), close() gives up after
 * closeTimeoutMs and reports what it could not write, and a checkout still
 * queued when close() resolved does nothing once the application releases its
 * client: no COPY runs after close().
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { TimeoutError, type HeartbeatError } from '../../src/errors.ts';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';
import { waitFor } from '../support/wait.ts';

let db: TestDb;
let pool: pg.Pool | undefined;
let held: pg.PoolClient | undefined;
const crashes: unknown[] = [];
const onCrash = (err: unknown): void => void crashes.push(err);
before(async () => {
  process.on('unhandledRejection', onCrash);
  process.on('uncaughtException', onCrash);
  db = await createTestDb('fault_pool');
});
after(async () => {
  held?.release();
  await pool?.end().catch(() => {});
  await db?.drop();
  process.off('unhandledRejection', onCrash);
  process.off('uncaughtException', onCrash);
});

const T = new Date(Date.UTC(2026, 0, 1));

test('a held max:1 pool: flush() and disconnect() time out, close() reports the loss, nothing runs after close()', async () => {
  const ids = await createAgents(db.pool, 1000);
  pool = new pg.Pool({ connectionString: db.url, max: 1, application_name: 'app-pool' });
  pool.on('error', () => {});
  const QUERY_TIMEOUT = 1500;
  const CLOSE_TIMEOUT = 4000;
  const errors: HeartbeatError[] = [];
  const stager = new HeartbeatStager({ pool }, {
    flushIntervalMs: 200, queryTimeoutMs: QUERY_TIMEOUT, closeTimeoutMs: CLOSE_TIMEOUT,
    retryInitialDelayMs: 100, retryMaxDelayMs: 500, logger: silentLogger, onError: (e) => errors.push(e),
  });
  try {
    // it works while the pool is free
    stager.stage({ agentId: ids[0]!, lastConnectedAt: T, updatedAt: T });
    await stager.flush();
    assert.equal(await stagedCount(db.pool), 1);
    await mergeNow(db.pool);

    // the application takes the only connection and keeps it
    held = await pool.connect();
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: new Date(T.getTime() + 1000), updatedAt: new Date(T.getTime() + 1000) });

    let started = performance.now();
    await assert.rejects(stager.flush(), (err: unknown) => {
      assert.ok(err instanceof TimeoutError, `flush() rejects with a TimeoutError, not ${String(err)}`);
      assert.match(err.message, /no connection from the pool/);
      return true;
    });
    const flushMs = performance.now() - started;
    assert.ok(flushMs >= QUERY_TIMEOUT - 50 && flushMs <= QUERY_TIMEOUT + 2000, `flush() rejected after ${Math.round(flushMs)} ms (queryTimeoutMs ${QUERY_TIMEOUT})`);

    started = performance.now();
    const disconnectAt = new Date(T.getTime() + 2000);
    await assert.rejects(
      stager.disconnect({ agentId: ids[1]!, disconnectedAt: disconnectAt, updatedAt: disconnectAt }),
      (err: unknown) => err instanceof TimeoutError,
    );
    const disconnectMs = performance.now() - started;
    assert.ok(disconnectMs <= QUERY_TIMEOUT + 2000, `disconnect() rejected after ${Math.round(disconnectMs)} ms`);
    await waitFor(() => errors.some((e) => e instanceof TimeoutError), 'the background flush reporting the timeout', 10_000);

    started = performance.now();
    await stager.close();
    const closeMs = performance.now() - started;
    const report = stager.closeReport();
    assert.ok(closeMs <= CLOSE_TIMEOUT + 5000 + 1000, `close() took ${Math.round(closeMs)} ms (closeTimeoutMs ${CLOSE_TIMEOUT})`);
    assert.equal(report.lost + report.uncertain, ids.length, `every agent reported lost or uncertain: ${JSON.stringify(report)}`);
    assert.equal(report.uncertain, 0, 'no COPY ever started, so nothing is uncertain');
    const waiting = pool.waitingCount;

    // the application releases its client: checkouts still queued get it and give it straight back
    held.release();
    held = undefined;
    await new Promise((r) => setTimeout(r, 2000));
    assert.equal(await stagedCount(db.pool), 0, 'no COPY ran after close() resolved');
    const row = await agentRow(db.pool, ids[1]!);
    assert.equal(row.disconnected_at, null, 'the timed-out disconnect did not run later either');
    assert.equal(pool.waitingCount, 0, 'no checkout is left waiting');
    const { rows } = await db.pool.query(`SELECT 1 FROM pg_stat_activity WHERE application_name = 'app-pool' AND state <> 'idle'`);
    assert.equal(rows.length, 0);
    // the pool itself is fine for the application
    assert.equal((await pool.query<{ x: number }>('SELECT 1 AS x')).rows[0]!.x, 1);
    console.log(`held pool (max 1): flush() TimeoutError after ${Math.round(flushMs)} ms, disconnect() after ${Math.round(disconnectMs)} ms, ` +
      `close() ${Math.round(closeMs)} ms reporting ${JSON.stringify(report)}; ${waiting} checkout(s) were queued at close, none ran`);
  } finally {
    held?.release();
    held = undefined;
    await stager.close();
  }
  assert.deepEqual(crashes, []);
});

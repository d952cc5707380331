/**
 * A COPY killed mid-stream (pg_terminate_backend), statement_timeout hit
 * during COPY and during the merge, and a merge killed mid-statement: nothing
 * is half-applied or applied twice, nothing is lost, the retry lands it.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { ConnectionError, TimeoutError } from '../../src/errors.ts';
import { mergeNow } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createAgents, createTestDb, stagedCount, withDatabase, type TestDb } from '../support/db.ts';
import { waitFor } from '../support/wait.ts';

let db: TestDb;
const role = `hb_fault_${randomUUID().slice(0, 8)}`;
const N = 100_000;
let ids: string[];
const T0 = Date.UTC(2026, 0, 1);

before(async () => {
  db = await createTestDb('fault_interrupted');
  ids = await createAgents(db.pool, N);
  await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN IN ROLE heartbeat_writer`);
});
after(async () => {
  if (!db) return;
  await db.drop();
  const admin = new pg.Client({ connectionString: withDatabase(db.url, 'postgres') });
  await admin.connect();
  await admin.query(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`).finally(() => admin.end());
});

function roleUrl(): string {
  const u = new URL(db.url);
  u.username = role;
  u.password = '';
  return u.toString();
}

function stageAll(stager: HeartbeatStager, round: number): void {
  const t = new Date(T0 + round * 1000);
  for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: t, updatedAt: t });
}

async function countAt(round: number): Promise<number> {
  const { rows } = await db.pool.query<{ n: string }>('SELECT count(*) AS n FROM public.workspace_agents WHERE updated_at = $1', [
    new Date(T0 + round * 1000),
  ]);
  return Number(rows[0]!.n);
}

/** Terminates the first active backend of this database whose query starts with `prefix`; resolves to whether it did. */
async function killWhenActive(prefix: string, until: () => boolean): Promise<boolean> {
  while (!until()) {
    const { rows } = await db.pool.query<{ killed: boolean }>(
      `SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity
        WHERE datname = $1 AND state = 'active' AND pid <> pg_backend_pid() AND query LIKE $2 LIMIT 1`,
      [db.name, `${prefix}%`],
    );
    if (rows[0]?.killed) return true;
    await new Promise((r) => setTimeout(r, 1));
  }
  return false;
}

describe('interrupted COPY and merge', () => {
  test('a COPY killed mid-stream rolls back whole; the retry lands every row once', async () => {
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, {
      flushIntervalMs: 3_600_000, maxBatchSize: 10 * N, maxRowsPerCopy: N, logger: silentLogger,
    });
    try {
      let round = 0;
      let killedMidCopy = false;
      for (let attempt = 0; attempt < 5 && !killedMidCopy; attempt++) {
        stageAll(stager, ++round);
        let done = false;
        const flushed = stager.flush().then(() => null, (err: unknown) => err).finally(() => (done = true));
        const killed = await killWhenActive('COPY', () => done);
        const err = await flushed;
        if (killed && err !== null) {
          killedMidCopy = true;
          assert.ok(err instanceof ConnectionError, `a killed COPY is a ConnectionError, got ${String(err)}`);
          assert.equal(await stagedCount(db.pool), 0, 'a killed COPY leaves no partial rows');
          assert.equal(stager.stats().pendingAgents, N, 'the batch is kept for the retry');
        } else {
          await mergeNow(db.pool); // the COPY won the race: start over with a newer round
        }
      }
      assert.ok(killedMidCopy, 'killed a COPY in progress (in 5 attempts)');
      await stager.flush();
      assert.equal(await stagedCount(db.pool), N, 'the retry copied every row exactly once');
      const merged = await mergeNow(db.pool);
      assert.equal(merged.rowsConsumed, N);
      assert.equal(merged.agentsUpdated, N);
      assert.equal(await countAt(round), N, 'every agent holds the retried round');
      const again = await mergeNow(db.pool);
      assert.equal(again.rowsConsumed, 0, 'nothing left to apply twice');
    } finally {
      await stager.close();
    }
  });

  test('statement_timeout during COPY: TimeoutError, nothing staged; the background retry lands it once lifted', async () => {
    const quoted = pg.escapeIdentifier(role);
    const dbName = pg.escapeIdentifier(db.name);
    await db.pool.query(`ALTER ROLE ${quoted} IN DATABASE ${dbName} SET statement_timeout = '1ms'`);
    const errors: unknown[] = [];
    const stager = new HeartbeatStager({ connectionString: roleUrl(), max: 1 }, {
      flushIntervalMs: 50, maxBatchSize: 10 * N, retryInitialDelayMs: 50, retryMaxDelayMs: 200,
      logger: silentLogger, onError: (e) => errors.push(e),
    });
    try {
      stageAll(stager, 100);
      await waitFor(() => stager.stats().failedCopies >= 2, 'COPYs failing on statement_timeout', 30_000);
      assert.ok(errors.every((e) => e instanceof TimeoutError), `statement_timeout is a TimeoutError: ${errors.map(String).join('; ')}`);
      assert.equal(await stagedCount(db.pool), 0, 'a timed-out COPY leaves nothing');
      await db.pool.query(`ALTER ROLE ${quoted} IN DATABASE ${dbName} RESET statement_timeout`);
      await waitFor(() => stager.stats().pendingAgents === 0, 'the background retry after the timeout is lifted', 30_000);
      assert.equal(await stagedCount(db.pool), N, 'every row staged exactly once');
    } finally {
      await db.pool.query(`ALTER ROLE ${quoted} IN DATABASE ${dbName} RESET statement_timeout`);
      await stager.close();
    }
  });

  test('statement_timeout during the merge: TimeoutError, staging intact, no lock left behind; the next merge lands it', async () => {
    // staging holds N rows from the previous test (round 100)
    assert.equal(await stagedCount(db.pool), N);
    const impatient = new pg.Pool({ connectionString: db.url, max: 1, statement_timeout: 5 });
    impatient.on('error', () => {});
    try {
      const err = await mergeNow(impatient).then(() => null, (e: unknown) => e);
      assert.ok(err instanceof TimeoutError, `merge on statement_timeout is a TimeoutError, got ${String(err)}`);
    } finally {
      await impatient.end();
    }
    assert.equal(await stagedCount(db.pool), N, 'the DELETE rolled back with the merge');
    assert.equal(await countAt(100), 0, 'nothing applied');
    const merged = await mergeNow(db.pool);
    assert.equal(merged.skippedConcurrent, false, 'the advisory lock went with the failed transaction');
    assert.equal(merged.agentsUpdated, N);
    assert.equal(await countAt(100), N);
  });

  test('a merge killed mid-statement: ConnectionError, staging intact; the next merge lands it', async () => {
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, maxBatchSize: 10 * N, logger: silentLogger });
    stageAll(stager, 200);
    await stager.close();
    assert.equal(await stagedCount(db.pool), N);
    const victim = new pg.Pool({ connectionString: db.url, max: 1 });
    victim.on('error', () => {});
    let killedMidMerge = false;
    try {
      let done = false;
      // one statement for the whole backlog, so that killing it leaves everything staged
      const merged = mergeNow(victim, { maxRows: N }).then(() => null, (e: unknown) => e).finally(() => (done = true));
      const killed = await killWhenActive('SELECT rows_consumed', () => done);
      const err = await merged;
      if (killed && err !== null) {
        killedMidMerge = true;
        assert.ok(err instanceof ConnectionError, `a killed merge is a ConnectionError, got ${String(err)}`);
        assert.equal(await stagedCount(db.pool), N, 'the killed merge rolled back');
        assert.equal(await countAt(200), 0);
      }
    } finally {
      await victim.end();
    }
    const merged = await mergeNow(db.pool, { maxRows: N });
    assert.equal(await countAt(200), N, 'every agent landed once');
    assert.equal(merged.rowsConsumed, killedMidMerge ? N : 0);
    if (!killedMidMerge) assert.fail('the merge finished before it could be killed (too fast for this check)');
  });
});

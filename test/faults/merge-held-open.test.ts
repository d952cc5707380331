/**
 * A merge held open: someone runs `BEGIN; SELECT * FROM
 * heartbeat.merge_agent_connections();` and does not commit. Its transaction
 * keeps every part's merge lock and the row locks of what it updated. Nothing
 * stalls silently: heartbeat.status and readStatus() name the backend holding
 * the lock and since when merges find it taken; a running startMerger() logs a
 * warning naming the pid, once per episode; other merges skip at once;
 * disconnect_agent on a row that merge updated fails with a TimeoutError after
 * lock_timeout (2 s) instead of blocking.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { TimeoutError } from '../../src/errors.ts';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { startMerger, type Merger } from '../../src/merger.ts';
import { readStatus } from '../../src/status.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentRow, createAgents, createTestDb, type TestDb } from '../support/db.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

let db: TestDb;
const clients: pg.Client[] = [];
before(async () => {
  db = await createTestDb('fault_held_merge');
});
after(async () => {
  for (const c of clients) await c.end().catch(() => {});
  await db?.drop();
});

const at = (s: number): Date => new Date(Date.UTC(2026, 0, 1) + s * 1000);

async function holdMerge(): Promise<{ pid: number; client: pg.Client }> {
  const client = new pg.Client({ connectionString: db.url, application_name: 'someone-else' });
  client.on('error', () => {});
  await client.connect();
  clients.push(client);
  const pid = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
  await client.query('BEGIN');
  const { rows } = await client.query<{ n: number }>('SELECT parts_skipped_concurrent AS n FROM heartbeat.merge_agent_connections()');
  assert.equal(Number(rows[0]!.n), 0, 'the open merge holds every part');
  return { pid, client };
}

test('a merge left open in a transaction: status names the holder, the merger warns once per episode, disconnects time out', async (t) => {
  const ids = await createAgents(db.pool, 200);
  const stager = new HeartbeatStager({ connectionString: db.url, max: 2 }, { flushIntervalMs: 50, queryTimeoutMs: 10_000, logger: silentLogger });
  const log = recordingLogger();
  const INTERVAL = 400;
  let merger: Merger | undefined;
  try {
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(1), updatedAt: at(1) });
    await stager.flush();
    const held = await holdMerge(); // merges round 1 in its own, open, transaction
    const heldAt = Date.now();
    // started after, so that round 1 is the open merge's (not this merger's, one tick earlier)
    const running = startMerger({ connectionString: db.url }, { intervalMs: INTERVAL, logger: log });
    merger = running;

    // other merges skip at once and see who holds the lock
    const started = performance.now();
    const skipped = await mergeNow(db.pool);
    assert.ok(performance.now() - started < 1500, 'a merge never waits for the held lock');
    assert.equal(skipped.skippedConcurrent, true);
    assert.equal(skipped.lockHolderPid, held.pid);

    // heartbeat.status names the backend and since when merges find the lock taken
    const { rows } = await db.pool.query<{ pid: number; since: Date | null }>(
      'SELECT merge_lock_holder_pid AS pid, merge_lock_busy_since AS since FROM heartbeat.status',
    );
    assert.equal(rows[0]!.pid, held.pid);
    assert.ok(rows[0]!.since instanceof Date);
    assert.ok(Math.abs(rows[0]!.since.getTime() - heldAt) < 5000, 'busy since about when it was held');
    const status = await readStatus({ pool: db.pool });
    assert.equal(status.mergeLock.holderPid, held.pid);
    assert.ok(status.mergeLock.busySince instanceof Date);
    assert.ok(status.parts.every((p) => p.lockHolderPid === held.pid), 'every part is held by it');

    // the running merger warns, naming the pid, once for this episode
    const lockWarnings = (): typeof log.calls => log.calls.filter((c) => /merge lock of staging has been held/.test(c.message));
    await waitFor(() => lockWarnings().length >= 1, 'the merger to warn', 15_000, 10);
    const warnedMs = Date.now() - heldAt;
    const warning = lockWarnings()[0]!;
    assert.equal(warning.level, 'warn', 'a warning, not debug');
    assert.match(warning.message, new RegExp(`backend ${held.pid}\\b`));
    assert.equal(warning.meta?.lockHolderPid, held.pid);
    const skipsBefore = running.stats().skippedConcurrent;
    await waitFor(() => running.stats().skippedConcurrent >= skipsBefore + 4, 'more ticks during the same episode', 15_000);
    assert.equal(lockWarnings().length, 1, 'once per episode, not per tick');

    // a direct disconnect of a row the held merge updated fails fast instead of blocking
    const t0 = performance.now();
    await assert.rejects(
      stager.disconnect({ agentId: ids[0]!, disconnectedAt: at(2), updatedAt: at(2) }),
      (err: unknown) => err instanceof TimeoutError && /55P03|lock/i.test(`${(err as TimeoutError).sqlState ?? ''} ${err.message}`),
    );
    const disconnectMs = performance.now() - t0;
    assert.ok(disconnectMs >= 1800 && disconnectMs < 6000, `disconnect_agent gave up after ${Math.round(disconnectMs)} ms (lock_timeout 2 s)`);
    t.diagnostic(`disconnect on a row held by the open merge: TimeoutError after ${Math.round(disconnectMs)} ms`);

    // the episode ends: the merge commits, the lock is free, status clears, merges resume
    await held.client.query('COMMIT');
    assert.equal((await agentRow(db.pool, ids[0]!)).updated_at.getTime(), at(1).getTime(), 'the held merge applied round 1 on commit');
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(3), updatedAt: at(3) });
    await waitFor(async () => (await agentRow(db.pool, ids[0]!)).updated_at.getTime() === at(3).getTime(), 'merges to resume', 15_000);
    const clear = await readStatus({ pool: db.pool });
    assert.equal(clear.mergeLock.holderPid, null);
    assert.equal(clear.mergeLock.busySince, null);

    // a second episode is warned about again
    await stager.flush();
    const again = await holdMerge();
    await waitFor(() => lockWarnings().length >= 2, 'a warning for the second episode', 15_000);
    assert.match(lockWarnings()[1]!.message, new RegExp(`backend ${again.pid}\\b`));
    await again.client.query('ROLLBACK');
    console.log(`merge held open: startMerger (interval ${INTERVAL} ms) warned ${warnedMs} ms after the merge was left open (once per episode); ` +
      `disconnect_agent TimeoutError after ${Math.round(disconnectMs)} ms`);
  } finally {
    await stager.close();
    await merger?.close();
  }
});

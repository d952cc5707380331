/**
 * Frozen (half-open) connections: a peer that stops answering without a FIN or
 * an RST (a failover behind a VIP, a NAT entry dropped, a hung proxy). Only the
 * library's own deadlines can notice; these tests freeze connections with
 * test/support/freeze-proxy.ts and check that nothing stalls for good:
 *
 *   (a) a stager frozen in the middle of streaming a COPY of 200,000 rows fails
 *       that COPY with a TimeoutError after queryTimeoutMs, destroys the
 *       connection, and lands every newest update on a fresh connection;
 *   (b) a merger frozen in the middle of a merge fails that tick with a
 *       TimeoutError after queryTimeoutMs and merges on a fresh connection at the
 *       next tick (since_last_merge stops growing); close() while a merge is
 *       frozen resolves within stopTimeoutMs + 5 s;
 *   (c) stager.close() against a blackholed server resolves within
 *       closeTimeoutMs + 5 s, reports what it could not write, and nothing it
 *       had reaches the database after close() resolved, even once the network
 *       heals.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { TimeoutError, type HeartbeatError } from '../../src/errors.ts';
import { silentLogger } from '../../src/logger.ts';
import { startMerger, type Merger } from '../../src/merger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';
import { mergeUntilDrained } from '../support/drain.ts';
import { startFreezeProxy, type FreezeProxy } from '../support/freeze-proxy.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

let db: TestDb;
const proxies: FreezeProxy[] = [];
const cleanups: (() => Promise<unknown>)[] = [];
const crashes: unknown[] = [];
const onCrash = (err: unknown): void => void crashes.push(err);

before(async () => {
  process.on('unhandledRejection', onCrash);
  process.on('uncaughtException', onCrash);
  db = await createTestDb('fault_frozen');
});
after(async () => {
  // proxies first: a client or pool ending on a frozen connection waits for a FIN that never comes
  for (const p of proxies) await p.close();
  for (const c of cleanups.reverse()) {
    // each within 15 s: a cleanup that hangs must not hold the file until the runner's timeout
    await Promise.race([
      Promise.resolve().then(c).catch(() => {}),
      new Promise((r) => setTimeout(r, 15_000).unref()),
    ]);
  }
  await db?.drop();
  process.off('unhandledRejection', onCrash);
  process.off('uncaughtException', onCrash);
});

async function proxy(): Promise<FreezeProxy> {
  const port = Number(new URL(db.url).port || 5432);
  const p = await startFreezeProxy(port);
  proxies.push(p);
  return p;
}

const T0 = Date.UTC(2026, 0, 1);
const at = (round: number): Date => new Date(T0 + round * 1000);

/** Count of agents whose row holds `round`. */
async function atRound(ids: string[], round: number): Promise<number> {
  const { rows } = await db.pool.query<{ n: string }>(
    'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2',
    [ids, at(round)],
  );
  return Number(rows[0]!.n);
}

async function drain(): Promise<void> {
  await mergeUntilDrained(db.pool);
}

describe('a stager frozen mid-COPY', () => {
  test('the COPY times out after queryTimeoutMs (onError: TimeoutError), the connection is destroyed, the retry lands every newest update', async (t) => {
    const N = 200_000;
    const ids = await createAgents(db.pool, N);
    const p = await proxy();
    const errors: { at: number; error: HeartbeatError }[] = [];
    const pool = new pg.Pool({ connectionString: p.url(db.url), max: 2 });
    pool.on('error', () => {});
    const removed: pg.PoolClient[] = [];
    pool.on('remove', (c) => removed.push(c as pg.PoolClient));
    cleanups.push(() => pool.end());
    const QUERY_TIMEOUT = 2000;
    const watcher = new pg.Client({ connectionString: db.url });
    await watcher.connect();
    cleanups.push(() => watcher.end());
    const progress = async (): Promise<{ pid: number; tuples: number } | undefined> => {
      const { rows } = await watcher.query<{ pid: number; tuples: string }>(
        `SELECT p.pid, p.tuples_processed AS tuples FROM pg_stat_progress_copy p
          WHERE p.datname = current_database() AND p.command = 'COPY FROM'`,
      );
      return rows[0] && { pid: rows[0].pid, tuples: Number(rows[0].tuples) };
    };
    // one COPY of all 200,000 rows, so that the freeze lands inside it
    const stager = new HeartbeatStager({ pool }, {
      flushIntervalMs: 50, maxBatchSize: 10 * N, maxRowsPerCopy: N, queryTimeoutMs: QUERY_TIMEOUT,
      retryInitialDelayMs: 100, retryMaxDelayMs: 1000, logger: silentLogger,
      onError: (error) => errors.push({ at: Date.now(), error }),
    });
    cleanups.push(() => stager.close());
    // the freeze lands inside the one COPY of 200,000 rows (binary, ~80 bytes a row: ~16 MB), after
    // ~4 MB of it: armed before staging, it triggers on the bytes forwarded, not on a poll that a
    // quick COPY could outrun
    const frozen = p.freezeAfter(4_000_000);
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(1), updatedAt: at(1) });
    let noCopy: NodeJS.Timeout | undefined;
    await Promise.race([frozen, new Promise((_, reject) => { noCopy = setTimeout(() => reject(new Error('no COPY of 4 MB within 60 s')), 60_000); })]);
    clearTimeout(noCopy);
    const frozenAt = Date.now();
    // a COPY that is part way through its rows: the server has some, the rest is still coming
    const mid = await waitFor(async () => {
      const copy = await progress();
      return copy && copy.tuples > 0 ? copy : undefined;
    }, 'the server-side COPY, part way through its rows', 10_000);
    // the server has seen only part of the rows, and sees no more: the COPY is frozen mid-stream
    await new Promise((r) => setTimeout(r, 300));
    const stuck = await progress();
    assert.ok(stuck && stuck.pid === mid!.pid && stuck.tuples > 0 && stuck.tuples < N, 'the server-side COPY is still open, part way through');
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await progress())?.tuples, stuck.tuples, 'and receives nothing more');

    await waitFor(() => errors.length > 0, 'onError', 15_000);
    const first = errors[0]!;
    const failedAfter = first.at - frozenAt;
    assert.ok(first.error instanceof TimeoutError, `onError got a TimeoutError, not ${String(first.error)}`);
    assert.match(first.error.message, /COPY into staging did not finish within 2000 ms/);
    assert.ok(failedAfter <= QUERY_TIMEOUT + 3000, `the frozen COPY failed ${failedAfter} ms after the freeze (deadline ${QUERY_TIMEOUT} ms)`);
    // its connection was destroyed and dropped from the pool, not returned to it
    await waitFor(() => removed.length >= 1, 'the frozen client removed from the pool', 5000);
    const stream = (removed[0] as unknown as { connection: { stream: { destroyed: boolean } } }).connection.stream;
    assert.equal(stream.destroyed, true, 'its socket was destroyed');

    // the background retry, on a fresh connection (new connections through the proxy still work)
    await waitFor(() => stager.stats().pendingAgents === 0, 'the retry to land every row', 60_000);
    const landedMs = Date.now() - frozenAt;
    assert.ok(p.accepted >= 2, 'the retry used a new connection');
    assert.equal(await stagedCount(db.pool), N, 'every agent staged exactly once (the frozen COPY never committed)');
    assert.ok(landedMs < QUERY_TIMEOUT + 20_000, `staged ${landedMs} ms after the freeze`);
    await drain();
    assert.equal(await atRound(ids, 1), N, 'every newest update reached workspace_agents');
    t.diagnostic(`frozen mid-COPY at ${mid!.tuples} rows: TimeoutError after ${failedAfter} ms, all ${N} rows staged ${landedMs} ms after the freeze`);
    console.log(`frozen COPY (200k rows, queryTimeoutMs ${QUERY_TIMEOUT}): TimeoutError after ${failedAfter} ms, every row staged ${landedMs} ms after the freeze`);
    await p.close(); // the frozen server-side COPY ends (rolled back): still nothing doubled
    await waitFor(async () => (await progress()) === undefined, 'the frozen COPY to end on the server', 10_000);
    assert.equal(await stagedCount(db.pool), 0);
  });
});

describe('a merger frozen mid-merge', () => {
  test('the merge fails with a TimeoutError after queryTimeoutMs; the next tick merges on a fresh connection', async (t) => {
    const ids = await createAgents(db.pool, 500);
    const p = await proxy();
    const INTERVAL = 1000;
    const QUERY_TIMEOUT = 2000;
    const errors: HeartbeatError[] = [];
    const merger = startMerger({ connectionString: p.url(db.url) }, {
      intervalMs: INTERVAL, queryTimeoutMs: QUERY_TIMEOUT, stopTimeoutMs: 2000, logger: silentLogger,
      onError: (e) => errors.push(e), applicationName: 'frozen-merger',
    });
    cleanups.push(() => merger.close());
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 50, logger: silentLogger });
    cleanups.push(() => stager.close());
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(1), updatedAt: at(1) });
    await waitFor(async () => (await atRound(ids, 1)) === ids.length, 'the merger merging round 1', 15_000);

    // hold a row lock so that the next merge is visibly in progress (waiting on it) when we freeze
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    cleanups.push(() => holder.end());
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids[0]]);
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(2), updatedAt: at(2) });
    await stager.flush();
    await waitFor(async () => {
      const { rows } = await db.pool.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'frozen-merger' AND wait_event_type = 'Lock'`,
      );
      return rows.length > 0;
    }, 'a merge in progress', 15_000, 5);
    p.freeze(); // the merge's connection (and every other of the merger's pool) goes silent
    const frozenAt = Date.now();
    await holder.query('COMMIT'); // the server finishes the merge; its answer never arrives
    const failuresBefore = merger.stats().failures;

    await waitFor(() => errors.some((e) => e instanceof TimeoutError), 'the merge to fail with a TimeoutError', 15_000);
    const failedMs = Date.now() - frozenAt;
    assert.ok(failedMs <= QUERY_TIMEOUT + 2000, `the frozen merge failed ${failedMs} ms after the freeze (deadline ${QUERY_TIMEOUT} ms)`);
    assert.match(errors.find((e) => e instanceof TimeoutError)!.message, /did not finish within 2000 ms/);

    // the next ticks use fresh connections (new connections through the proxy work): merges go on
    const mergesBefore = merger.stats().merges;
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(3), updatedAt: at(3) });
    await waitFor(async () => (await atRound(ids, 3)) === ids.length, 'round 3 merged after the freeze', 20_000);
    const recoveredMs = Date.now() - frozenAt;
    // the commit is visible to the poll above before the merger has read its result (one event loop, either
    // order: a loaded PG14 CI run read the count first)
    await waitFor(() => merger.stats().merges > mergesBefore, 'the merger counting that merge', 5000);
    assert.ok(merger.stats().failures > failuresBefore);
    // since_last_merge stops growing: it stays around one interval from now on
    const since: number[] = [];
    for (let i = 0; i < 6; i++) {
      const { rows } = await db.pool.query<{ ms: number }>('SELECT extract(epoch FROM since_last_merge) * 1000 AS ms FROM heartbeat.status');
      since.push(Number(rows[0]!.ms));
      await new Promise((r) => setTimeout(r, 500));
    }
    assert.ok(since.every((ms) => ms < INTERVAL * 3 + 2000), `since_last_merge stays bounded: ${since.map(Math.round).join(', ')} ms`);
    t.diagnostic(`frozen merge failed after ${failedMs} ms; merged again ${recoveredMs} ms after the freeze; since_last_merge ${since.map(Math.round).join(', ')} ms`);
    console.log(`frozen merge (queryTimeoutMs ${QUERY_TIMEOUT}, interval ${INTERVAL}): TimeoutError after ${failedMs} ms, merging again ${recoveredMs} ms after the freeze`);
    await merger.close();
  });

  test('close() while the merge is frozen resolves within stopTimeoutMs + 5 s, and nothing is sent after', async () => {
    const ids = await createAgents(db.pool, 200);
    const p = await proxy();
    const STOP_TIMEOUT = 2000;
    const log = recordingLogger();
    let merger: Merger | undefined = startMerger({ connectionString: p.url(db.url) }, {
      intervalMs: 500, queryTimeoutMs: 60_000, stopTimeoutMs: STOP_TIMEOUT, logger: log, applicationName: 'frozen-merger-close',
    });
    cleanups.push(async () => merger?.close());
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    cleanups.push(() => holder.end());
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    cleanups.push(() => stager.close());
    await waitFor(() => merger!.stats().merges + merger!.stats().skippedRecent >= 1, 'a first tick', 10_000);
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids[0]]);
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(5), updatedAt: at(5) });
    await stager.flush();
    await waitFor(async () => {
      const { rows } = await db.pool.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'frozen-merger-close' AND wait_event_type = 'Lock'`,
      );
      return rows.length > 0;
    }, 'a merge in progress', 15_000, 5);
    p.freeze({ newConnections: true });
    await holder.query('COMMIT');
    const started = Date.now();
    await merger.close();
    const closeMs = Date.now() - started;
    assert.ok(closeMs <= STOP_TIMEOUT + 5000 + 1000, `close() took ${closeMs} ms (stopTimeoutMs ${STOP_TIMEOUT} + 5 s)`);
    assert.equal(merger.stopped, true);
    // once the network heals, nothing more comes from this merger
    const acceptedAtClose = p.accepted;
    p.thaw();
    await new Promise((r) => setTimeout(r, 1500));
    const { rows } = await db.pool.query(`SELECT 1 FROM pg_stat_activity WHERE application_name = 'frozen-merger-close' AND state = 'active'`);
    assert.equal(rows.length, 0, 'no merge of the closed merger is running');
    assert.equal(p.accepted, acceptedAtClose, 'no new connection after close()');
    console.log(`merger.close() with a frozen merge: ${closeMs} ms (stopTimeoutMs ${STOP_TIMEOUT})`);
    merger = undefined;
    await drain();
  });
});

describe('stager.close() against a blackholed server', () => {
  test('resolves within closeTimeoutMs + 5 s, reports the loss, and nothing reaches the database afterwards', async () => {
    const ids = await createAgents(db.pool, 5000);
    const p = await proxy();
    const CLOSE_TIMEOUT = 3000;
    const errors: HeartbeatError[] = [];
    const stager = new HeartbeatStager({ connectionString: p.url(db.url), max: 2 }, {
      flushIntervalMs: 100, queryTimeoutMs: 1500, closeTimeoutMs: CLOSE_TIMEOUT, retryInitialDelayMs: 100,
      retryMaxDelayMs: 500, logger: silentLogger, onError: (e) => errors.push(e),
    });
    cleanups.push(() => stager.close());
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(1), updatedAt: at(1) });
    await stager.flush(); // the pool has live connections now
    await drain();
    assert.equal(await stagedCount(db.pool), 0);

    p.freeze({ newConnections: true }); // existing connections silent, new ones accepted and never forwarded
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(2), updatedAt: at(2) });
    await new Promise((r) => setTimeout(r, 300)); // let a background COPY start into the void
    const started = Date.now();
    await stager.close();
    const closeMs = Date.now() - started;
    const report = stager.closeReport();
    assert.ok(closeMs <= CLOSE_TIMEOUT + 5000 + 1000, `close() took ${closeMs} ms (closeTimeoutMs ${CLOSE_TIMEOUT} + 5 s)`);
    assert.equal(report.lost + report.uncertain, ids.length, `every agent is reported lost or uncertain: ${JSON.stringify(report)}`);
    assert.ok(errors.length >= 1, 'onError heard about it');

    // the network heals: whatever the stager had sent or queued must not land now
    const acceptedAtClose = p.accepted;
    p.thaw();
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal(await stagedCount(db.pool), 0, 'staging stays empty after close() resolved');
    assert.equal(await atRound(ids, 2), 0, 'and no round-2 update was merged');
    assert.equal(p.accepted, acceptedAtClose, 'no new connection after close()');
    console.log(`stager.close() against a blackhole: ${closeMs} ms (closeTimeoutMs ${CLOSE_TIMEOUT}), report ${JSON.stringify(report)}`);
    assert.deepEqual(crashes, [], 'no unhandled rejection or uncaught exception');
  });
});

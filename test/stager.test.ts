import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { ClosedError, HeartbeatError, InvalidOptionError, InvalidUpdateError, MigrationsMissingError } from '../src/errors.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { alignedDelay, HeartbeatStager } from '../src/stager.ts';
import type { AgentUpdate } from '../src/update.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';
import { recordingLogger, waitFor } from './support/wait.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('stager');
});
after(async () => {
  await db.drop();
});

const t = (s: number): Date => new Date(Date.UTC(2026, 0, 1, 0, 0, s));
const quiet = { logger: silentLogger };

async function staged(agentId: string): Promise<{ last_connected_at: Date | null; updated_at: Date; first_connected_at: Date | null }[]> {
  const { rows } = await db.pool.query('SELECT * FROM heartbeat.agent_connection_staging WHERE agent_id = $1', [agentId]);
  return rows;
}

describe('HeartbeatStager', () => {
  test('flushes on the interval with one COPY, without being asked', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 100 });
    const agentId = randomUUID();
    stager.stage({ agentId, lastConnectedAt: t(1), updatedAt: t(1) });
    assert.equal(stager.stats().pendingAgents, 1);
    await waitFor(async () => (await staged(agentId)).length === 1, 'the interval flush');
    assert.equal(stager.stats().copies, 1);
    assert.equal(stager.stats().rowsCopied, 1);
  });

  test('flushes as soon as maxBatchSize agents are pending', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000, maxBatchSize: 50 });
    const ids = Array.from({ length: 50 }, () => randomUUID());
    for (const agentId of ids) stager.stage({ agentId, updatedAt: t(2) });
    await waitFor(async () => stager.stats().copies === 1, 'the batch-size flush');
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.agent_connection_staging WHERE agent_id = ANY($1)', [ids]);
    assert.equal(rows[0].n, 50);
  });

  test('keeps only the newest update per agent, also when the older one arrives later', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const agentId = randomUUID();
    stager.stage({ agentId, firstConnectedAt: t(5), lastConnectedAt: t(10), updatedAt: t(10) });
    stager.stage({ agentId, firstConnectedAt: t(1), lastConnectedAt: t(3), updatedAt: t(3) });
    stager.stage({ agentId, firstConnectedAt: t(7), lastConnectedAt: t(8), updatedAt: t(8) });
    await stager.flush();
    const rows = await staged(agentId);
    assert.equal(rows.length, 1);
    assert.deepEqual(rows[0]!.updated_at, t(10));
    assert.deepEqual(rows[0]!.last_connected_at, t(10));
    assert.deepEqual(rows[0]!.first_connected_at, t(1), 'the earliest firstConnectedAt of all updates');
    assert.equal(stager.stats().deduped, 2);
  });

  test('equal updatedAt: the same tie-break as the merge (a disconnect wins)', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const agentId = randomUUID();
    stager.stage({ agentId, lastConnectedAt: t(20), disconnectedAt: t(20), updatedAt: t(20) });
    stager.stage({ agentId, lastConnectedAt: t(21), updatedAt: t(20) });
    await stager.flush();
    const { rows } = await db.pool.query('SELECT disconnected_at FROM heartbeat.agent_connection_staging WHERE agent_id = $1', [agentId]);
    assert.deepEqual(rows, [{ disconnected_at: t(20) }]);
  });

  test('round-trips values and NULLs exactly through binary COPY and the merge', async () => {
    const [agentId] = await createAgents(db.pool, 1);
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const replica = randomUUID().toUpperCase();
    const old = new Date('1970-01-01T00:00:00.123Z');
    stager.stage({ agentId: agentId!, firstConnectedAt: old, lastConnectedAt: new Date('2026-03-04T05:06:07.891Z'), lastConnectedReplicaId: replica, disconnectedAt: null, updatedAt: new Date('2026-03-04T05:06:07.891Z') });
    await stager.flush();
    await mergeNow(db.pool);
    let row = await agentRow(db.pool, agentId!);
    assert.deepEqual(row.first_connected_at, old);
    assert.deepEqual(row.last_connected_at, new Date('2026-03-04T05:06:07.891Z'));
    assert.equal(row.last_connected_replica_id, replica.toLowerCase());
    assert.equal(row.disconnected_at, null);
    stager.stage({ agentId: agentId!, updatedAt: new Date('2026-03-04T05:06:08Z') });
    await stager.flush();
    await mergeNow(db.pool);
    row = await agentRow(db.pool, agentId!);
    assert.equal(row.last_connected_at, null);
    assert.equal(row.last_connected_replica_id, null);
    assert.deepEqual(row.first_connected_at, old, 'first_connected_at is never erased');
  });

  test('copies a large batch in one COPY', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000, maxBatchSize: 1_000_000 });
    const before = await stagedCount(db.pool);
    for (let i = 0; i < 50_000; i++) stager.stage({ agentId: randomUUID(), lastConnectedAt: t(30), updatedAt: t(30) });
    await stager.flush();
    assert.equal(stager.stats().copies, 1);
    assert.equal((await stagedCount(db.pool)) - before, 50_000);
    await mergeNow(db.pool); // discard them (unknown agents)
  });

  test('close() makes a final flush, is idempotent, and stage() afterwards throws ClosedError', async () => {
    const stager = new HeartbeatStager({ connectionString: db.url }, { ...quiet, flushIntervalMs: 600_000 });
    const agentId = randomUUID();
    stager.stage({ agentId, updatedAt: t(40) });
    const first = stager.close();
    assert.equal(stager.close(), first, 'the same promise');
    await first;
    assert.equal((await staged(agentId)).length, 1);
    assert.throws(() => stager.stage({ agentId, updatedAt: t(41) }), ClosedError);
    await assert.rejects(stager.disconnect({ agentId, disconnectedAt: t(41), updatedAt: t(41) }), ClosedError);
  });

  test('await using closes the stager (final flush included)', async () => {
    const agentId = randomUUID();
    let kept: HeartbeatStager;
    {
      await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
      kept = stager;
      stager.stage({ agentId, updatedAt: t(42) });
    }
    assert.equal((await staged(agentId)).length, 1);
    assert.throws(() => kept.stage({ agentId, updatedAt: t(43) }), ClosedError);
  });

  test('bad input is rejected with a typed error; other agents\' updates still land', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const good = [randomUUID(), randomUUID()];
    stager.stage({ agentId: good[0]!, updatedAt: t(50) });
    const bad: unknown[] = [
      { agentId: 'not-a-uuid', updatedAt: t(50) },
      { agentId: good[1], updatedAt: new Date(NaN) },
      { agentId: good[1] },
      { agentId: good[1], updatedAt: '2026-01-01T00:00:00Z' },
      { agentId: good[1], updatedAt: t(50), lastConnectedAt: 1767225600000 },
      { agentId: 42, updatedAt: t(50) },
      { agentId: good[1], updatedAt: t(50), lastConnectedReplicaId: 'replica-1' },
      { agentId: good[1], updatedAt: t(50), color: 'red' },
      null,
    ];
    for (const update of bad) {
      assert.throws(() => stager.stage(update as AgentUpdate), (err: unknown) => {
        assert.ok(err instanceof InvalidUpdateError, `${JSON.stringify(update)} → ${String(err)}`);
        assert.ok(err instanceof HeartbeatError);
        assert.match(err.message, /invalid heartbeat update: \w+/);
        return true;
      });
    }
    stager.stage({ agentId: good[1]!, updatedAt: t(51) });
    assert.equal(stager.stats().rejected, bad.length);
    assert.equal(stager.stats().pendingAgents, 2);
    await stager.flush();
    for (const id of good) assert.equal((await staged(id)).length, 1);
  });

  test('disconnect() writes at once and drops the older pending update; the merge cannot undo it', async () => {
    const [agentId] = await createAgents(db.pool, 1);
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    stager.stage({ agentId: agentId!, firstConnectedAt: t(59), lastConnectedAt: t(60), updatedAt: t(60) });
    await stager.flush(); // a heartbeat at t1 is staged
    stager.stage({ agentId: agentId!, lastConnectedAt: t(61), updatedAt: t(61) }); // and another is pending
    assert.equal(await stager.disconnect({ agentId: agentId!, disconnectedAt: t(62), updatedAt: t(62) }), true);
    assert.equal(stager.stats().pendingAgents, 0, 'the pending older heartbeat was dropped');
    assert.equal(stager.stats().droppedByDisconnect, 1);
    const merged = await mergeNow(db.pool);
    assert.ok(merged.skippedStale >= 1);
    const row = await agentRow(db.pool, agentId!);
    assert.deepEqual(row.disconnected_at, t(62));
    assert.deepEqual(row.updated_at, t(62), 'the staged heartbeat (t1) did not overwrite the disconnect');
    assert.deepEqual(row.last_connected_at, t(61), 'the dropped pending heartbeat passed on its lastConnectedAt');
    assert.deepEqual(row.first_connected_at, t(59), 'and the stale staged one its firstConnectedAt');
    const { rows } = await db.pool.query('SELECT status FROM heartbeat.agent_status(agent_ids => $1)', [[agentId]]);
    assert.equal(rows[0].status, 'disconnected');
    assert.equal(await stager.disconnect({ agentId: agentId!, disconnectedAt: t(55), updatedAt: t(55) }), false, 'older disconnect');
    assert.equal(await stager.disconnect({ agentId: randomUUID(), disconnectedAt: t(63), updatedAt: t(63) }), false, 'unknown agent');
    await assert.rejects(stager.disconnect({ agentId: 'nope', disconnectedAt: t(63), updatedAt: t(63) }), InvalidUpdateError);
  });

  test('an agent that connects and disconnects between two merges shows disconnected, not connecting', async () => {
    const [pendingOnly, copied] = await createAgents(db.pool, 2);
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const now = Date.now();
    const at = (ms: number): Date => new Date(now - 10_000 + ms);
    stager.stage({ agentId: copied!, firstConnectedAt: at(0), lastConnectedAt: at(0), updatedAt: at(0) });
    await stager.flush(); // this one's first heartbeat is in staging, not merged
    stager.stage({ agentId: pendingOnly!, firstConnectedAt: at(1), lastConnectedAt: at(1), updatedAt: at(1) }); // only in memory
    assert.equal(await stager.disconnect({ agentId: copied!, disconnectedAt: at(2), updatedAt: at(2) }), true);
    assert.equal(await stager.disconnect({ agentId: pendingOnly!, disconnectedAt: at(3), updatedAt: at(3) }), true);
    await stager.flush();
    await mergeNow(db.pool);
    const { rows } = await db.pool.query('SELECT agent_id, status FROM heartbeat.agent_status(agent_ids => $1) ORDER BY agent_id', [[copied, pendingOnly]]);
    assert.deepEqual(rows.map((r) => r.status), ['disconnected', 'disconnected']);
    assert.deepEqual((await agentRow(db.pool, copied!)).first_connected_at, at(0));
    assert.deepEqual((await agentRow(db.pool, pendingOnly!)).first_connected_at, at(1));
  });

  test('stats().pendingAgents counts an agent once while its COPY is in flight', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 600_000 });
    const ids = Array.from({ length: 2000 }, () => randomUUID());
    for (const agentId of ids) stager.stage({ agentId, updatedAt: t(90) });
    const flushing = stager.flush();
    await new Promise((resolve) => setImmediate(resolve)); // the COPY has taken the batch and is in flight
    assert.equal(stager.stats().pendingAgents, 2000);
    for (const agentId of ids) stager.stage({ agentId, updatedAt: t(91) });
    assert.equal(stager.stats().pendingAgents, 2000);
    await flushing;
    assert.equal(stager.stats().pendingAgents, 2000);
    await stager.flush();
    assert.equal(stager.stats().pendingAgents, 0);
  });

  test('a failed COPY keeps its rows, merged with newer ones, and the retry lands them', async () => {
    const errors: HeartbeatError[] = [];
    const logger = recordingLogger();
    await using stager = new HeartbeatStager(
      { pool: db.pool },
      { logger, flushIntervalMs: 50, retryInitialDelayMs: 50, retryMaxDelayMs: 100, onError: (e) => void errors.push(e) },
    );
    const a = randomUUID();
    const b = randomUUID();
    await db.pool.query('ALTER TABLE heartbeat.agent_connection_staging RENAME TO staging_away');
    try {
      stager.stage({ agentId: a, lastConnectedAt: t(70), updatedAt: t(70) });
      stager.stage({ agentId: b, lastConnectedAt: t(70), updatedAt: t(70) });
      await waitFor(() => errors.length >= 2, 'failed COPYs');
      assert.ok(errors[0] instanceof MigrationsMissingError, String(errors[0]));
      await assert.rejects(stager.flush(), MigrationsMissingError);
      assert.equal(stager.stats().pendingAgents, 2, 'nothing lost');
      stager.stage({ agentId: a, lastConnectedAt: t(71), updatedAt: t(71) });
      stager.stage({ agentId: b, lastConnectedAt: t(69), updatedAt: t(69) });
    } finally {
      await db.pool.query('ALTER TABLE heartbeat.staging_away RENAME TO agent_connection_staging');
    }
    await waitFor(async () => (await staged(a)).length === 1 && (await staged(b)).length === 1, 'the retry');
    assert.deepEqual((await staged(a))[0]!.updated_at, t(71), 'the newer update staged meanwhile wins');
    assert.deepEqual((await staged(b))[0]!.updated_at, t(70), 'an older one staged meanwhile does not');
    assert.ok(stager.stats().failedCopies >= 2);
    const warnings = logger.calls.filter((c) => c.level === 'warn');
    assert.equal(warnings.length, stager.stats().failedCopies - 1, 'one warning per failed background attempt (flush() rejected instead)');
    assert.match(warnings[0]!.message, /COPY into staging failed: .*; retrying in \d+ ms/);
  });

  test('a connection killed by pg_terminate_backend is replaced and the retry lands the rows', async () => {
    const errors: HeartbeatError[] = [];
    await using stager = new HeartbeatStager(
      { connectionString: db.url, max: 1 },
      { ...quiet, flushIntervalMs: 600_000, retryInitialDelayMs: 20, onError: (e) => void errors.push(e) },
    );
    const first = randomUUID();
    stager.stage({ agentId: first, updatedAt: t(80) });
    await stager.flush();
    await db.pool.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg-heartbeat stager' AND datname = current_database()");
    const ids = Array.from({ length: 100 }, () => randomUUID());
    for (const agentId of ids) stager.stage({ agentId, updatedAt: t(81) });
    await stager.flush().catch(() => stager.flush());
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.agent_connection_staging WHERE agent_id = ANY($1)', [ids]);
    assert.equal(rows[0].n, 100);
  });

  test('flush() with nothing pending resolves at once; stats() counts', async () => {
    await using stager = new HeartbeatStager({ pool: db.pool }, quiet);
    await stager.flush();
    assert.deepEqual(stager.stats(), {
      staged: 0, deduped: 0, rejected: 0, rowsCopied: 0, copies: 0, failedCopies: 0, droppedByDisconnect: 0,
      pendingAgents: 0, retainedAgents: 0, resets: 0, resentAgents: 0, lastCopyDurationMs: null,
    });
  });

  test('aligned flushes (the default) start on the wall-clock grid: multiples of flushIntervalMs since the epoch, the lead before', async () => {
    const INTERVAL = 1000;
    const LEAD = 300;
    // created 100 ms past a grid instant: a flush every 1000 ms counted from creation would start ~100 ms past each
    // instant, far from the aligned flush points (300 ms before each)
    while (Date.now() % INTERVAL < 80 || Date.now() % INTERVAL > 120) await new Promise((r) => setTimeout(r, 5));
    const starts: number[] = [];
    const stager = new HeartbeatStager({ pool: db.pool }, {
      ...quiet, flushIntervalMs: INTERVAL, flushLeadMs: LEAD, onFlush: ({ durationMs }) => void starts.push(Date.now() - durationMs),
    });
    const feeding = setInterval(() => stager.stage({ agentId: randomUUID(), updatedAt: new Date() }), 50);
    try {
      await waitFor(() => starts.length >= 3, 'three interval flushes', 10_000);
    } finally {
      clearInterval(feeding);
      await stager.close();
    }
    for (const start of starts.slice(0, 3)) {
      const phase = (((start + LEAD) % INTERVAL) + INTERVAL) % INTERVAL; // 0 = exactly the lead before a grid instant
      const off = Math.min(phase, INTERVAL - phase);
      assert.ok(off < 250, `a flush started ${off} ms away from its aligned instant (starts mod ${INTERVAL}: ${starts.map((x) => x % INTERVAL)})`);
    }
    // one per grid instant: never two flushes for the same instant
    const slots = starts.slice(0, 3).map((x) => Math.round((x + LEAD) / INTERVAL));
    assert.equal(new Set(slots).size, 3, `slots ${slots}`);
  });

  test('alignedDelay(): the next k * interval - lead at least the guard away', () => {
    assert.equal(alignedDelay(10_000, 1000, 300), 700);
    assert.equal(alignedDelay(10_650, 1000, 300), 50, 'exactly the guard (50 ms) away is still this instant');
    assert.equal(alignedDelay(10_690, 1000, 300), 1010, 'a timer that fired 10 ms early does not flush the same instant twice');
    assert.equal(alignedDelay(10_000, 1000, 300, 500), 700);
    assert.equal(alignedDelay(10_300, 1000, 300, 500), 1400, 'the first flush: at least half an interval away');
    assert.equal(alignedDelay(1_764_000_000_123, 5000, 400), 1_764_000_004_600 - 1_764_000_000_123);
  });

  test('rejects bad options and connection arguments with a typed error naming the option', () => {
    const bad: [Record<string, unknown>, string][] = [
      [{ flushIntervalMs: 0 }, 'flushIntervalMs'], [{ flushIntervalMs: 2 ** 31 }, 'flushIntervalMs'],
      [{ closeTimeoutMs: 2 ** 31 }, 'closeTimeoutMs'], [{ queryTimeoutMs: Number.POSITIVE_INFINITY }, 'queryTimeoutMs'],
      [{ maxBatchSize: 0.5 }, 'maxBatchSize'], [{ maxRowsPerCopy: -1 }, 'maxRowsPerCopy'], [{ retryMaxDelayMs: '5' }, 'retryMaxDelayMs'],
      [{ onFlush: 42 }, 'onFlush'], [{ alignFlush: 'yes' }, 'alignFlush'], [{ flushLeadMs: -1 }, 'flushLeadMs'],
    ];
    for (const [options, option] of bad) {
      assert.throws(() => new HeartbeatStager({ pool: db.pool }, options as never),
        (e: unknown) => e instanceof InvalidOptionError && e.option === option, JSON.stringify(options));
    }
    assert.throws(() => new HeartbeatStager(null as never), TypeError);
    assert.throws(() => new HeartbeatStager({ pool: {} } as never), TypeError);
  });
});

/**
 * PostgreSQL restarted (pg_ctl restart -m fast) and crashed (-m immediate) in
 * the middle of a run, on a cluster of this file's own. The stager reconnects
 * by itself; nothing only in the client's memory is lost; what sat in the
 * UNLOGGED staging table at a crash is emptied by crash recovery and resent by
 * the stager, which kept it until a merge consumed it: nothing is lost; with
 * durableStaging nothing staged is lost either (and the resend is harmless). Status events committed before
 * a crash survive it, and a watcher listening across it reconnects and delivers each event once.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import pg from 'pg';
import { isStagingDurable } from '../../src/durability.ts';
import { ConnectionError, HeartbeatError } from '../../src/errors.ts';
import { mergeNow } from '../../src/merge.ts';
import { migrate } from '../../src/migrate.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { watchStatusChanges, type StatusChange } from '../../src/status-events.ts';
import { privateCluster } from '../support/private-cluster.ts';
import { createAgents, stagedCount } from '../support/db.ts';
import { mergeUntilDrained } from '../support/drain.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

const env = privateCluster('fault_restart', { synchronous_commit: 'on' });

const T0 = Date.UTC(2026, 0, 1);
const at = (round: number): Date => new Date(T0 + round * 1000);

function newStager(logger = silentLogger): HeartbeatStager {
  return new HeartbeatStager(
    { connectionString: env.db.url, max: 2 },
    { flushIntervalMs: 50, retryInitialDelayMs: 50, retryMaxDelayMs: 500, logger },
  );
}

/** Merges until staging is empty, riding out connection failures (the pool replaces broken clients). */
async function mergeAll(pool: pg.Pool): Promise<void> {
  await mergeUntilDrained(pool, { callTimeoutMs: 30_000 });
}

async function updatedAtCounts(ids: string[]): Promise<Map<number, number>> {
  const { rows } = await env.db.pool.query<{ t: Date; n: string }>(
    'SELECT updated_at AS t, count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) GROUP BY 1',
    [ids],
  );
  return new Map(rows.map((r) => [r.t.getTime(), Number(r.n)]));
}

function stageRound(stager: HeartbeatStager, ids: string[], round: number): void {
  for (const agentId of ids) {
    stager.stage({ agentId, firstConnectedAt: at(1), lastConnectedAt: at(round), updatedAt: at(round) });
  }
}

describe('PostgreSQL restarted or crashed mid-run', () => {
  test('fast restart while staging and merging: the client carries on, every newest update lands', async () => {
    const ids = await createAgents(env.db.pool, 500);
    const log = recordingLogger();
    const stager = newStager(log);
    const mergePool = new pg.Pool({ connectionString: env.db.url, max: 1 });
    mergePool.on('error', () => {});
    const mergeErrors: unknown[] = [];
    let running = true;
    let round = 0;
    const loop = (async () => {
      while (running) {
        stageRound(stager, ids, ++round);
        await mergeNow(mergePool).catch((err: unknown) => mergeErrors.push(err));
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    await waitFor(async () => round > 5, 'a few rounds before the restart');
    await env.cluster.restart('fast');
    const afterRestart = round;
    await waitFor(() => round > afterRestart + 5 && stager.stats().copies > 0, 'rounds after the restart', 30_000);
    running = false;
    await loop;
    const last = round;
    await waitFor(async () => {
      await stager.flush();
      return true;
    }, 'a flush after the restart', 30_000, 100);
    await stager.close();
    await mergeAll(mergePool);
    await mergePool.end();
    assert.deepEqual([...(await updatedAtCounts(ids))], [[at(last).getTime(), ids.length]], 'every agent holds the last round');
    for (const err of mergeErrors) assert.ok(err instanceof HeartbeatError, `merge failures are typed: ${String(err)}`);
    assert.deepEqual(env.crashes, [], 'no unhandled rejection or exception');
  });

  test('crash (immediate): memory is kept; the UNLOGGED staging rows crash recovery empties are resent: nothing is lost', async () => {
    const ids = await createAgents(env.db.pool, 1000);
    const half = ids.length / 2;
    const [inMemory, onlyStaged] = [ids.slice(0, half), ids.slice(half)];
    const log = recordingLogger();
    const stager = newStager(log);
    const mergePool = new pg.Pool({ connectionString: env.db.url, max: 1 });
    mergePool.on('error', () => {});

    stageRound(stager, ids, 1); // round 1: merged, durable in workspace_agents
    await stager.flush();
    await mergeNow(mergePool);
    stageRound(stager, onlyStaged, 2); // round 2: copied to staging, not merged yet
    await stager.flush();
    const stagedAtCrash = await stagedCount(env.db.pool);
    assert.equal(stagedAtCrash, half);

    await env.cluster.stopServer('immediate'); // the crash
    stageRound(stager, inMemory, 3); // round 3: only in the client's memory while the server is down
    assert.equal(stager.stats().pendingAgents, half);
    const merged = await mergeNow(mergePool).then(() => null, (err: unknown) => err);
    assert.ok(merged instanceof ConnectionError, `merge during the outage fails with ConnectionError, got ${String(merged)}`);
    // a COPY during the outage fails (the rows stay pending for the background retry)
    const flushed = await stager.flush().then(() => null, (err: unknown) => err);
    assert.ok(flushed instanceof ConnectionError, `flush during the outage fails with ConnectionError, got ${String(flushed)}`);
    await env.cluster.start(); // crash recovery resets UNLOGGED tables

    await waitFor(() => stager.stats().pendingAgents === 0 && stager.stats().resets === 1, 'the background retry copying round 3 and resending round 2', 30_000);
    await mergeAll(mergePool);
    const counts = await updatedAtCounts(ids);
    assert.equal(counts.get(at(3).getTime()), half, 'nothing that was only in memory was lost');
    assert.equal(counts.get(at(2).getTime()), stagedAtCrash, 'the staged rows crash recovery emptied were resent and merged');
    assert.equal(counts.get(at(1).getTime()) ?? 0, 0, 'no agent was left at round 1');
    assert.ok(stager.stats().resentAgents >= half, `resent ${stager.stats().resentAgents} of ${half}`);
    assert.ok(log.calls.some((c) => c.level === 'warn' && /staging was reset .* resending/.test(c.message)), 'the reset is reported');
    assert.ok(stager.stats().failedCopies >= 1, 'the COPY during the outage is counted');
    // the background retry reports its recovery when it had reported failures (it may not have
    // run during the outage at all: then the flush() above was the only failed COPY)
    if (log.calls.some((c) => c.level === 'warn' && /retrying in/.test(c.message))) {
      assert.ok(log.calls.some((c) => c.level === 'info' && /recovered/.test(c.message)), 'recovery is reported');
    }
    await stager.close();
    await mergePool.end();
    assert.deepEqual(env.crashes, [], 'no unhandled rejection or exception');
  });

  test('crash with durableStaging: nothing staged is lost', async () => {
    await migrate({ connectionString: env.db.url }, { logger: silentLogger, durableStaging: true });
    assert.equal(await isStagingDurable(env.db.pool), true);
    const ids = await createAgents(env.db.pool, 1000);
    const stager = newStager();
    const mergePool = new pg.Pool({ connectionString: env.db.url, max: 1 });
    mergePool.on('error', () => {});
    stageRound(stager, ids, 1);
    await stager.flush();
    await mergeNow(mergePool);
    stageRound(stager, ids, 2);
    await stager.flush();
    assert.equal(await stagedCount(env.db.pool), ids.length);
    await env.cluster.restart('immediate');
    await waitFor(async () => (await stagedCount(env.db.pool)) === ids.length, 'the staged rows after recovery', 30_000, 100);
    await mergeAll(mergePool);
    assert.deepEqual([...(await updatedAtCounts(ids))], [[at(2).getTime(), ids.length]], 'every staged row survived the crash');
    await stager.close();
    await mergePool.end();
    // and back: false makes it UNLOGGED again
    await migrate({ connectionString: env.db.url }, { logger: silentLogger, durableStaging: false });
    assert.equal(await isStagingDurable(env.db.pool), false);
    assert.deepEqual(env.crashes, [], 'no unhandled rejection or exception');
  });

  test('crash (immediate) under a status-event watcher: committed events survive, the watcher reconnects, each event once', async () => {
    const ids = await createAgents(env.db.pool, 3);
    // connected agents (their first heartbeats are just now)
    await env.db.pool.query(
      'UPDATE public.workspace_agents SET first_connected_at = now(), last_connected_at = now(), updated_at = now() WHERE id = ANY($1::uuid[])',
      [ids],
    );
    const seen: StatusChange[] = [];
    const errors: unknown[] = [];
    const watcher = watchStatusChanges({ connectionString: env.db.url }, {
      since: 'now', timeoutMs: 2_000, pollIntervalMs: 500, retryInitialDelayMs: 50, retryMaxDelayMs: 500, logger: silentLogger,
      onChange: (e) => void seen.push(e), onError: (err) => void errors.push(err),
    });
    try {
      await watcher.ready;
      const disconnect = (id: string): Promise<unknown> =>
        env.db.pool.query('SELECT heartbeat.disconnect_agent($1, clock_timestamp(), clock_timestamp())', [id]);
      await disconnect(ids[0]!);
      await waitFor(() => seen.length === 1, 'the first event, before the crash', 10_000);

      await env.cluster.stopServer('immediate'); // the crash, with the watcher connected
      await env.cluster.start();
      await waitFor(async () => (await disconnect(ids[1]!).then(() => true, () => false)), 'a disconnect after recovery', 30_000, 100);
      await waitFor(() => seen.length >= 2, 'the event after recovery, through a new connection', 30_000);
      await disconnect(ids[2]!);
      await waitFor(() => seen.length >= 3, 'the next event', 10_000);

      assert.deepEqual(seen.map((e) => [e.agentId, e.from, e.to, e.reason]), ids.map((id) => [id, 'connected', 'disconnected', 'disconnect']),
        'each event once, in order');
      assert.ok(seen[1]!.id > seen[0]!.id && seen[2]!.id > seen[1]!.id, 'ids keep increasing across the crash');
      const { rows } = await env.db.pool.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM heartbeat.status_events WHERE agent_id = ANY($1::uuid[])', [ids],
      );
      assert.equal(rows[0]!.n, 3, 'the event committed before the crash is still there');
      assert.ok(watcher.stats().connections >= 2, `the watcher reconnected (${watcher.stats().connections} connections)`);
      assert.ok(errors.length >= 1, 'the lost connection was reported');
    } finally {
      await watcher.close();
    }
    assert.deepEqual(env.crashes, [], 'no unhandled rejection or exception');
  });
});

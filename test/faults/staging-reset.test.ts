/**
 * Zero loss when staging is reset. PostgreSQL empties every UNLOGGED table
 * after crash recovery (a kill -9 of ANY backend, even an idle one in another
 * database, triggers it) and a promoted standby starts with them empty. The
 * stager keeps what it COPYed until a merge has consumed it, notices the reset
 * (heartbeat.staging_epoch()) and resends: the newest heartbeat of every agent
 * lands.
 */
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import { migrate } from '../../src/migrate.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { killBackend, waitForRecovery } from '../support/backend.ts';
import { createAgents, createTestDb, stagedCount, withDatabase, type TestDb } from '../support/db.ts';
import { mergeUntilDrained } from '../support/drain.ts';
import { startFreezeProxy } from '../support/freeze-proxy.ts';
import { privateCluster } from '../support/private-cluster.ts';
import { standbyUnavailable, startPrimaryWithStandby } from '../support/standby.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

const env = privateCluster('fault_reset', { synchronous_commit: 'on' });
const T0 = Date.UTC(2026, 0, 1);
const at = (round: number): Date => new Date(T0 + round * 1000);

function stageRound(stager: HeartbeatStager, ids: string[], round: number): void {
  for (const agentId of ids) stager.stage({ agentId, firstConnectedAt: at(1), lastConnectedAt: at(round), updatedAt: at(round) });
}

async function roundsOf(pool: pg.Pool, ids: string[]): Promise<Map<number, number>> {
  const { rows } = await pool.query<{ t: Date; n: string }>(
    'SELECT updated_at AS t, count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) GROUP BY 1',
    [ids],
  );
  return new Map(rows.map((r) => [(r.t.getTime() - T0) / 1000, Number(r.n)]));
}

/** Merges until staging is empty, riding out connection failures. */
async function mergeAll(url: string): Promise<void> {
  await mergeUntilDrained({ connectionString: url }, { callTimeoutMs: 5000 });
}

describe('staging reset: nothing staged is lost', () => {
  test('kill -9 of an idle backend of another database: the idle stager notices the reset and resends', async () => {
    const other = await createTestDb('fault_reset_other', { admin: env.cluster.url(), migrated: false });
    const ids = await createAgents(env.db.pool, 2000);
    const log = recordingLogger();
    const stager = new HeartbeatStager(
      { connectionString: env.db.url, max: 2 },
      { flushIntervalMs: 50, resendCheckIntervalMs: 200, retryInitialDelayMs: 50, retryMaxDelayMs: 500, logger: log },
    );
    try {
      stageRound(stager, ids, 1);
      await stager.flush();
      await mergeAll(env.db.url); // round 1 is in workspace_agents
      stageRound(stager, ids, 2);
      await stager.flush(); // round 2 only in (UNLOGGED) staging
      assert.equal(await stagedCount(env.db.pool), ids.length);

      // an idle connection to another database: its backend dies the way a segfault would
      const victim = new pg.Client({ connectionString: other.url });
      victim.on('error', () => {});
      await victim.connect();
      const pid = (await victim.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      await killBackend(pid);
      await waitForRecovery(env.db.url);
      await victim.end().catch(() => {});
      // (crash recovery emptied staging; the stager may have resent already, so staging is not looked at here)

      // nothing is pending: the periodic epoch check finds the reset and resends round 2
      await waitFor(() => stager.stats().resets === 1 && stager.stats().pendingAgents === 0, 'the resend', 30_000);
      assert.equal(stager.stats().resentAgents, ids.length, 'everything kept since the last merge was resent');
      await mergeAll(env.db.url);
      assert.deepEqual([...(await roundsOf(env.db.pool, ids))], [[2, ids.length]], 'every agent holds round 2');
      assert.ok(log.calls.some((c) => c.level === 'warn' && /staging was reset/.test(c.message)));
    } finally {
      await stager.close();
      await other.drop();
    }
    assert.deepEqual(env.crashes, []);
  });

  test('what a merge has consumed is released, so a later reset resends only the rest', async () => {
    const ids = await createAgents(env.db.pool, 300);
    const stager = new HeartbeatStager({ connectionString: env.db.url }, { flushIntervalMs: 20, resendCheckIntervalMs: 50, logger: silentLogger });
    try {
      stageRound(stager, ids, 1);
      await stager.flush();
      assert.equal(stager.stats().retainedAgents, ids.length, 'kept until a merge consumes it');
      await mergeAll(env.db.url);
      await waitFor(() => stager.stats().retainedAgents === 0, 'released after the merges drained every part', 10_000);
    } finally {
      await stager.close();
    }
  });
});

describe('failover to a promoted standby behind the same address', { skip: standbyUnavailable() }, () => {
  const servers = startPrimaryWithStandby.bind(null);
  let cleanup: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c().catch(() => {});
    cleanup = [];
  });

  test('connections to the old primary go silent; the stager times out, reconnects to the new primary and resends', async () => {
    const pair = await servers({ settings: { max_connections: 40 } });
    cleanup.push(() => pair.destroy());
    const admin = new pg.Client({ connectionString: pair.primary.url() });
    await admin.connect();
    await admin.query('CREATE DATABASE failover');
    await admin.end();
    const primaryUrl = withDatabase(pair.primary.url(), 'failover');
    await migrate({ connectionString: primaryUrl }, { logger: silentLogger });
    const proxy = await startFreezeProxy(pair.primary.port);
    cleanup.push(() => proxy.close());
    const url = proxy.url(primaryUrl);
    const setup = new pg.Pool({ connectionString: primaryUrl });
    const ids = await createAgents(setup, 1000);
    await setup.end();

    const log = recordingLogger();
    const stager = new HeartbeatStager(
      { connectionString: url, max: 2 },
      { flushIntervalMs: 50, queryTimeoutMs: 2000, retryInitialDelayMs: 100, retryMaxDelayMs: 500, closeTimeoutMs: 5000, logger: log },
    );
    cleanup.push(() => stager.close());
    stageRound(stager, ids, 1);
    await stager.flush();
    await mergeAll(url); // round 1 merged on the primary ...
    await pair.waitForReplay(); // ... and replicated
    stageRound(stager, ids, 2);
    await stager.flush(); // round 2 only in the primary's UNLOGGED staging

    // the failover: the address moves to the standby, connections to the old primary hang (no FIN, no RST)
    proxy.freeze();
    proxy.retarget(pair.standby.port);
    await pair.primary.stopServer('immediate');
    await pair.promote();
    const t0 = Date.now();
    stageRound(stager, ids.slice(0, 500), 3); // round 3 for half of them, during the failover

    await waitFor(() => stager.stats().resets >= 1 && stager.stats().pendingAgents === 0, 'the stager on the new primary, resent', 60_000);
    const recoveredMs = Date.now() - t0;
    await mergeAll(url);
    const pool = new pg.Pool({ connectionString: withDatabase(pair.standby.url(), 'failover') });
    try {
      const rounds = await roundsOf(pool, ids);
      assert.deepEqual([...rounds].sort(), [[2, 500], [3, 500]], 'every agent holds its newest round on the new primary');
    } finally {
      await pool.end();
    }
    assert.ok(log.calls.some((c) => /did not finish within 2000 ms/.test(c.message)), 'the frozen COPY timed out');
    assert.ok(recoveredMs < 30_000, `recovered in ${recoveredMs} ms`);
    console.log(`failover: stager recovered and resent in ${recoveredMs} ms`);
    assert.deepEqual(env.crashes, []);
  });
});

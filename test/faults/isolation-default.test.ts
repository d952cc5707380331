/**
 * A database whose default isolation level is not READ COMMITTED
 * (ALTER DATABASE ... SET default_transaction_isolation = 'serializable' or
 * 'repeatable read'): the merge needs READ COMMITTED, and every way of running
 * it still merges: mergeNow(), startMerger() and `pg-heartbeat merge` (the CLI).
 * The stager's COPY and disconnect, and readStatus(), work too.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { startMerger } from '../../src/merger.ts';
import { readStatus } from '../../src/status.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const dbs: TestDb[] = [];
after(async () => {
  for (const d of dbs) await d.drop().catch(() => {});
});

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
  });
}

const at = (s: number): Date => new Date(Date.UTC(2026, 0, 1) + s * 1000);

for (const level of ['serializable', 'repeatable read']) {
  describe(`default_transaction_isolation = '${level}'`, () => {
    let db: TestDb;
    let ids: string[];
    before(async () => {
      db = await createTestDb(`fault_iso_${level.replace(' ', '_')}`);
      dbs.push(db);
      ids = await createAgents(db.pool, 300);
      await db.pool.query(`ALTER DATABASE ${pg.escapeIdentifier(db.name)} SET default_transaction_isolation = '${level}'`);
    });

    /** Stages round `round` for every agent through a stager (on a new connection, so with the database default). */
    async function stageRound(round: number): Promise<void> {
      const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
      try {
        for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(round), updatedAt: at(round) });
        await stager.flush();
      } finally {
        await stager.close();
      }
      assert.equal(await stagedCount(db.pool), ids.length);
    }

    async function holdsRound(round: number): Promise<boolean> {
      const { rows } = await db.pool.query<{ n: string }>(
        'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [ids, at(round)],
      );
      return Number(rows[0]!.n) === ids.length;
    }

    test('new sessions really default to it, and the bare merge refuses it', async () => {
      const c = new pg.Client({ connectionString: db.url });
      await c.connect();
      try {
        assert.equal((await c.query<{ l: string }>("SELECT current_setting('transaction_isolation') AS l")).rows[0]!.l, level);
        await assert.rejects(c.query('SELECT * FROM heartbeat.merge_agent_connections()'), (err: unknown) => (err as { code?: string }).code === '25001');
      } finally {
        await c.end();
      }
    });

    test('mergeNow({ connectionString }) and mergeNow(pool) merge', async () => {
      await stageRound(1);
      const r = await mergeNow({ connectionString: db.url });
      assert.equal(r.agentsUpdated, ids.length);
      assert.ok(await holdsRound(1));
      await stageRound(2);
      const pool = new pg.Pool({ connectionString: db.url, max: 1 });
      try {
        const r2 = await mergeNow(pool);
        assert.equal(r2.agentsUpdated, ids.length);
        await stageRound(3);
        assert.equal((await mergeNow(pool)).agentsUpdated, ids.length, 'again on the same pool');
      } finally {
        await pool.end();
      }
      assert.ok(await holdsRound(3));
    });

    test('startMerger() merges, without a failure', async () => {
      await stageRound(4);
      const log = recordingLogger();
      const merger = startMerger({ connectionString: db.url }, { intervalMs: 200, logger: log });
      try {
        await waitFor(() => holdsRound(4), 'the merger to merge', 15_000);
        assert.equal(merger.stats().failures, 0);
        assert.deepEqual(log.calls.filter((c) => c.level === 'error' || c.level === 'warn').map((c) => c.message), []);
      } finally {
        await merger.close();
      }
    });

    test('`pg-heartbeat merge` merges', async () => {
      await stageRound(5);
      const out = await cli(['merge', '--json', '--database-url', db.url]);
      assert.equal(out.code, 0, out.stderr);
      assert.equal(JSON.parse(out.stdout).agentsUpdated, ids.length);
      assert.ok(await holdsRound(5));
    });

    test('stager.disconnect() and readStatus() work', async () => {
      const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
      try {
        assert.equal(await stager.disconnect({ agentId: ids[0]!, disconnectedAt: at(6), updatedAt: at(6) }), true);
        assert.equal(await stager.disconnectReplica('00000000-0000-4000-8000-000000000001', { disconnectedAt: at(7) }), 0);
      } finally {
        await stager.close();
      }
      assert.equal((await agentRow(db.pool, ids[0]!)).disconnected_at?.getTime(), at(6).getTime());
      const status = await readStatus({ connectionString: db.url });
      assert.equal(status.stagedRows, 0);
      assert.ok(status.lastMerge !== null);
    });
  });
}

/**
 * The number of staging parts: chosen with migrate({ stagingParts }) / `pg-heartbeat migrate --staging-parts N`,
 * changed later while stagers COPY and mergers merge, losing nothing.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import { migrate } from '../src/migrate.ts';
import { mergeNow } from '../src/merge.ts';
import { silentLogger } from '../src/logger.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { InvalidOptionError } from '../src/errors.ts';
import { createAgents, createTestDb, type TestDb } from './support/db.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
let db: TestDb;
before(async () => {
  db = await createTestDb('staging_parts');
});
after(async () => {
  await db.drop();
});

const parts = async (): Promise<number> =>
  Number((await db.pool.query('SELECT count(*) AS n FROM heartbeat.staging_parts()')).rows[0].n);

function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: db.url };
  for (const v of ['PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE']) delete env[v];
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

test('changing the number of parts while stagers COPY loses no heartbeat', async () => {
  assert.equal(await parts(), 4, 'a new install has 4 parts');
  const ids = await createAgents(db.pool, 3000);
  const stagers = [0, 1].map(() => new HeartbeatStager({ connectionString: db.url }, { flushIntervalMs: 20, logger: silentLogger }));
  const newest = new Map<string, Date>();
  let running = true;
  // every agent heartbeats again and again through one of two stagers, with increasing times
  const traffic = (async () => {
    for (let round = 0; running; round++) {
      const at = new Date(Date.UTC(2026, 0, 1) + round * 1000);
      for (const [i, id] of ids.entries()) {
        stagers[i % 2]!.stage({ agentId: id, firstConnectedAt: at, lastConnectedAt: at, updatedAt: at });
        newest.set(id, at);
      }
      await new Promise((r) => setTimeout(r, 15));
    }
  })();
  try {
    for (const n of [8, 2, 1, 5]) {
      await new Promise((r) => setTimeout(r, 150));
      await migrate({ connectionString: db.url }, { stagingParts: n, logger: silentLogger });
      assert.equal(await parts(), n);
      await mergeNow(db.pool);
    }
  } finally {
    running = false;
    await traffic;
    for (const s of stagers) await s.close();
  }
  await mergeNow(db.pool);
  const { rows } = await db.pool.query<{ id: string; last: Date }>(
    'SELECT id, last_connected_at AS last FROM public.workspace_agents WHERE id = ANY ($1::uuid[])',
    [ids],
  );
  const behind = rows.filter((r) => r.last?.getTime() !== newest.get(r.id)!.getTime());
  assert.equal(rows.length, ids.length);
  assert.deepEqual(behind.slice(0, 3), [], `${behind.length} agent(s) lack their newest heartbeat`);
  const { rows: left } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.agent_connection_staging');
  assert.equal(left[0].n, 0);
});

test('pg-heartbeat migrate --staging-parts N, and out-of-range values refused', async () => {
  const set = await cli(['migrate', '--staging-parts', '6']);
  assert.equal(set.code, 0, set.stderr);
  assert.match(set.stdout, /^staging has 6 part\(s\)$/m);
  assert.equal(await parts(), 6);
  const again = await cli(['migrate', '--staging-parts', '6']);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /already up to date/);
  for (const bad of ['0', '65', 'x', '2.5']) {
    const r = await cli(['migrate', '--staging-parts', bad]);
    assert.notEqual(r.code, 0, bad);
    assert.match(r.stderr, /--staging-parts must be a whole number from 1 to 64/, bad);
  }
  assert.equal(await parts(), 6, 'a refused value changes nothing');
  await assert.rejects(migrate({ connectionString: db.url }, { stagingParts: 0 }), InvalidOptionError);
});

/**
 * docs/existing-table.md for real: a table with other names (fleet.runners) used
 * through an automatically updatable view public.workspace_agents. The page's
 * blocks run in order on a fresh, unmigrated database (psql, the CLI, the
 * TypeScript example); then the merge, disconnects, disconnect_replica,
 * agent_status(), the lock path and a view that is not updatable are checked.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { mergeNow } from '../src/index.ts';
import { createTestDb, type TestDb } from './support/db.ts';
import { codeBlocks } from './support/markdown.ts';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const PAGE = 'docs/existing-table.md';
const blocks = codeBlocks(PAGE).filter((b) => b.marker === '<!-- run by test/existing-table.test.ts -->');
const R1 = '11111111-1111-4111-8111-111111111111';
const R2 = '22222222-2222-4222-8222-222222222222';
const REPLICA = '7d1e5f2a-9c3b-4e8d-b6a1-0f2e3d4c5b6a';

let db: TestDb;
let dir: string;
before(async () => {
  db = await createTestDb('existing_table', { migrated: false });
  dir = mkdtempSync(join(ROOT, '.tmp-existing-'));
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await db.drop();
});

const env = (): NodeJS.ProcessEnv => ({ ...process.env, DATABASE_URL: db.url });

async function runBlock(i: number): Promise<{ stdout: string; stderr: string }> {
  const b = blocks[i]!;
  const file = join(dir, `block-${b.line}.${b.lang}`);
  if (b.lang === 'sql') {
    writeFileSync(file, b.code);
    return run('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-f', file, db.url], { env: env() });
  }
  if (b.lang === 'sh') {
    // `pg-heartbeat` is this checkout's CLI
    writeFileSync(file, b.code.replace(/^pg-heartbeat /gm, `${process.execPath} --import ${import.meta.resolve('tsx')} ${join(ROOT, 'src/cli/main.ts')} `));
    return run('bash', ['-euo', 'pipefail', file], { env: env() });
  }
  writeFileSync(file, b.code.replaceAll("from 'pg-heartbeat'", `from '${join(ROOT, 'src/index.ts')}'`));
  return run(process.execPath, ['--import', import.meta.resolve('tsx'), file], { env: env(), timeout: 60_000 });
}

describe(`${PAGE}: fleet.runners through a view named workspace_agents`, () => {
  test('the page has the blocks this test runs: your table, the view, migrate, the TypeScript example', () => {
    assert.deepEqual(blocks.map((b) => b.lang), ['sql', 'sql', 'sh', 'ts']);
  });

  test('the table and the view; every written column is updatable through it', async () => {
    await runBlock(0);
    const { stdout } = await runBlock(1);
    for (const column of ['updated_at', 'first_connected_at', 'last_connected_at', 'disconnected_at', 'last_connected_replica_id']) {
      assert.match(stdout, new RegExp(`${column} +\\| YES`), `${column} is updatable:\n${stdout}`);
    }
    const { rows } = await db.pool.query("SELECT relkind FROM pg_class WHERE oid = 'public.workspace_agents'::regclass");
    assert.equal(rows[0].relkind, 'v');
  });

  test('pg-heartbeat migrate keeps the view (no table of its own) and checks its columns', async () => {
    const { stdout } = await runBlock(2);
    assert.match(stdout, /^applied \d+ migration\(s\)/);
    const { rows } = await db.pool.query("SELECT relkind FROM pg_class WHERE oid = 'public.workspace_agents'::regclass");
    assert.equal(rows[0].relkind, 'v', 'still the view');
  });

  test('the example: stage → COPY → merge → disconnect → agent_status(), all in fleet.runners', async () => {
    const { stdout, stderr } = await runBlock(3);
    assert.doesNotMatch(stderr, /Error/, stderr);
    assert.match(stdout, /agentsUpdated: 2/);
    assert.match(stdout, new RegExp(`${R1} connected`));
    assert.match(stdout, new RegExp(`${R2} disconnected`));
    const { rows } = await db.pool.query('SELECT runner_id, name, first_seen, last_seen, gone_at, heartbeat_version FROM fleet.runners ORDER BY name');
    assert.equal(rows.length, 2, 'no rows added or lost');
    assert.ok(rows[0].first_seen && rows[0].last_seen && rows[0].gone_at === null, 'runner-1 connected');
    assert.ok(rows[1].gone_at && rows[1].last_seen, 'runner-2 disconnected, its last heartbeat kept');
    assert.equal(rows[0].name, 'runner-1', 'other columns untouched');
  });

  test('the guard: an older heartbeat never overwrites a newer one; unknown runners are skipped', async () => {
    const old = new Date(Date.now() - 3_600_000);
    await db.pool.query(
      `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
       VALUES ($1, $2, $2), ('33333333-3333-4333-8333-333333333333', now(), now())`,
      [R2, old],
    );
    const result = await mergeNow(db.pool);
    assert.equal(result.skippedStale, 1);
    assert.equal(result.skippedUnknown, 1);
    const { rows } = await db.pool.query('SELECT gone_at IS NOT NULL AS gone FROM fleet.runners WHERE runner_id = $1', [R2]);
    assert.equal(rows[0].gone, true);
  });

  test('a row lock held by the application on fleet.runners: deferred, then merged (FOR NO KEY UPDATE ... SKIP LOCKED through the view)', async () => {
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM fleet.runners WHERE runner_id = $1 FOR UPDATE', [R1]);
      const now = new Date();
      await db.pool.query(
        `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, last_connected_replica_id, updated_at)
         VALUES ($1, $3, $4, $3), ($2, $3, $4, $3)`,
        [R1, R2, now, REPLICA],
      );
      const t0 = Date.now();
      const locked = await mergeNow(db.pool);
      assert.ok(Date.now() - t0 >= 1500, 'waited for lock_timeout first');
      assert.equal(locked.agentsUpdated, 1);
      assert.equal(locked.deferredLocked, 1);
      await holder.query('COMMIT');
      const after = await mergeNow(db.pool);
      assert.equal(after.agentsUpdated, 1, 'the deferred runner lands once the lock is gone');
    } finally {
      await holder.end();
    }
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM fleet.runners WHERE last_seen_by = $1', [REPLICA]);
    assert.equal(rows[0].n, 2);
  });

  test('disconnect_replica and agent_status() through the view', async () => {
    const { rows } = await db.pool.query('SELECT heartbeat.disconnect_replica($1, now(), now()) AS n', [REPLICA]);
    assert.equal(Number(rows[0].n), 2);
    const status = await db.pool.query("SELECT status, count(*)::int AS n FROM heartbeat.agent_status() GROUP BY status");
    assert.deepEqual(status.rows, [{ status: 'disconnected', n: 2 }]);
  });

  test('a view that is not updatable: the merge fails loudly and loses nothing', async () => {
    await db.pool.query(`
      CREATE OR REPLACE VIEW public.workspace_agents AS
      SELECT r.runner_id AS id, r.registered_at AS created_at, r.heartbeat_version AS updated_at,
             r.first_seen AS first_connected_at, r.last_seen AS last_connected_at, r.gone_at AS disconnected_at,
             r.last_seen_by AS last_connected_replica_id, 0 AS connection_timeout_seconds
        FROM fleet.runners r JOIN fleet.runners twin USING (runner_id)`);
    await db.pool.query('INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now())', [R1]);
    await assert.rejects(mergeNow(db.pool), (err: Error) => {
      assert.match(err.message, /cannot update view "workspace_agents"/);
      return true;
    });
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.agent_connection_staging');
    assert.equal(rows[0].n, 1, 'the staged row waits for a merge that can apply it');
  });
});

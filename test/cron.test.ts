import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { migrate } from '../src/migrate.ts';
import { scheduleMerge, unscheduleMerge } from '../src/schedule.ts';
import { readStatus } from '../src/status.ts';
import { startCluster, findBinDir, type Cluster } from './support/cluster.ts';
import { agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';

async function waitFor(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function mergesTotal(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>('SELECT merges_total AS n FROM heartbeat.merge_state');
  return Number(rows[0]!.n);
}

describe('without pg_cron', () => {
  let db: TestDb;
  before(async () => {
    db = await createTestDb('nocron');
  });
  after(async () => {
    await db.drop();
  });

  test('scheduling fails with a message naming the postgresql.conf lines pg_cron needs', async () => {
    await assert.rejects(scheduleMerge({ pool: db.pool }, { logger: silentLogger }), (err: Error) => {
      assert.match(err.message, /shared_preload_libraries = 'pg_cron'/);
      assert.match(err.message, new RegExp(`cron\\.database_name = '${db.name}'`));
      assert.match(err.message, /cron\.use_background_workers = on/);
      return true;
    });
    await assert.rejects(db.pool.query('SELECT * FROM heartbeat.schedule_merge()'), { code: '55000' });
    assert.equal(await unscheduleMerge({ pool: db.pool }, { logger: silentLogger }), false, 'nothing to unschedule');
  });

  test('every must be whole seconds from 1 to 59', async () => {
    for (const every of ['0 seconds', '1.5 seconds', '1 minute', '-5 seconds']) {
      await assert.rejects(db.pool.query('SELECT * FROM heartbeat.merge_job($1)', [every]), { code: '22023' }, every);
    }
  });

  test('heartbeat.merge_loop merges every interval, committing between merges, even when the default isolation is not READ COMMITTED', async () => {
    const [id] = await createAgents(db.pool, 1);
    await db.pool.query(
      "INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now() - interval '1 second', now() - interval '1 second')",
      [id],
    );
    const before = await mergesTotal(db.pool);
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      await client.query("SET default_transaction_isolation = 'serializable'");
      await client.query("CALL heartbeat.merge_loop(every => '1 second', run_for => '2 seconds')");
    } finally {
      await client.end();
    }
    assert.equal(await mergesTotal(db.pool) - before, 3, 'merges at 0, 1 and 2 s');
    assert.notEqual((await agentRow(db.pool, id!)).last_connected_at, null);
    assert.equal(await stagedCount(db.pool), 0);
  });
});

// pg_cron must be installed for the server binaries in use (Debian: postgresql-15-cron).
const binDir = findBinDir();
const cronLibrary = join(dirname(binDir), 'lib', 'pg_cron.so');
const ci = process.env.CI === 'true';
const skip = !existsSync(cronLibrary) && !ci
  ? `pg_cron is not installed (${cronLibrary} is missing; apt-get install postgresql-15-cron); with CI=true this fails instead`
  : false;
if (skip) console.log(`skipping the pg_cron tests: ${skip}`);

describe('with pg_cron', { skip }, () => {
  let cluster: Cluster;
  let admin: pg.Pool;
  let db: TestDb;
  before(async () => {
    cluster = await startCluster({
      settings: {
        shared_preload_libraries: 'pg_cron',
        'cron.database_name': 'postgres',
        'cron.use_background_workers': 'on',
        max_worker_processes: 20,
        max_connections: 30,
        shared_buffers: '32MB',
      },
    });
    admin = new pg.Pool({ connectionString: cluster.url(), max: 2 });
    admin.on('error', () => {});
    await admin.query('CREATE EXTENSION pg_cron');
    db = await createTestDb('cron', { admin: cluster.url() });
  });
  after(async () => {
    await unscheduleMerge({ pool: db.pool }, { logger: silentLogger }).catch(() => {});
    await db?.drop();
    await admin?.end();
    await cluster?.destroy();
  });

  const jobs = async (name: string): Promise<{ jobid: string; schedule: string; command: string; database: string }[]> =>
    (await admin.query('SELECT jobid, schedule, command, database FROM cron.job WHERE jobname = $1', [name])).rows;

  test('scheduling from the application database (pg_cron lives in postgres) makes one job, however often', async () => {
    const first = await scheduleMerge({ connectionString: db.url }, { logger: silentLogger });
    assert.equal(first.jobName, `pg-heartbeat-merge-${db.name}`);
    assert.equal(first.cronDatabase, 'postgres');
    assert.equal(first.database, db.name);
    const other = await scheduleMerge({ pool: db.pool }, { every: '10 seconds', logger: silentLogger });
    assert.equal(other.jobId, first.jobId, 'the same job, updated');
    let rows = await jobs(first.jobName);
    assert.equal(rows.length, 1);
    assert.match(rows[0]!.command, /merge_loop\(every => '00:00:10'/);
    const again = await scheduleMerge({ pool: db.pool }, { logger: silentLogger });
    rows = await jobs(first.jobName);
    assert.equal(rows.length, 1);
    assert.equal(again.jobId, first.jobId);
    assert.equal(rows[0]!.database, db.name, 'runs in the application database');
    if (again.secondsSchedule) assert.equal(rows[0]!.schedule, '5 seconds');
    else {
      assert.equal(rows[0]!.schedule, '* * * * *', `pg_cron ${again.pgCronVersion}: once a minute`);
      assert.match(rows[0]!.command, /^CALL heartbeat\.merge_loop\(every => '00:00:05', run_for => '00:00:55'\)$/);
    }
    const status = await readStatus({ pool: db.pool }, { logger: silentLogger });
    assert.deepEqual(status.cron, { database: 'postgres', jobName: first.jobName, schedule: rows[0]!.schedule, scheduled: true });
    // the SQL function in this database cannot reach pg_cron's: it says how
    await assert.rejects(db.pool.query('SELECT * FROM heartbeat.schedule_merge()'), (err: Error & { code?: string }) => {
      assert.equal(err.code, '55000');
      assert.match(err.message, /pg_cron lives in database postgres .*cron\.schedule_in_database/);
      return true;
    });
  });

  test('staged heartbeats reach workspace_agents through pg_cron alone, merged every interval', async () => {
    const ids = await createAgents(db.pool, 50);
    await db.pool.query(
      `INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
       SELECT id, now(), now(), now() FROM unnest($1::uuid[]) AS id`,
      [ids],
    );
    const started = Date.now();
    // pg_cron 1.4 starts the job at the next full minute: up to ~60 s, plus its start-up
    await waitFor('pg_cron to merge the staged rows', async () => (await agentRow(db.pool, ids[49]!)).last_connected_at !== null, 100_000);
    const firstMergeAfterMs = Date.now() - started;
    const merges = await mergesTotal(db.pool);
    await waitFor('the next merge of the loop', async () => (await mergesTotal(db.pool)) > merges, 30_000);
    console.log(`pg_cron: first merge ${Math.round(firstMergeAfterMs / 1000)} s after staging; merges continue in the loop`);
    for (const id of ids) assert.notEqual((await agentRow(db.pool, id)).last_connected_at, null);
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('unschedule removes the job; again is a no-op', async () => {
    assert.equal(await unscheduleMerge({ connectionString: db.url }, { logger: silentLogger }), true);
    assert.deepEqual(await jobs(`pg-heartbeat-merge-${db.name}`), []);
    assert.equal(await unscheduleMerge({ pool: db.pool }, { logger: silentLogger }), false);
    const status = await readStatus({ pool: db.pool }, { logger: silentLogger });
    assert.equal(status.cron.scheduled, false);
  });

  test('in the database pg_cron lives in, heartbeat.schedule_merge() schedules directly', async () => {
    await migrate({ pool: admin }, { logger: silentLogger });
    const a = await admin.query('SELECT * FROM heartbeat.schedule_merge()');
    const b = await admin.query("SELECT * FROM heartbeat.schedule_merge('5 seconds')");
    assert.equal(a.rows[0].job_id, b.rows[0].job_id);
    assert.equal(a.rows[0].job_name, 'pg-heartbeat-merge');
    const viaTs = await scheduleMerge({ pool: admin }, { logger: silentLogger });
    assert.equal(String(viaTs.jobId), a.rows[0].job_id);
    assert.equal((await jobs('pg-heartbeat-merge')).length, 1);
    let status = await admin.query('SELECT cron_job, cron_scheduled FROM heartbeat.status');
    assert.deepEqual(status.rows[0], { cron_job: 'pg-heartbeat-merge', cron_scheduled: true });
    assert.deepEqual((await admin.query('SELECT heartbeat.unschedule_merge() AS r')).rows[0], { r: true });
    assert.deepEqual((await admin.query('SELECT heartbeat.unschedule_merge() AS r')).rows[0], { r: false });
    status = await admin.query('SELECT cron_job, cron_scheduled FROM heartbeat.status');
    assert.deepEqual(status.rows[0], { cron_job: null, cron_scheduled: false });
  });
});

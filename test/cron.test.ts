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

/** Merges of every part (each call of merge_agent_connections() merges each part once). */
async function mergesTotal(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>('SELECT COALESCE(min(merges_total), 0) AS n FROM heartbeat.merge_state');
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

  test('heartbeat.merge_loop merges on the grid of its interval, committing between merges, even when the default isolation is not READ COMMITTED', async () => {
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
      const t0 = Date.now();
      await client.query("CALL heartbeat.merge_loop(every => '1 second', run_for => '3 seconds')");
      const took = Date.now() - t0;
      assert.ok(took >= 1500 && took < 4500, `ran for ${took} ms`);
      const merges = await mergesTotal(db.pool) - before;
      // at once (no merge yet), then on each whole second before start + 3 s: 3 or 4 merges
      assert.ok(merges >= 3 && merges <= 4, `merges: ${merges}`);
      assert.notEqual((await agentRow(db.pool, id!)).last_connected_at, null);
      assert.equal(await stagedCount(db.pool), 0);
      // run_for => 0: one draining merge, what a pg_cron >= 1.5 seconds job calls
      const once = await mergesTotal(db.pool);
      await client.query("CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0')");
      assert.equal(await mergesTotal(db.pool) - once, 1);
    } finally {
      await client.end();
    }
  });

  test('heartbeat.merge_loop drains a backlog in bounded statements, committing between them', async () => {
    const ids = await createAgents(db.pool, 3000);
    await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 400');
    try {
      await db.pool.query(
        "INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) SELECT unnest($1::uuid[]), now(), now()",
        [ids],
      );
      const before = await mergesTotal(db.pool);
      await db.pool.query("CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0')");
      assert.equal(await stagedCount(db.pool), 0, 'one run drained the backlog');
      assert.ok(await mergesTotal(db.pool) - before >= 3000 / 400, 'in statements of at most 400 rows');
    } finally {
      await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = DEFAULT');
    }
  });
});

describe('merge lanes (sql/019): heartbeat.merge_loop(lane => k, lanes => n)', () => {
  let db: TestDb;
  let ids: string[];
  before(async () => {
    db = await createTestDb('lanes');
    ids = await createAgents(db.pool, 4000);
  });
  after(async () => {
    await db.drop();
  });

  /** Staged rows and merged_by of each part. */
  const parts = async (): Promise<Map<number, { staged: number; mergedBy: string | null; merges: number }>> => {
    const { rows } = await db.pool.query<{ part: number; staged: string; merged_by: string | null; merges: string | null }>(
      `SELECT p.part, p.staged_rows AS staged, ms.merged_by, ms.merges_total AS merges
         FROM heartbeat.part_status() p LEFT JOIN heartbeat.merge_state ms USING (part) ORDER BY p.part`);
    return new Map(rows.map((r) => [r.part, { staged: Number(r.staged), mergedBy: r.merged_by, merges: Number(r.merges ?? 0) }]));
  };
  const stageAll = async (at: string): Promise<void> => {
    await db.pool.query(
      `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
       SELECT unnest($1::uuid[]), $2::timestamptz, $2::timestamptz`,
      [ids, at],
    );
  };
  const call = async (sql: string): Promise<void> => {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      await client.query(sql);
    } finally {
      await client.end();
    }
  };

  test('lane 1 of 2 drains its parts (1 and 3) when their last merge left rows, and pays nothing once they are drained', async () => {
    await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 400');
    try {
      await stageAll(new Date(Date.now() - 60_000).toISOString());
      // one bounded merge of every part (100 rows each): every part left rows behind
      const { rows } = await db.pool.query('SELECT more FROM heartbeat.merge_agent_connections()');
      assert.equal(rows[0].more, true);
      await call("CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0', lane => 1, lanes => 2)");
      let p = await parts();
      assert.equal(p.size, 4, 'four parts (the default)');
      for (const k of [1, 3]) {
        assert.equal(p.get(k)!.staged, 0, `part ${k} drained by lane 1`);
        assert.equal(p.get(k)!.mergedBy, 'pg_cron lane 1 of 2');
      }
      for (const k of [0, 2]) assert.ok(p.get(k)!.staged > 0, `part ${k} is lane 0's: left alone`);
      // drained, merged quickly: the next instant of lane 1 merges nothing (a small fleet pays one call per interval)
      const before = [p.get(1)!.merges, p.get(3)!.merges];
      await call("CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0', lane => 1, lanes => 2)");
      p = await parts();
      assert.deepEqual([p.get(1)!.merges, p.get(3)!.merges], before, 'no merge call for parts that need none');
      // lane 0 merges every part in one call and drains the rest
      await call("CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0', lane => 0, lanes => 2)");
      p = await parts();
      for (const k of [0, 1, 2, 3]) assert.equal(p.get(k)!.staged, 0, `part ${k}`);
      assert.equal(p.get(0)!.mergedBy, 'pg_cron lane 0 of 2');
    } finally {
      await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = DEFAULT');
    }
  });

  test('two lanes running at once share a backlog without waiting for each other; every agent gets its newest row', async () => {
    await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 200');
    try {
      const at = new Date(Date.now() - 30_000).toISOString();
      await stageAll(new Date(Date.now() - 40_000).toISOString());
      await stageAll(at);
      await db.pool.query('SELECT * FROM heartbeat.merge_agent_connections()');
      const t0 = Date.now();
      await Promise.all([0, 1].map((lane) =>
        call(`CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0', lane => ${lane}, lanes => 2)`)));
      const took = Date.now() - t0;
      const p = await parts();
      for (const k of [0, 1, 2, 3]) assert.equal(p.get(k)!.staged, 0, `part ${k} drained (in ${took} ms)`);
      const { rows } = await db.pool.query<{ n: string }>(
        'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY ($1::uuid[]) AND last_connected_at = $2::timestamptz', [ids, at]);
      assert.equal(Number(rows[0]!.n), ids.length);
    } finally {
      await db.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = DEFAULT');
    }
  });

  test('a lane covers its parts when nobody merged them for two intervals (lane 0 not running)', async () => {
    await stageAll(new Date(Date.now() - 20_000).toISOString());
    await db.pool.query('SELECT * FROM heartbeat.merge_agent_connections()');  // drained, by "lane 0"
    await stageAll(new Date(Date.now() - 10_000).toISOString());
    // within two intervals of that merge: nothing to do for lane 1
    await call("CALL heartbeat.merge_loop(every => '1 second', run_for => '0', lane => 1, lanes => 2)");
    let p = await parts();
    assert.ok(p.get(1)!.staged > 0 && p.get(3)!.staged > 0, 'parts 1 and 3 still staged right after a merge');
    await new Promise((r) => setTimeout(r, 2200));
    await call("CALL heartbeat.merge_loop(every => '1 second', run_for => '0', lane => 1, lanes => 2)");
    p = await parts();
    assert.equal(p.get(1)!.staged, 0);
    assert.equal(p.get(3)!.staged, 0);
    assert.ok(p.get(0)!.staged > 0 && p.get(2)!.staged > 0, 'lane 1 never touches lane 0\'s parts');
    await db.pool.query('SELECT * FROM heartbeat.merge_agent_connections()');
  });

  test('lane and lanes are checked', async () => {
    for (const [lane, lanes] of [[2, 2], [-1, 2], [0, 0], [0, 65]] as const) {
      await assert.rejects(db.pool.query(`CALL heartbeat.merge_loop(every => '5 seconds', run_for => '0', lane => ${lane}, lanes => ${lanes})`),
        { code: '22023' }, `lane ${lane} of ${lanes}`);
    }
    await assert.rejects(db.pool.query("SELECT * FROM heartbeat.merge_job('5 seconds', 0)"), { code: '22023' });
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
      assert.match(rows[0]!.command, /^CALL heartbeat\.merge_loop\(every => '00:00:05'\)$/);
    }
    const status = await readStatus({ pool: db.pool }, { logger: silentLogger });
    assert.deepEqual(status.cron, { database: 'postgres', jobName: first.jobName, schedule: rows[0]!.schedule, scheduled: true });
    // the SQL function in this database cannot reach pg_cron's: it says how
    await assert.rejects(db.pool.query('SELECT * FROM heartbeat.schedule_merge()'), (err: Error & { code?: string }) => {
      assert.equal(err.code, '55000');
      assert.match(err.message, /pg_cron lives in database postgres .*cron\.schedule_in_database/);
      return true;
    });
    // lanes: one job per lane, lane 0 keeps the job; fewer lanes later removes the extra ones
    const three = await scheduleMerge({ pool: db.pool }, { lanes: 3, logger: silentLogger });
    assert.equal(three.jobId, first.jobId, 'lane 0 is the same job');
    assert.deepEqual(three.lanes.map((l) => l.jobName), [first.jobName, `${first.jobName}-lane-1`, `${first.jobName}-lane-2`]);
    for (const l of three.lanes) {
      const [job] = await jobs(l.jobName);
      assert.equal(job!.database, db.name);
      assert.equal(String(l.jobId), String(job!.jobid));
      assert.match(job!.command, new RegExp(`lane => ${l.lane}, lanes => 3\\)$`));
    }
    const two = await scheduleMerge({ pool: db.pool }, { lanes: 2, logger: silentLogger });
    assert.equal(two.lanes.length, 2);
    assert.deepEqual(await jobs(`${first.jobName}-lane-2`), [], 'the third lane is unscheduled');
    assert.equal((await jobs(`${first.jobName}-lane-1`)).length, 1);
    await assert.rejects(scheduleMerge({ pool: db.pool }, { lanes: 0, logger: silentLogger }), /lanes must be from 1 to 64/);
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
    // both lanes (scheduled by the test above) run: lane 1's loop started and has not failed
    const runs = await admin.query<{ status: string; return_message: string | null }>(
      `SELECT d.status, d.return_message FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = $1`,
      [`pg-heartbeat-merge-${db.name}-lane-1`]);
    assert.ok(runs.rows.length > 0, 'lane 1 ran');
    for (const r of runs.rows) assert.ok(r.status === 'running' || r.status === 'succeeded' || r.status === 'starting', JSON.stringify(r));
  });

  test('unschedule removes the job; again is a no-op', async () => {
    assert.equal(await unscheduleMerge({ connectionString: db.url }, { logger: silentLogger }), true);
    assert.deepEqual(await jobs(`pg-heartbeat-merge-${db.name}`), []);
    assert.deepEqual(await jobs(`pg-heartbeat-merge-${db.name}-lane-1`), [], 'every lane');
    assert.equal(await unscheduleMerge({ pool: db.pool }, { logger: silentLogger }), false);
    const status = await readStatus({ pool: db.pool }, { logger: silentLogger });
    assert.equal(status.cron.scheduled, false);
  });

  test('the once-a-minute loop keeps every gap within the interval + 1 s across minute boundaries (7, 11, 13, 29 s); unschedule stops it', async () => {
    const intervals = [7, 11, 13, 29];
    // pg_cron 1.4 misses job changes when its launcher's invalidation queue overflows (a burst of DDL, such as
    // creating and migrating databases, while it sleeps; pg_cron PR #406): let it catch up before scheduling
    await new Promise((r) => setTimeout(r, 3000));
    const dbs: TestDb[] = [];
    for (const s of intervals) dbs.push(await createTestDb(`cron_gap_${s}`, { admin: cluster.url() }));
    await new Promise((r) => setTimeout(r, 3000));
    try {
      const jobs = await Promise.all(dbs.map((d, i) => scheduleMerge({ pool: d.pool }, { every: `${intervals[i]} seconds`, logger: silentLogger })));
      if (jobs[0]!.secondsSchedule) {
        // pg_cron >= 1.5 runs a seconds schedule itself: no loop to measure here
        console.log(`pg_cron ${jobs[0]!.pgCronVersion} has seconds schedules; the 1.4 loop is not used`);
        return;
      }
      // every merge of a database updates merge_state: collect the distinct merge start times
      const seen = dbs.map(() => new Set<number>());
      const lastMergeAt = async (d: TestDb): Promise<number | null> => {
        const { rows } = await d.pool.query<{ t: string | null }>(
          'SELECT (extract(epoch FROM max(last_merge_at)) * 1000)::int8::text AS t FROM heartbeat.merge_state');
        return rows[0]!.t === null ? null : Number(rows[0]!.t);
      };
      const minute = (ms: number): number => Math.floor(ms / 60_000);
      const crossed = (times: number[]): boolean => times.length > 1 && minute(times[times.length - 1]!) > minute(times[0]!);
      const deadline = Date.now() + 200_000;
      for (;;) {
        for (const [i, d] of dbs.entries()) {
          const t = await lastMergeAt(d);
          if (t !== null) seen[i]!.add(t);
        }
        const times = seen.map((s) => [...s].sort((a, b) => a - b));
        // each database: merges on both sides of a minute boundary, and one more interval after it
        if (times.every((ts, i) => crossed(ts) && ts[ts.length - 1]! - ts.find((x) => minute(x) > minute(ts[0]!))! >= intervals[i]! * 1000)) break;
        if (Date.now() > deadline) {
          const runs = await admin.query(
            `SELECT j.jobname, d.status, d.return_message, d.start_time FROM cron.job_run_details d JOIN cron.job j USING (jobid)
              ORDER BY d.runid DESC LIMIT 8`);
          const log = cluster.log().split('\n').filter((l) => /cron|ERROR|FATAL|WARNING/.test(l)).slice(-20).join('\n');
          throw new Error(`not enough merges seen: ${times.map((t) => t.length).join(', ')}; runs: ${JSON.stringify(runs.rows)}\n${log}`);
        }
        await new Promise((r) => setTimeout(r, 150));
      }
      for (const [i, s] of seen.entries()) {
        const ts = [...s].sort((a, b) => a - b);
        const gaps = ts.slice(1).map((t, k) => t - ts[k]!);
        const worst = Math.max(...gaps);
        console.log(`pg_cron 1.4 loop every ${intervals[i]} s: ${gaps.length} gaps, worst ${(worst / 1000).toFixed(2)} s`);
        assert.ok(worst <= intervals[i]! * 1000 + 1000, `every ${intervals[i]} s: worst gap ${worst} ms (gaps ${gaps.join(', ')})`);
      }
      // unschedule stops the loop that is running: no merge starts more than a moment after it
      const before = await lastMergeAt(dbs[0]!);
      assert.equal(await unscheduleMerge({ pool: dbs[0]!.pool }, { logger: silentLogger }), true);
      const stoppedAt = Date.now();
      await new Promise((r) => setTimeout(r, intervals[0]! * 1000 + 1500));
      const after = await lastMergeAt(dbs[0]!);
      assert.ok(after === before || after! < stoppedAt + 500, `a merge started ${after! - stoppedAt} ms after unschedule`);
    } finally {
      for (const d of dbs) {
        await unscheduleMerge({ pool: d.pool }, { logger: silentLogger }).catch(() => {});
        await d.drop();
      }
    }
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
    const laned = await admin.query("SELECT job_name, lane, command FROM heartbeat.schedule_merge('5 seconds', lanes => 2) ORDER BY lane");
    assert.deepEqual(laned.rows.map((r) => r.job_name), ['pg-heartbeat-merge', 'pg-heartbeat-merge-lane-1']);
    assert.equal((await jobs('pg-heartbeat-merge-lane-1')).length, 1);
    await admin.query("SELECT * FROM heartbeat.schedule_merge('5 seconds')");
    assert.deepEqual(await jobs('pg-heartbeat-merge-lane-1'), [], 'one lane again: the second lane is unscheduled');
    await admin.query("SELECT * FROM heartbeat.schedule_merge('5 seconds', lanes => 2)");
    let status = await admin.query('SELECT cron_job, cron_scheduled FROM heartbeat.status');
    assert.deepEqual(status.rows[0], { cron_job: 'pg-heartbeat-merge', cron_scheduled: true });
    assert.deepEqual((await admin.query('SELECT heartbeat.unschedule_merge() AS r')).rows[0], { r: true });
    assert.deepEqual(await jobs('pg-heartbeat-merge-lane-1'), [], 'lane 1 unscheduled too');
    assert.deepEqual((await admin.query('SELECT heartbeat.unschedule_merge() AS r')).rows[0], { r: false });
    status = await admin.query('SELECT cron_job, cron_scheduled FROM heartbeat.status');
    assert.deepEqual(status.rows[0], { cron_job: null, cron_scheduled: false });
  });
});

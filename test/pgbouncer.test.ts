/**
 * pg-heartbeat behind pgbouncer in transaction pooling mode: staging by COPY,
 * merging and disconnecting work through it (each is one transaction, with no
 * session state), and migrate() refuses it with a TransactionPoolerError
 * (node-pg-migrate needs a session for its advisory lock).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { type MergeReport, startMerger } from '../src/merger.ts';
import { migrate } from '../src/migrate.ts';
import { assertSessionConnection, TransactionPoolerError } from '../src/pooler.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { type StatusChange, watchStatusChanges } from '../src/status-events.ts';
import { adminUrl, agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';
import { type Pgbouncer, pgbouncerAvailable, PGBOUNCER_BIN, startPgbouncer } from './support/pgbouncer.ts';
import { waitFor } from './support/wait.ts';

const missing = pgbouncerAvailable() ? false : `pgbouncer is not installed (${PGBOUNCER_BIN}; Debian package pgbouncer)`;
if (missing && process.env.CI === 'true') throw new Error(`CI: ${missing}`);
if (missing) console.log(`# skipping pgbouncer tests: ${missing}`);

let db: TestDb;
let fresh: TestDb[] = [];
let bouncer: Pgbouncer;
const pools: pg.Pool[] = [];

function poolFor(url: string, max: number): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max });
  pool.on('error', () => {});
  pools.push(pool);
  return pool;
}

before(async () => {
  if (missing) return;
  db = await createTestDb('pgbouncer');
  fresh = await Promise.all(['tx', 'stmt', 'session', 'one'].map((l) => createTestDb(`pgbouncer_fresh_${l}`, { migrated: false })));
  bouncer = await startPgbouncer({
    serverPort: Number(new URL(adminUrl()).port),
    databases: {
      tx: { dbname: db.name, poolMode: 'transaction', poolSize: 2 },
      one: { dbname: db.name, poolMode: 'transaction', poolSize: 1 },
      fresh_tx: { dbname: fresh[0]!.name, poolMode: 'transaction' },
      fresh_stmt: { dbname: fresh[1]!.name, poolMode: 'statement' },
      fresh_session: { dbname: fresh[2]!.name, poolMode: 'session' },
      fresh_one: { dbname: fresh[3]!.name, poolMode: 'transaction', poolSize: 1 },
    },
  });
});
after(async () => {
  await Promise.all(pools.map((p) => p.end().catch(() => {})));
  await bouncer?.stop();
  await db?.drop();
  await Promise.all(fresh.map((f) => f.drop()));
});

describe('through pgbouncer (pool_mode = transaction)', { skip: missing }, () => {
  test('two stagers COPY, merges run and disconnects land, with 8 clients sharing 2 server connections', async () => {
    const ids = await createAgents(db.pool, 400);
    const replicas = [randomUUID(), randomUUID()];
    const base = Date.now() - 60_000;
    const at = (s: number): Date => new Date(base + s * 1000);
    const stagers = replicas.map(
      () => new HeartbeatStager({ connectionString: bouncer.url('tx'), max: 3 }, { flushIntervalMs: 20, logger: silentLogger }),
    );
    const merger = poolFor(bouncer.url('tx'), 2);
    let merges = 0;
    let merging = true;
    const mergeLoop = (async () => {
      while (merging) {
        await mergeNow(merger);
        merges++;
        await new Promise((r) => setTimeout(r, 15));
      }
    })();
    for (let round = 1; round <= 5; round++) {
      ids.forEach((agentId, i) => {
        const replica = replicas[i % 2]!;
        stagers[i % 2]!.stage({ agentId, firstConnectedAt: at(1), lastConnectedAt: at(round), lastConnectedReplicaId: replica, updatedAt: at(round) });
      });
      await new Promise((r) => setTimeout(r, 30));
    }
    await Promise.all(stagers.map((s) => s.flush()));
    const disconnected = await Promise.all(
      ids.slice(0, 40).map((agentId, i) => stagers[i % 2]!.disconnect({ agentId, disconnectedAt: at(10), updatedAt: at(10) })),
    );
    merging = false;
    await mergeLoop;
    await mergeNow(merger);
    for (const s of stagers) await s.close();
    assert.ok(disconnected.every(Boolean));
    assert.equal(stagers.reduce((n, s) => n + s.stats().failedCopies, 0), 0);
    assert.ok(merges > 0);
    assert.equal(await stagedCount(db.pool), 0);
    const { rows } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1) AND updated_at = $2 AND last_connected_at = $2 AND first_connected_at = $3',
      [ids.slice(40), at(5), at(1)],
    );
    assert.equal(Number(rows[0]!.n), 360, 'every agent has its newest heartbeat');
    const gone = await agentRow(db.pool, ids[0]!);
    assert.deepEqual(gone.disconnected_at, at(10));
    assert.deepEqual(gone.updated_at, at(10));
  });

  test('no session state: stagers, merges and disconnects interleave on ONE server connection, leaving no named statements or session locks', async () => {
    const ids = await createAgents(db.pool, 100);
    const t1 = new Date(Date.now() - 5000);
    const stagers = [0, 1, 2].map(
      () => new HeartbeatStager({ connectionString: bouncer.url('one'), max: 2 }, { flushIntervalMs: 5, logger: silentLogger }),
    );
    const shared = poolFor(bouncer.url('one'), 3);
    await Promise.all(
      ids.map(async (agentId, i) => {
        stagers[i % 3]!.stage({ agentId, lastConnectedAt: t1, updatedAt: t1 });
        if (i % 10 === 0) await mergeNow(shared);
      }),
    );
    await Promise.all(stagers.map((s) => s.flush()));
    const result = await mergeNow(shared);
    assert.equal(result.skippedConcurrent, false);
    assert.equal(await stagers[0]!.disconnect({ agentId: ids[0]!, disconnectedAt: t1, updatedAt: new Date(t1.getTime() + 1) }), true);
    for (const s of stagers) await s.close();
    const prepared = await shared.query<{ n: string }>('SELECT count(*) AS n FROM pg_prepared_statements');
    assert.equal(Number(prepared.rows[0]!.n), 0, 'no named prepared statements on the shared server connection');
    const locks = await db.pool.query<{ n: string }>(
      "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = $1)",
      [db.name],
    );
    assert.equal(Number(locks.rows[0]!.n), 0, 'no advisory lock outlives its transaction');
    const merged = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1) AND last_connected_at = $2',
      [ids, t1],
    );
    assert.equal(Number(merged.rows[0]!.n), 100);
  });

  test('the client code holds no session state: no session advisory locks, named statements, LISTEN or session SET', () => {
    // the LISTENs: the status-events watcher's and the merger's, each on a dedicated pg.Client of its own (never a
    // pool's), both sent by events-source.ts; through a transaction pooler they run with listen: false (tested
    // below). Their option is called 'listen', and the watch command says 'LISTEN' in a message: those files are
    // checked for PREPARE and DECLARE only
    const listens = new Set(['src/events-source.ts', 'src/status-events.ts', 'src/cli/watch-command.ts', 'src/merger.ts']);
    const files = (dir: string): string[] =>
      readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
        e.isDirectory() ? files(join(dir, e.name)) : e.name.endsWith('.ts') || e.name.endsWith('.sql') ? [join(dir, e.name)] : [],
      );
    const offenders: string[] = [];
    for (const file of [...files('src'), ...files('sql')]) {
      const text = readFileSync(file, 'utf8');
      const patterns: Array<[RegExp, string]> = [
        [/pg_(try_)?advisory_lock(_shared)?\s*\(/i, 'session advisory lock'],
        [/\bquery\s*\(\s*\{[^}]*\bname\s*:/s, 'named prepared statement'],
        [/['"`]\s*(LISTEN|PREPARE|DECLARE\s+\w+\s+CURSOR\s+WITH\s+HOLD)\b/i, 'session-scoped command'],
        [/['"`]\s*SET\s+(SESSION\s+)?(?!LOCAL)\w+\s*(=|TO)/i, 'session SET'],
      ];
      for (const [re, what] of patterns) {
        if (what === 'session-scoped command' && listens.has(file) && !/['"`]\s*(PREPARE|DECLARE)\b/i.test(text)) continue;
        if (re.test(text)) offenders.push(`${file}: ${what}`);
      }
    }
    assert.deepEqual(offenders, []);
  });
});

describe('startMerger() through pgbouncer (pool_mode = transaction)', { skip: missing }, () => {
  test('with listen (the default) it still merges every tick; with listen: false it sends no LISTEN', async () => {
    for (const listen of [true, false]) {
      const ids = await createAgents(db.pool, 20);
      const reports: MergeReport[] = [];
      const errors: unknown[] = [];
      const merger = startMerger({ connectionString: bouncer.url('tx'), max: 2 }, {
        intervalMs: 200, listen, logger: silentLogger, onMerge: (r) => reports.push(r), onError: (e) => errors.push(e),
        applicationName: `bouncer-merger-${listen}`,
      });
      try {
        await db.pool.query(
          `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) SELECT id, now(), now() FROM unnest($1::uuid[]) AS id`,
          [ids],
        );
        await waitFor(async () => (await stagedCount(db.pool)) === 0 && reports.length >= 5, `merges through pgbouncer (listen: ${listen})`, 15_000);
      } finally {
        await merger.close();
      }
      assert.deepEqual(errors, [], `no failed merge (listen: ${listen})`);
      assert.equal(merger.stats().skippedNotified, 0, 'alone, no tick is skipped');
      if (!listen) assert.equal(merger.stats().listenConnections, 0, 'listen: false opens no LISTEN connection');
    }
  });
});

describe('watching status events through pgbouncer (pool_mode = transaction)', { skip: missing }, () => {
  test('listen: false polls through it: every disconnect arrives once, in order, with no LISTEN on a server connection', async () => {
    const { rows: before } = await db.pool.query<{ h: string }>('SELECT heartbeat.status_events_head() AS h');
    const ids = await createAgents(db.pool, 20);
    const replica = randomUUID();
    await db.pool.query(
      `UPDATE public.workspace_agents SET first_connected_at = now() - interval '1 minute', last_connected_at = now() - interval '1 second',
              last_connected_replica_id = $2, updated_at = now() - interval '1 second' WHERE id = ANY($1::uuid[])`,
      [ids, replica],
    );
    const seen: StatusChange[] = [];
    const watcher = watchStatusChanges({ connectionString: bouncer.url('one') }, {
      listen: false, pollIntervalMs: 100, batchSize: 7, logger: silentLogger, onChange: (e) => void seen.push(e),
    });
    try {
      await watcher.ready;
      // 10 single disconnects, then the other 10 at once, while stagers share the same single server connection
      const stager = new HeartbeatStager({ connectionString: bouncer.url('one'), max: 2 }, { logger: silentLogger });
      for (const agentId of ids.slice(0, 10)) await stager.disconnect({ agentId, disconnectedAt: new Date(), updatedAt: new Date() });
      assert.equal(await stager.disconnectReplica(replica), 10);
      await stager.close();
      const mine = new Set(ids);
      await waitFor(() => seen.filter((e) => mine.has(e.agentId)).length >= 20, 'the 20 events through pgbouncer', 15_000);
      const { rows } = await db.pool.query<{ id: string }>(
        'SELECT id FROM heartbeat.status_events WHERE id > $1 AND agent_id = ANY($2::uuid[]) ORDER BY id', [before[0]!.h, ids],
      );
      assert.deepEqual(seen.filter((e) => mine.has(e.agentId)).map((e) => e.id), rows.map((r) => Number(r.id)), 'each once, in order');
      assert.ok(seen.every((e) => e.to === 'disconnected' && e.reason === 'disconnect'));
      const listening = await db.pool.query('SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND query ILIKE \'LISTEN%\'', [db.name]);
      assert.equal(listening.rows.length, 0, 'no LISTEN was sent');
    } finally {
      await watcher.close();
    }
  });
});

describe('migrate() and a transaction pooler', { skip: missing }, () => {
  const unmigrated = async (f: TestDb): Promise<boolean> =>
    (await f.pool.query("SELECT to_regnamespace('heartbeat') IS NULL AS none")).rows[0].none;

  test('refuses pool_mode = transaction with a TransactionPoolerError, before touching anything', async () => {
    await assert.rejects(migrate({ connectionString: bouncer.url('fresh_tx') }, { logger: silentLogger }), (err) => {
      assert.ok(err instanceof TransactionPoolerError, String(err));
      assert.equal(err.code, 'TRANSACTION_POOLER');
      assert.match(err.message, /direct \(session\) connection/);
      return true;
    });
    assert.equal(await unmigrated(fresh[0]!), true);
  });

  test('refuses it also with a one-connection pool and when given a pool', async () => {
    const pool = poolFor(bouncer.url('fresh_one'), 2);
    await assert.rejects(migrate({ pool }, { logger: silentLogger }), TransactionPoolerError);
    assert.equal(await unmigrated(fresh[3]!), true);
  });

  test('refuses pool_mode = statement', async () => {
    await assert.rejects(migrate({ connectionString: bouncer.url('fresh_stmt') }, { logger: silentLogger }), TransactionPoolerError);
    assert.equal(await unmigrated(fresh[1]!), true);
  });

  test('accepts a session-mode pool and a direct connection (no false positive)', async () => {
    const ran = await migrate({ connectionString: bouncer.url('fresh_session') }, { logger: silentLogger });
    assert.ok(ran.length >= 5);
    assert.equal(await unmigrated(fresh[2]!), false);
    const direct = new pg.Client({ connectionString: db.url });
    await direct.connect();
    try {
      await assertSessionConnection(direct, { connectionString: db.url });
    } finally {
      await direct.end();
    }
  });

  test('`pg-heartbeat migrate` through it prints one clear line and exits 1', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'migrate', '--database-url', bouncer.url('fresh_tx')], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    assert.equal(r.status, 1, r.stderr);
    const lines = r.stderr.trim().split('\n');
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /^pg-heartbeat migrate: .*transaction pooler/);
  });
});

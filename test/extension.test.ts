/**
 * The pg_heartbeat extension: generated from the same sql/ files as the
 * migrations, installed with PGXS `make install` into the test server's share
 * directory, and exercised for real: COPY staging, merge, disconnect,
 * privileges, the 1.0 -> 1.1 upgrade under a running stager, pg_dump, DROP.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { EXTENSION, generate, sqlSources, staleFiles, VERSIONS } from '../extension/build.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { migrate } from '../src/migrate.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { sqlFile } from '../sql/load.js';
import { adminQuery, agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';

const EXTENSION_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'extension');
const LATEST = VERSIONS[VERSIONS.length - 1]!.version;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Where the server reads extensions from, or why we cannot install there. */
let installSkip: string | false = false;
let serverMajor = 0;

before(async () => {
  const { rows } = await adminQuery(
    "SELECT (SELECT setting FROM pg_config() WHERE name = 'SHAREDIR') AS sharedir, current_setting('server_version_num')::int / 10000 AS major",
  );
  const sharedir = rows[0].sharedir as string;
  serverMajor = Number(rows[0].major);
  if (!existsSync(join(sharedir, 'extension'))) {
    installSkip = `the server's share directory ${sharedir} is not on this machine (remote DATABASE_URL?)`;
    if (process.env.CI === 'true') throw new Error(`CI: cannot install the extension: ${installSkip}`);
    return;
  }
  // PGXS (Debian postgresql-server-dev-15) installs the files; datadir points it at
  // the running server's share directory, so the same Makefile serves the embedded majors.
  const make = spawnSync('make', ['-C', EXTENSION_DIR, 'install', `datadir=${sharedir}`], { encoding: 'utf8' });
  if (make.status !== 0) {
    const why = `make -C extension install failed (is pg_config / postgresql-server-dev-15 installed?): ${make.stderr || make.error}`;
    if (process.env.CI === 'true') throw new Error(why);
    installSkip = why;
  }
});

/** A fresh database with public.workspace_agents (sql/001) and the extension at `version`. */
async function extensionDb(label: string, version?: string): Promise<TestDb> {
  const db = await createTestDb(label, { migrated: false });
  const client = await db.pool.connect();
  try {
    await client.query('BEGIN');
    await client.query(sqlFile('001_workspace_agents.sql'));
    await client.query(`CREATE EXTENSION ${EXTENSION}${version ? ` VERSION ${pg.escapeLiteral(version)}` : ''}`);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
  return db;
}

function skipUnlessInstalled(t: { skip(message: string): void }): boolean {
  if (installSkip) {
    console.log(`# skipping: ${installSkip}`);
    t.skip(installSkip);
    return true;
  }
  return false;
}

/** Everything in schema heartbeat that defines behaviour (not the migrations' bookkeeping table). */
async function schemaSnapshot(pool: pg.Pool): Promise<string[]> {
  const { rows } = await pool.query<{ item: string }>(`
    SELECT 'schema acl ' || coalesce(n.nspacl::text, '') AS item
      FROM pg_namespace n WHERE n.nspname = 'heartbeat'
    UNION ALL
    SELECT format('rel %s kind=%s persistence=%s options=%s acl=%s cols=%s', c.relname, c.relkind, c.relpersistence,
                  c.reloptions, c.relacl,
                  (SELECT string_agg(format('%s:%s:%s:%s', a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                            pg_get_expr(d.adbin, d.adrelid)), ',' ORDER BY a.attnum)
                     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))
      FROM pg_class c
     WHERE c.relnamespace = 'heartbeat'::regnamespace AND c.relname NOT LIKE 'migrations%'
    UNION ALL
    SELECT format('view %s %s', c.relname, pg_get_viewdef(c.oid))
      FROM pg_class c WHERE c.relnamespace = 'heartbeat'::regnamespace AND c.relkind = 'v'
    UNION ALL
    SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace = 'heartbeat'::regnamespace AND conrelid::regclass::text NOT LIKE 'heartbeat.migrations%'
    UNION ALL
    SELECT format('routine %s acl=%s %s', p.oid::regprocedure, p.proacl, pg_get_functiondef(p.oid))
      FROM pg_proc p WHERE p.pronamespace = 'heartbeat'::regnamespace
     ORDER BY 1`);
  return rows.map((r) => r.item);
}

describe('the generated extension scripts', () => {
  test('are up to date with sql/ (run `node --import tsx extension/build.ts` after changing sql/)', () => {
    assert.deepEqual(staleFiles(), []);
  });

  test('take every numbered sql/ file but 001, each exactly once, with the psql guard and no schema creation', () => {
    const files = generate();
    const scripts = [...files].filter(([name]) => name.endsWith('.sql'));
    const included = scripts.flatMap(([, text]) => [...text.matchAll(/^-- -+ sql\/(\d{3}_[^\s]+\.sql)$/gm)].map((m) => m[1]!));
    assert.deepEqual(included, sqlSources().map((s) => s.name).filter((n) => !n.startsWith('001_')));
    for (const [name, text] of scripts) {
      assert.match(text, /^\\echo Use "(CREATE|ALTER) EXTENSION pg_heartbeat[^"]*" to load this file\. \\quit$/m, name);
      assert.doesNotMatch(text, /^\s*CREATE SCHEMA/im, name);
      assert.doesNotMatch(text, /workspace_agents \(/, `${name} must not create public.workspace_agents`);
    }
    assert.match(files.get(`${EXTENSION}.control`)!, new RegExp(`default_version = '${LATEST.replace('.', '\\.')}'`));
    assert.equal(readFileSync(join(EXTENSION_DIR, `${EXTENSION}.control`), 'utf8'), files.get(`${EXTENSION}.control`));
  });
});

describe('CREATE EXTENSION pg_heartbeat', () => {
  let db: TestDb;
  let migrated: TestDb;
  const role = `hb_ext_app_${randomUUID().slice(0, 8)}`;
  let app: pg.Pool | undefined;

  before(async () => {
    if (installSkip) return;
    db = await extensionDb('extension');
    migrated = await createTestDb('extension_migrated');
    await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN IN ROLE heartbeat_writer`);
    const u = new URL(db.url);
    u.username = role;
    app = new pg.Pool({ connectionString: u.toString(), max: 3 });
    app.on('error', () => {});
  });
  after(async () => {
    await app?.end();
    await db?.drop();
    await migrated?.drop();
    if (!installSkip) await adminQuery(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
  });

  test(`installs version ${LATEST} with the same objects, definitions and privileges as the migrations`, async (t) => {
    if (skipUnlessInstalled(t)) return;
    const { rows } = await db.pool.query("SELECT extversion, extnamespace::regnamespace::text AS schema FROM pg_extension WHERE extname = 'pg_heartbeat'");
    assert.deepEqual(rows, [{ extversion: LATEST, schema: 'heartbeat' }]);
    const fromExtension = await schemaSnapshot(db.pool);
    const fromMigrations = await schemaSnapshot(migrated.pool);
    assert.ok(fromExtension.length > 10, 'the snapshot covers the objects');
    assert.deepEqual(fromExtension, fromMigrations);
  });

  test('owns the heartbeat objects but not public.workspace_agents (pg_dump keeps dumping the table and its rows)', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const { rows } = await db.pool.query<{ member: string }>(`
      SELECT pg_describe_object(classid, objid, objsubid) AS member
        FROM pg_depend
       WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
         AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_heartbeat')
       ORDER BY 1`);
    const members = rows.map((r) => r.member);
    for (const expected of [
      'table heartbeat.agent_connection_staging', 'table heartbeat.merge_state', 'view heartbeat.status',
      'function heartbeat.merge_agent_connections()', 'function heartbeat.disconnect_replica(uuid,timestamp with time zone,timestamp with time zone)',
    ]) assert.ok(members.includes(expected), `${expected} in ${members.join(', ')}`);
    assert.ok(!members.some((m) => m.includes('workspace_agents')), 'workspace_agents is not a member');
    assert.ok(!members.includes('schema heartbeat'));
    const definer = await db.pool.query<{ fn: string; config: string[] | null }>(
      "SELECT oid::regprocedure::text AS fn, proconfig AS config FROM pg_proc WHERE pronamespace = 'heartbeat'::regnamespace AND prosecdef",
    );
    assert.ok(definer.rows.length >= 3);
    for (const r of definer.rows) assert.ok(r.config?.includes('search_path=pg_catalog, pg_temp'), `${r.fn}: ${r.config}`);
  });

  test('a heartbeat_writer member stages by binary COPY, merges and disconnects through it, and can do nothing else', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const ids = await createAgents(db.pool, 50);
    const replica = randomUUID();
    const t1 = new Date(Date.now() - 3000);
    const t2 = new Date(Date.now() - 2000);
    const stager = new HeartbeatStager({ pool: app! }, { logger: silentLogger });
    for (const agentId of ids) {
      stager.stage({ agentId, firstConnectedAt: t1, lastConnectedAt: t1, lastConnectedReplicaId: replica, updatedAt: t1 });
    }
    await stager.flush();
    assert.equal(await stagedCount(db.pool), 50);
    const merged = await mergeNow(app!);
    assert.equal(merged.agentsUpdated, 50);
    assert.equal(merged.rowsConsumed, 50);
    assert.equal(await stager.disconnect({ agentId: ids[0]!, disconnectedAt: t2, updatedAt: t2 }), true);
    await stager.close();
    assert.deepEqual((await agentRow(db.pool, ids[0]!)).disconnected_at, t2);
    assert.deepEqual((await agentRow(db.pool, ids[1]!)).last_connected_at, t1);
    const gone = await app!.query<{ n: string }>('SELECT heartbeat.disconnect_replica($1, $2, $2) AS n', [replica, t2]);
    assert.equal(Number(gone.rows[0]!.n), 49, 'the replica\'s other agents (the first was already disconnected)');
    const status = await app!.query('SELECT staged_rows, merges_total FROM heartbeat.status');
    assert.deepEqual(status.rows[0], { staged_rows: '0', merges_total: '1' });
    for (const sql of [
      'SELECT * FROM heartbeat.agent_connection_staging', 'DELETE FROM heartbeat.agent_connection_staging',
      'UPDATE public.workspace_agents SET disconnected_at = now()', 'UPDATE heartbeat.merge_state SET merges_total = 0',
      'CREATE TABLE heartbeat.evil (x int)',
    ]) {
      await assert.rejects(app!.query(sql), (err: { code?: string }) => err.code === '42501', sql);
    }
  });

  test('pg_dump and restore keep public.workspace_agents rows and recreate the extension', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const pgDump = `/usr/lib/postgresql/${Math.max(serverMajor, 15)}/bin/pg_dump`;
    const psql = `/usr/lib/postgresql/${Math.max(serverMajor, 15)}/bin/psql`;
    if (!existsSync(pgDump) || !existsSync(psql)) {
      const why = `no pg_dump/psql for PostgreSQL ${serverMajor} on this machine (${pgDump})`;
      console.log(`# skipping: ${why}`);
      t.skip(why);
      return;
    }
    const [agentId] = await createAgents(db.pool, 1, new Date('2021-06-01T00:00:00Z'));
    const copy = await createTestDb('extension_restored', { migrated: false });
    const dir = mkdtempSync(join(tmpdir(), 'pg-heartbeat-dump-'));
    try {
      const file = join(dir, 'dump.sql');
      execFileSync(pgDump, ['--no-owner', '-f', file, db.url], { stdio: ['ignore', 'ignore', 'pipe'] });
      const dump = readFileSync(file, 'utf8');
      assert.match(dump, /CREATE EXTENSION IF NOT EXISTS pg_heartbeat WITH SCHEMA heartbeat/);
      assert.doesNotMatch(dump, /CREATE (UNLOGGED )?TABLE heartbeat\./, 'extension members are not dumped');
      execFileSync(psql, ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-1', '-f', file, copy.url], { stdio: ['ignore', 'ignore', 'pipe'] });
      const { rows } = await copy.pool.query("SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat'");
      assert.deepEqual(rows, [{ extversion: LATEST }]);
      assert.deepEqual((await agentRow(copy.pool, agentId!)).updated_at, new Date('2021-06-01T00:00:00Z'));
      await copy.pool.query(
        'INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now())',
        [agentId],
      );
      assert.equal((await mergeNow(copy.pool)).agentsUpdated, 1, 'the restored extension merges');
    } finally {
      rmSync(dir, { recursive: true, force: true });
      await copy.drop();
    }
  });

  test('one way in per database: the migrations refuse an extension database, CREATE EXTENSION a migrated one', async (t) => {
    if (skipUnlessInstalled(t)) return;
    await assert.rejects(migrate({ connectionString: db.url }, { logger: silentLogger }), /already exists/);
    await assert.rejects(migrated.pool.query(`CREATE EXTENSION ${EXTENSION}`), /already exists/);
    const { rows } = await db.pool.query("SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat'");
    assert.deepEqual(rows, [{ extversion: LATEST }], 'the failed migration rolled back and left the extension alone');
  });

  test('DROP EXTENSION removes the heartbeat objects and keeps public.workspace_agents', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const scratch = await extensionDb('extension_drop');
    try {
      const [agentId] = await createAgents(scratch.pool, 1);
      await scratch.pool.query('DROP EXTENSION pg_heartbeat');
      const { rows } = await scratch.pool.query("SELECT count(*)::int AS n FROM pg_class WHERE relnamespace = 'heartbeat'::regnamespace");
      assert.equal(rows[0].n, 0);
      assert.ok(await agentRow(scratch.pool, agentId!));
      await scratch.pool.query(`CREATE EXTENSION ${EXTENSION}`);
    } finally {
      await scratch.drop();
    }
  });
});

describe(`ALTER EXTENSION pg_heartbeat UPDATE TO '${LATEST}'`, () => {
  test('keeps staged rows and a stager that is staging throughout; nothing is lost', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const db = await extensionDb('extension_upgrade', VERSIONS[0]!.version);
    try {
      const version = async (): Promise<string> =>
        (await db.pool.query("SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat'")).rows[0].extversion;
      assert.equal(await version(), '1.0');
      assert.equal((await db.pool.query("SELECT to_regproc('heartbeat.disconnect_replica') AS f")).rows[0].f, null);

      const ids = await createAgents(db.pool, 600);
      const replica = randomUUID();
      const base = Date.now() - 60_000;
      const at = (i: number): Date => new Date(base + i);
      const stager = new HeartbeatStager({ connectionString: db.url, max: 2 }, { flushIntervalMs: 10, logger: silentLogger });
      // rows staged (committed in staging, not merged) before the upgrade
      for (const [i, agentId] of ids.slice(0, 200).entries()) {
        stager.stage({ agentId, lastConnectedAt: at(i), lastConnectedReplicaId: replica, updatedAt: at(i) });
      }
      await stager.flush();
      assert.equal(await stagedCount(db.pool), 200);

      // keep staging while the update runs
      let staging = true;
      const producer = (async () => {
        for (let i = 200; i < ids.length; i++) {
          stager.stage({ agentId: ids[i]!, lastConnectedAt: at(i), lastConnectedReplicaId: replica, updatedAt: at(i) });
          if (i % 10 === 0) await sleep(3);
        }
        staging = false;
      })();
      while (stager.stats().copies < 4) await sleep(2);
      await db.pool.query(`ALTER EXTENSION pg_heartbeat UPDATE TO '${LATEST}'`);
      const copiesAtUpgrade = stager.stats().copies;
      assert.ok(staging, 'the stager was still staging when the update committed');
      await producer;
      await stager.close();
      const stats = stager.stats();
      assert.equal(stats.failedCopies, 0);
      assert.ok(stats.copies > copiesAtUpgrade, 'COPYs continued after the update');
      assert.equal(stats.rowsCopied, ids.length);

      assert.equal(await version(), LATEST);
      assert.equal(await stagedCount(db.pool), ids.length, 'every staged row is still there');
      const merged = await mergeNow(db.pool);
      assert.equal(merged.agentsUpdated, ids.length);
      assert.deepEqual((await agentRow(db.pool, ids[599]!)).last_connected_at, at(599));
      const gone = await db.pool.query<{ n: string }>('SELECT heartbeat.disconnect_replica($1, now(), now()) AS n', [replica]);
      assert.equal(Number(gone.rows[0]!.n), ids.length, 'the 1.1 function works on the upgraded extension');
    } finally {
      await db.drop();
    }
  });
});

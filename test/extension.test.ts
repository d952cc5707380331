/**
 * The pg_heartbeat extension: built by its PGXS Makefile from the same sql/
 * files as the migrations (plain cat, no Node), installed with `make install`
 * into the test server's share directory, its own `make installcheck` (pg_regress
 * and isolation specs) run on a throwaway cluster of the same binaries, and exercised for real:
 * COPY staging, merge, disconnect, privileges, an install by a non-superuser,
 * the upgrade from 1.0 under a running stager, pg_dump, DROP, `make dist`.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { migrate } from '../src/migrate.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { sqlFile } from '../sql/load.js';
import { startCluster } from './support/cluster.ts';
import { adminQuery, agentRow, createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';

const EXTENSION = 'pg_heartbeat';
const EXTENSION_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'extension');
const SQL_DIR = join(EXTENSION_DIR, '..', 'sql');
const LATEST = /^default_version = '([^']+)'/m.exec(readFileSync(join(EXTENSION_DIR, `${EXTENSION}.control`), 'utf8'))![1]!;
const FIRST = '1.0';
/** The numbered sql/ files (001 is the application's table, outside the extension). */
const sqlSources = (): string[] => readdirSync(SQL_DIR).filter((f) => /^\d{3}_.+\.sql$/.test(f)).sort();
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

/** A fresh database with the roles (sql/roles.sql), public.workspace_agents (sql/001) and the extension at `version`. */
async function extensionDb(label: string, version?: string): Promise<TestDb> {
  const db = await createTestDb(label, { migrated: false });
  const client = await db.pool.connect();
  try {
    await client.query(sqlFile('roles.sql'));
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

describe('the extension build', () => {
  test('every sql/ file from 002 on is valid extension script as it is', () => {
    for (const name of sqlSources().filter((n) => !n.startsWith('001_'))) {
      const code = readFileSync(join(SQL_DIR, name), 'utf8').replace(/\$(\w*)\$[\s\S]*?\$\1\$/g, '$$$$').replace(/--[^\n]*/g, '');
      assert.doesNotMatch(code, /^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION)\s*;/im, `${name}: no transaction control`);
      assert.doesNotMatch(code, /^\s*\\/m, `${name}: no psql meta-commands`);
      assert.doesNotMatch(code, /\bCREATE\s+SCHEMA\b/i, `${name}: the schema comes from CREATE EXTENSION (or the migration wrapper)`);
      assert.doesNotMatch(code, /\b(CREATE|DROP)\s+ROLE\b/i, `${name}: roles come from sql/roles.sql, once per cluster`);
      assert.doesNotMatch(code, /CREATE\s+TABLE[^;]*public\.workspace_agents/i, `${name}: the application's table is sql/001's`);
    }
  });

  test('make builds each version from its sql/ files with plain cat: every file once, in order, behind the psql guard', () => {
    execFileSync('make', ['-C', EXTENSION_DIR, '-s', 'clean', 'all'], { stdio: ['ignore', 'ignore', 'pipe'] });
    const scripts = readdirSync(EXTENSION_DIR).filter((f) => /^pg_heartbeat--.*\.sql$/.test(f));
    const order = (f: string): string => f.replace(/^pg_heartbeat--/, '').replace(/\.sql$/, '').split('--').pop()!;
    scripts.sort((a, b) => order(a).localeCompare(order(b), undefined, { numeric: true }));
    assert.equal(scripts[0], `pg_heartbeat--${FIRST}.sql`);
    assert.equal(order(scripts[scripts.length - 1]!), LATEST, 'the last update script reaches default_version');
    const included = scripts.flatMap((f) => {
      const text = readFileSync(join(EXTENSION_DIR, f), 'utf8');
      assert.match(text, /^\\echo Use "(CREATE|ALTER) EXTENSION pg_heartbeat[^"]*" to load this file\. \\quit$/m, f);
      return [...text.matchAll(/^-- -+ (\d{3}_[^\s]+\.sql)$/gm)].map((m) => m[1]!);
    });
    assert.deepEqual(included, sqlSources().filter((n) => !n.startsWith('001_')));
  });

  test('make dist makes a PGXN distribution: META.json, control, Makefile, SQL sources and tests, buildable on its own', (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'pg-heartbeat-dist-'));
    try {
      execFileSync('make', ['-C', EXTENSION_DIR, '-s', 'dist'], { stdio: ['ignore', 'ignore', 'pipe'] });
      const zip = join(EXTENSION_DIR, `pg_heartbeat-${LATEST}.zip`);
      execFileSync('unzip', ['-q', zip, '-d', dir]);
      rmSync(zip);
      const root = join(dir, `pg_heartbeat-${LATEST}`);
      const meta = JSON.parse(readFileSync(join(root, 'META.json'), 'utf8')) as { version: string; provides: Record<string, { version: string }> };
      assert.equal(meta.version, `${LATEST}.0`, 'META.json (semver) matches the control file');
      assert.equal(meta.provides.pg_heartbeat!.version, `${LATEST}.0`);
      for (const f of ['Makefile', 'pg_heartbeat.control', 'README.md', 'sql/roles.sql', 'sql/001_workspace_agents.sql', 'test/sql/install.sql', 'test/specs/two_merges.spec']) {
        assert.ok(existsSync(join(root, f)), f);
      }
      execFileSync('make', ['-C', root, '-s'], { stdio: ['ignore', 'ignore', 'pipe'] });
      assert.ok(existsSync(join(root, `pg_heartbeat--${FIRST}.sql`)), 'the distribution builds its scripts from its own sql/');
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') {
        t.skip(`make or zip/unzip missing: ${String(err)}`);
        return;
      }
      throw err;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // On a cluster of its own (same binaries, so the same share directory): the tests change roles
  // cluster-wide (privileges.sql makes heartbeat_definer CREATEROLE for a moment, and every
  // pg-heartbeat function then refuses to run), which would fail the other test files' merges.
  test('make installcheck: the pg_regress tests and isolation specs pass on a cluster of their own', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const configMajor = Number(/(\d+)/.exec(execFileSync('pg_config', ['--version'], { encoding: 'utf8' }))![1]);
    if (configMajor !== serverMajor) {
      const why = `the expected outputs are PostgreSQL ${configMajor}'s (pg_config); the test server is ${serverMajor}`;
      console.log(`# skipping: ${why}`);
      t.skip(why);
      return;
    }
    const cluster = await startCluster();
    let run: SpawnSyncReturns<string>;
    try {
      const url = new URL(cluster.url());
      run = spawnSync('make', ['-C', EXTENSION_DIR, 'installcheck'], {
        encoding: 'utf8',
        env: { ...process.env, PGHOST: url.hostname, PGPORT: url.port, PGUSER: decodeURIComponent(url.username), PGDATABASE: 'postgres' },
      });
    } finally {
      await cluster.destroy();
    }
    const out = `${run.stdout}\n${run.stderr}`;
    const diffs = join(EXTENSION_DIR, 'regression.diffs');
    assert.equal(run.status, 0, `${out}\n${existsSync(diffs) ? readFileSync(diffs, 'utf8') : ''}`);
    const regress = /All (\d+) tests passed/.exec(out);
    const isolation = [...out.matchAll(/All (\d+) tests passed/g)];
    assert.equal(isolation.length, 2, out);
    console.log(`make installcheck: pg_regress ${regress![1]} tests passed, isolation ${isolation[1]![1]} specs passed`);
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
      'function heartbeat.merge_agent_connections(integer,interval,text)', 'function heartbeat.disconnect_replica(uuid,timestamp with time zone,timestamp with time zone)',
      'table heartbeat.agent_connection_staging_p0', 'table heartbeat.dead_letters',
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
    assert.deepEqual(status.rows[0], { staged_rows: '0', merges_total: '4' });
    for (const sql of [
      'SELECT * FROM heartbeat.agent_connection_staging_p0', 'DELETE FROM heartbeat.agent_connection_staging',
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
      // pg_dump counts the column grants CREATE EXTENSION made on the application's table as the
      // extension's own and does not dump them; CREATE EXTENSION ran before the table was restored.
      // The merge says so, and fails as a whole (nothing is dead-lettered, the row stays staged) ...
      await assert.rejects(mergeNow(copy.pool), (err: Error) => /apply_privileges/.test(`${err.message} ${(err.cause as { hint?: string })?.hint}`));
      assert.equal(await stagedCount(copy.pool), 1);
      // ... until the table's owner runs it once
      await copy.pool.query('SELECT heartbeat.apply_privileges()');
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

  test('a non-superuser installs it: the roles once by a superuser, then CREATE EXTENSION by the table owner', async (t) => {
    if (skipUnlessInstalled(t)) return;
    const owner = `hb_ext_owner_${randomUUID().slice(0, 8)}`;
    const scratch = await createTestDb('extension_nosuper', { migrated: false });
    const u = new URL(scratch.url);
    u.username = owner;
    const ownerPool = new pg.Pool({ connectionString: u.toString(), max: 1 });
    ownerPool.on('error', () => {});
    try {
      // the one-time statements of a DBA (docs/extension.md)
      await scratch.pool.query(sqlFile('roles.sql'));
      await scratch.pool.query(`CREATE ROLE ${pg.escapeIdentifier(owner)} LOGIN IN ROLE heartbeat_definer, heartbeat_writer`);
      await scratch.pool.query(`GRANT CREATE ON DATABASE ${pg.escapeIdentifier(scratch.name)} TO ${pg.escapeIdentifier(owner)}`);
      await scratch.pool.query(`GRANT CREATE ON SCHEMA public TO ${pg.escapeIdentifier(owner)}`);
      // the application's owner makes its table and installs pg-heartbeat, as itself
      const client = await ownerPool.connect();
      try {
        await client.query('BEGIN');
        await client.query(sqlFile('001_workspace_agents.sql'));
        await client.query(`CREATE EXTENSION ${EXTENSION}`);
        await client.query('COMMIT');
      } finally {
        client.release();
      }
      const { rows } = await scratch.pool.query(`
        SELECT r.rolsuper, e.extversion,
               (SELECT array_agg(DISTINCT pg_get_userbyid(p.proowner)::text) FROM pg_proc p
                 WHERE p.pronamespace = 'heartbeat'::regnamespace AND p.prosecdef) AS definers
          FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner WHERE e.extname = 'pg_heartbeat'`);
      assert.deepEqual(rows, [{ rolsuper: false, extversion: LATEST, definers: ['heartbeat_definer'] }]);
      const [agentId] = await createAgents(scratch.pool, 1);
      await ownerPool.query(
        'INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now())', [agentId]);
      assert.equal((await mergeNow({ pool: ownerPool })).agentsUpdated, 1);
    } finally {
      await ownerPool.end();
      await scratch.drop();
      await adminQuery(`DROP OWNED BY ${pg.escapeIdentifier(owner)} CASCADE`).catch(() => {});
      await adminQuery(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(owner)}`);
    }
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
    const db = await extensionDb('extension_upgrade', FIRST);
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

      // keep staging while the update runs (the first 400 before and during it, the rest after it)
      let upgraded = false;
      const producer = (async () => {
        for (let i = 200; i < ids.length; i++) {
          stager.stage({ agentId: ids[i]!, lastConnectedAt: at(i), lastConnectedReplicaId: replica, updatedAt: at(i) });
          if (i % 10 === 0) await sleep(3);
          while (i === 399 && !upgraded) await sleep(5);
        }
      })();
      while (stager.stats().copies < 4) await sleep(2);
      await db.pool.query(`ALTER EXTENSION pg_heartbeat UPDATE TO '${LATEST}'`);
      upgraded = true;
      const copiesAtUpgrade = stager.stats().copies;
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

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { migrate } from '../src/migrate.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { ConnectionError, DatabaseError } from '../src/errors.ts';
import { agentRow, createTestDb, type TestDb } from './support/db.ts';

const dbs: TestDb[] = [];
after(async () => {
  for (const db of dbs) await db.drop();
});
async function emptyDb(label: string): Promise<TestDb> {
  const db = await createTestDb(label, { migrated: false });
  dbs.push(db);
  return db;
}
const quiet = { logger: silentLogger };

// The reference system's table: the columns pg-heartbeat writes, and many more.
const REFERENCE_TABLE = `
  CREATE TABLE public.workspace_agents (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    name varchar(64) NOT NULL,
    first_connected_at timestamptz,
    last_connected_at timestamptz,
    disconnected_at timestamptz,
    resource_id uuid NOT NULL,
    auth_token uuid NOT NULL,
    auth_instance_id varchar,
    architecture varchar(64) NOT NULL,
    environment_variables jsonb,
    operating_system varchar(64) NOT NULL,
    instance_metadata jsonb,
    resource_metadata jsonb,
    directory varchar(4096) DEFAULT '' NOT NULL,
    version text DEFAULT '' NOT NULL,
    last_connected_replica_id uuid,
    connection_timeout_seconds integer DEFAULT 0 NOT NULL,
    troubleshooting_url text DEFAULT '' NOT NULL,
    motd_file text DEFAULT '' NOT NULL,
    lifecycle_state text DEFAULT 'created' NOT NULL,
    expanded_directory varchar(4096) DEFAULT '' NOT NULL,
    logs_length integer DEFAULT 0 NOT NULL,
    logs_overflowed boolean DEFAULT false NOT NULL,
    started_at timestamptz,
    ready_at timestamptz,
    subsystems text[] DEFAULT '{}',
    display_apps text[] DEFAULT '{vscode}',
    api_version text DEFAULT '' NOT NULL,
    display_order integer DEFAULT 0 NOT NULL,
    parent_id uuid,
    deleted boolean DEFAULT false NOT NULL
  );
  CREATE INDEX workspace_agents_resource_id_idx ON public.workspace_agents (resource_id);
  CREATE INDEX workspace_agents_auth_token_idx ON public.workspace_agents (auth_token);`;

describe('migrate()', () => {
  test('creates workspace_agents when missing; a second run applies nothing', async () => {
    const db = await emptyDb('migrate_fresh');
    const ran = await migrate({ connectionString: db.url }, quiet);
    assert.equal(ran.length, (await import('node:fs')).readdirSync(new URL('../migrations/', import.meta.url)).filter((f) => f.endsWith('.js')).length);
    assert.deepEqual(await migrate({ pool: db.pool }, quiet), []);
    const { rows: parent } = await db.pool.query(`SELECT relkind FROM pg_class WHERE oid = 'heartbeat.agent_connection_staging'::regclass`);
    assert.equal(parent[0].relkind, 'p', 'staging is a partitioned table');
    const { rows: parts } = await db.pool.query(
      `SELECT c.relname, c.relpersistence, pg_get_expr(c.relpartbound, c.oid) AS bound
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'heartbeat.agent_connection_staging'::regclass ORDER BY c.relname`);
    assert.deepEqual(parts.map((p) => [p.relname, p.relpersistence, p.bound]), [0, 1, 2, 3].map((k) =>
      [`agent_connection_staging_p${k}`, 'u', `FOR VALUES WITH (modulus 4, remainder ${k})`]), 'four UNLOGGED hash parts');
    for (const table of ['heartbeat.agent_connection_staging', ...parts.map((p) => `heartbeat.${p.relname}`)]) {
      const idx = await db.pool.query('SELECT count(*)::int AS n FROM pg_index WHERE indrelid = $1::regclass', [table]);
      assert.equal(idx.rows[0].n, 0, `${table} has no indexes`);
      const trg = await db.pool.query('SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = $1::regclass', [table]);
      assert.equal(trg.rows[0].n, 0, `${table} has no triggers`);
      const defaults = await db.pool.query('SELECT count(*)::int AS n FROM pg_attrdef WHERE adrelid = $1::regclass', [table]);
      assert.equal(defaults.rows[0].n, 0, `${table} has no defaults`);
    }
    const wa = await db.pool.query(`SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = 'public.workspace_agents'::regclass`);
    assert.deepEqual(wa.rows.map((r) => r.name), ['workspace_agents_pkey'], 'no index on the connection columns');
  });

  test('an existing table with many more columns keeps working untouched', async () => {
    const db = await emptyDb('migrate_existing');
    await db.pool.query(REFERENCE_TABLE);
    const id = randomUUID();
    await db.pool.query(
      `INSERT INTO public.workspace_agents (id, created_at, updated_at, name, resource_id, auth_token, architecture, operating_system)
       VALUES ($1, now(), '2020-01-01', 'main', gen_random_uuid(), gen_random_uuid(), 'amd64', 'linux')`,
      [id],
    );
    const columnsBefore = await db.pool.query(`SELECT count(*)::int AS n FROM pg_attribute WHERE attrelid = 'public.workspace_agents'::regclass AND attnum > 0`);
    await migrate({ connectionString: db.url }, quiet);
    const columnsAfter = await db.pool.query(`SELECT count(*)::int AS n FROM pg_attribute WHERE attrelid = 'public.workspace_agents'::regclass AND attnum > 0`);
    assert.equal(columnsAfter.rows[0].n, columnsBefore.rows[0].n);
    await using stager = new HeartbeatStager({ pool: db.pool }, quiet);
    const at = new Date();
    stager.stage({ agentId: id, firstConnectedAt: at, lastConnectedAt: at, updatedAt: at });
    await stager.flush();
    assert.equal((await mergeNow(db.pool)).agentsUpdated, 1);
    const row = await agentRow(db.pool, id);
    assert.deepEqual(row.last_connected_at, at);
    const { rows } = await db.pool.query('SELECT name, lifecycle_state FROM public.workspace_agents WHERE id = $1', [id]);
    assert.deepEqual(rows[0], { name: 'main', lifecycle_state: 'created' });
  });

  test('an existing table lacking a column fails with a message naming it', async () => {
    const db = await emptyDb('migrate_lacking');
    await db.pool.query('CREATE TABLE public.workspace_agents (id uuid PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL)');
    await assert.rejects(migrate({ connectionString: db.url }, quiet), (err: unknown) => {
      assert.ok(err instanceof DatabaseError, String(err));
      assert.match(err.message, /lacks columns pg-heartbeat needs: .*last_connected_at:timestamp with time zone/);
      return true;
    });
    const { rows } = await db.pool.query(`SELECT to_regclass('heartbeat.agent_connection_staging') AS t`);
    assert.equal(rows[0].t, null, 'the failed run changed nothing');
  });

  test('many replicas migrating at once all succeed, and the migrations apply once', async () => {
    const db = await emptyDb('migrate_race');
    const runs = await Promise.all([1, 2, 3, 4].map(() => migrate({ connectionString: db.url }, quiet)));
    assert.equal(runs.filter((r) => r.length > 0).length, 1);
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.migrations');
    assert.equal(rows[0].n, runs.flat().length);
  });

  test('going down from 009 on is refused with a clear message and changes nothing; 001-008 still go down and up', async () => {
    const db = await emptyDb('migrate_down');
    const first = await migrate({ connectionString: db.url }, { ...quiet, count: 8 });
    assert.equal(first.length, 8);
    const down = await migrate({ connectionString: db.url }, { ...quiet, direction: 'down', count: 8 });
    assert.equal(down.length, 8);
    const { rows } = await db.pool.query(`SELECT to_regproc('heartbeat.merge_agent_connections') AS f`);
    assert.equal(rows[0].f, null);
    const all = await migrate({ connectionString: db.url }, quiet);
    assert.deepEqual(all.slice(0, 8), first);
    await assert.rejects(migrate({ connectionString: db.url }, { ...quiet, direction: 'down' }), (err: Error) => {
      assert.ok(err instanceof DatabaseError);
      assert.match(err.message, /forward-only: it cannot be reverted .*DROP SCHEMA heartbeat CASCADE/);
      return true;
    });
    const after = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.migrations');
    assert.equal(after.rows[0].n, all.length, 'nothing was reverted');
    assert.deepEqual(await migrate({ connectionString: db.url }, quiet), []);
  });

  test('upgrading from 008 while a stager COPYs moves staged rows into the parts: nothing is lost', async () => {
    const db = await emptyDb('migrate_upgrade');
    await migrate({ connectionString: db.url }, { ...quiet, count: 8 });
    const ids = Array.from({ length: 2000 }, () => randomUUID());
    await db.pool.query("INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), '2020-01-01'", [ids]);
    const at = new Date(Date.now() - 60_000);
    // staged before the upgrade (into the unpartitioned table) ...
    await db.pool.query(
      'INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) SELECT unnest($1::uuid[]), $2, $2',
      [ids.slice(0, 1000), at],
    );
    // ... and by a stager COPYing throughout the upgrade
    await using stager = new HeartbeatStager({ pool: db.pool }, { ...quiet, flushIntervalMs: 5, resendAfterReset: false });
    let i = 1000;
    const feeding = setInterval(() => {
      for (let k = 0; k < 20 && i < ids.length; k++, i++) stager.stage({ agentId: ids[i]!, lastConnectedAt: at, updatedAt: at });
    }, 2);
    try {
      const ran = await migrate({ connectionString: db.url }, quiet);
      assert.ok(ran.length >= 6);
      while (i < ids.length) await new Promise((r) => setTimeout(r, 5));
    } finally {
      clearInterval(feeding);
    }
    await stager.flush();
    let merged = 0;
    for (let k = 0; k < 5; k++) merged += (await mergeNow(db.pool)).agentsUpdated;
    assert.equal(merged, ids.length, 'every agent staged before and during the upgrade was merged');
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM public.workspace_agents WHERE last_connected_at IS NOT NULL');
    assert.equal(rows[0].n, ids.length);
  });

  test('an unreachable database is a ConnectionError', async () => {
    await assert.rejects(migrate({ connectionString: 'postgresql://postgres@127.0.0.1:1/nope' }, quiet), ConnectionError);
  });
});

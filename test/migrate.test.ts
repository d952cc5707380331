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
    const { rows } = await db.pool.query(`SELECT relpersistence, reloptions FROM pg_class WHERE oid = 'heartbeat.agent_connection_staging'::regclass`);
    assert.equal(rows[0].relpersistence, 'u', 'staging is UNLOGGED');
    const idx = await db.pool.query(`SELECT count(*)::int AS n FROM pg_index WHERE indrelid = 'heartbeat.agent_connection_staging'::regclass`);
    assert.equal(idx.rows[0].n, 0, 'staging has no indexes');
    const trg = await db.pool.query(`SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = 'heartbeat.agent_connection_staging'::regclass`);
    assert.equal(trg.rows[0].n, 0, 'staging has no triggers');
    const defaults = await db.pool.query(`SELECT count(*)::int AS n FROM pg_attrdef WHERE adrelid = 'heartbeat.agent_connection_staging'::regclass`);
    assert.equal(defaults.rows[0].n, 0, 'staging has no defaults');
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

  test('down then up again', async () => {
    const db = await emptyDb('migrate_down');
    const all = await migrate({ connectionString: db.url }, quiet);
    const down = await migrate({ connectionString: db.url }, { ...quiet, direction: 'down', count: all.length });
    assert.equal(down.length, all.length);
    const { rows } = await db.pool.query(`SELECT to_regproc('heartbeat.merge_agent_connections') AS f`);
    assert.equal(rows[0].f, null);
    assert.deepEqual(await migrate({ connectionString: db.url }, quiet), all);
  });

  test('an unreachable database is a ConnectionError', async () => {
    await assert.rejects(migrate({ connectionString: 'postgresql://postgres@127.0.0.1:1/nope' }, quiet), ConnectionError);
  });
});

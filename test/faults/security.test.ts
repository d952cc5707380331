/**
 * Least privilege and search_path safety. A login role that is only a member
 * of heartbeat_writer can stage (COPY), merge and disconnect, and nothing
 * else; a schema the attacker controls, put first in search_path with
 * look-alike functions and operators, never runs inside pg-heartbeat's
 * functions.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { PermissionDeniedError, toHeartbeatError } from '../../src/errors.ts';
import { mergeNow } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentRow, createAgents, createTestDb, stagedCount, withDatabase, type TestDb } from '../support/db.ts';

/**
 * What heartbeat_writer may execute. A function added to the schema and granted
 * to the writer must be added here on purpose (and be SECURITY DEFINER-safe).
 */
const WRITER_ROUTINES = new Set([
  'merge_agent_connections(integer,interval,text)',
  'merge_staging_part(integer,integer,interval,text)',
  'disconnect_agent(uuid,timestamp with time zone,timestamp with time zone,uuid,timestamp with time zone,timestamp with time zone)',
  'disconnect_replica(uuid,timestamp with time zone,timestamp with time zone)',
  'staging_epoch()',
  'merge_status()',
  'part_status()',
  'agent_status(interval,uuid[])',
  'merge_loop(interval,interval,integer,integer)',
  // read-only helpers the status functions (which run with the caller's rights) call
  'staging_parts()',
  'clock_horizon()',
  'valid_time(timestamp with time zone,timestamp with time zone)',
  // status events (sql/015-017): the sweep, and reading the events
  'sweep_status()',
  'status_events_after(bigint,integer)',
  'status_events_head()',
  'status_at(timestamp with time zone,timestamp with time zone,timestamp with time zone,timestamp with time zone,integer,timestamp with time zone,timestamp with time zone,timestamp with time zone)',
]);
/**
 * What heartbeat_writer may do to relations of the heartbeat and public schemas: INSERT (COPY)
 * into staging, and read pg-heartbeat's own tables (status runs with the caller's rights, sql/014).
 */
const WRITER_TABLE_PRIVILEGES = new Set([
  'heartbeat.agent_connection_staging:INSERT',
  ...['agent_connection_staging', 'merge_state', 'merge_skips', 'staging_epoch', 'dead_letters', 'settings', 'status',
    'status_events', 'event_state'].map((t) => `heartbeat.${t}:SELECT`),
  'heartbeat.cron_state:SELECT', // merge_loop (run with the caller's rights) reads whether it was unscheduled
]);

let db: TestDb;
const app = `hb_app_${randomUUID().slice(0, 8)}`;
const evil = `hb_evil_${randomUUID().slice(0, 8)}`;
let appPool: pg.Pool;

function urlAs(role: string): string {
  const u = new URL(db.url);
  u.username = role;
  u.password = '';
  return u.toString();
}

before(async () => {
  db = await createTestDb('fault_security');
  await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(app)} LOGIN IN ROLE heartbeat_writer`);
  appPool = new pg.Pool({ connectionString: urlAs(app), max: 2 });
  appPool.on('error', () => {});
});
after(async () => {
  if (!db) return;
  await appPool?.end();
  await db.drop();
  const admin = new pg.Client({ connectionString: withDatabase(db.url, 'postgres') });
  await admin.connect();
  try {
    await admin.query(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(app)}`);
  } finally {
    await admin.end();
  }
});

async function sqlState(pool: pg.Pool, sql: string, params: unknown[] = []): Promise<string | undefined> {
  return pool.query(sql, params).then(() => undefined, (err: { code?: string }) => err.code ?? 'no code');
}

describe('a member of heartbeat_writer', () => {
  test('can stage by COPY, merge and disconnect', async () => {
    const [a, b] = await createAgents(db.pool, 2);
    const stager = new HeartbeatStager({ pool: appPool }, { logger: silentLogger });
    const t = new Date(Date.UTC(2026, 0, 1));
    stager.stage({ agentId: a!, lastConnectedAt: t, updatedAt: t });
    stager.stage({ agentId: b!, lastConnectedAt: t, updatedAt: t });
    await stager.flush();
    const merged = await mergeNow(appPool);
    assert.equal(merged.agentsUpdated, 2);
    const later = new Date(t.getTime() + 1000);
    assert.equal(await stager.disconnect({ agentId: b!, disconnectedAt: later, updatedAt: later }), true);
    await stager.close();
    assert.deepEqual((await agentRow(db.pool, b!)).disconnected_at, later);
  });

  test('can read or change nothing else (42501, mapped to PermissionDeniedError)', async () => {
    const [a] = await createAgents(db.pool, 1);
    const denied: [string, unknown[]][] = [
      ['SELECT * FROM public.workspace_agents', []],
      ['UPDATE public.workspace_agents SET updated_at = now() WHERE id = $1', [a]],
      ['INSERT INTO public.workspace_agents (id, updated_at) VALUES ($1, now())', [randomUUID()]],
      ['DELETE FROM public.workspace_agents', []],
      ['TRUNCATE public.workspace_agents', []],
      ['SELECT * FROM heartbeat.agent_connection_staging_p0', []],
      ['DELETE FROM heartbeat.agent_connection_staging', []],
      ['UPDATE heartbeat.agent_connection_staging SET updated_at = now()', []],
      ['TRUNCATE heartbeat.agent_connection_staging', []],
      ['UPDATE heartbeat.merge_state SET merges_total = 0', []],
      ['DELETE FROM heartbeat.dead_letters', []],
      ['UPDATE heartbeat.settings SET max_clock_skew = \'100 years\'', []],
      ['UPDATE heartbeat.settings SET max_rows_per_merge = 1', []],
      ['SELECT heartbeat.apply_privileges()', []],
      ['SELECT heartbeat.check_privilege_model()', []],
      ['SET ROLE heartbeat_definer', []],
      ['SELECT * FROM heartbeat.migrations', []],
      ['CREATE TABLE heartbeat.mine (x int)', []],
      ['CREATE FUNCTION heartbeat.mine() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$', []],
      ['CREATE VIEW heartbeat.mine AS SELECT 1 AS x', []],
      ['ALTER TABLE heartbeat.agent_connection_staging_p0 SET LOGGED', []],
      ['ALTER FUNCTION heartbeat.merge_agent_connections(integer, interval, text) SET search_path = public', []],
      ['DROP FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz)', []],
      ['GRANT heartbeat_writer TO postgres', []],
      ['CREATE ROLE hb_intruder LOGIN', []],
    ];
    const allowedBy: string[] = [];
    for (const [sql, params] of denied) {
      const code = await sqlState(appPool, sql, params);
      if (code !== '42501') allowedBy.push(`${sql} -> ${code ?? 'succeeded'}`);
    }
    assert.deepEqual(allowedBy, [], 'every statement is refused with 42501');
    const err = await appPool.query('SELECT * FROM public.workspace_agents').catch((e: unknown) => e);
    assert.ok(toHeartbeatError(err, 'read') instanceof PermissionDeniedError);
    // staging was not touched by any of the attempts
    assert.equal(await stagedCount(db.pool), 0);
  });

  test('can execute exactly the intended routines, and PUBLIC none of them', async () => {
    const { rows } = await db.pool.query<{ sig: string; writer: boolean; public: boolean; definer: boolean; config: string[] | null; kind: string }>(
      `SELECT p.proname || '(' || replace(oidvectortypes(p.proargtypes), ', ', ',') || ')' AS sig,
              has_function_privilege($1, p.oid, 'EXECUTE') AS writer,
              EXISTS (SELECT 1 FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) x
                       WHERE x.grantee = 0 AND x.privilege_type = 'EXECUTE') AS public,
              p.prosecdef AS definer, p.proconfig AS config, p.prokind AS kind
         FROM pg_proc p WHERE p.pronamespace = 'heartbeat'::regnamespace ORDER BY 1`,
      [app],
    );
    assert.ok(rows.length >= 2, 'found the schema\'s routines');
    const granted = rows.filter((r) => r.writer).map((r) => r.sig).sort();
    assert.deepEqual(granted, [...WRITER_ROUTINES].sort(), 'heartbeat_writer executes only the intended routines');
    assert.deepEqual(rows.filter((r) => r.public).map((r) => r.sig), [], 'PUBLIC executes none');
    for (const r of rows.filter((x) => x.definer)) {
      assert.deepEqual(r.config?.filter((c) => c.startsWith('search_path=')), ['search_path=pg_catalog, pg_temp'], `${r.sig} pins search_path`);
    }
    // and the relations: only INSERT on staging and SELECT on the status view
    const { rows: rels } = await db.pool.query<{ rel: string; priv: string }>(
      `SELECT n.nspname || '.' || c.relname AS rel, p.priv
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) AS p(priv)
        WHERE n.nspname IN ('heartbeat', 'public') AND c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
          AND has_table_privilege($1, c.oid, p.priv)`,
      [app],
    );
    assert.deepEqual(rels.map((r) => `${r.rel}:${r.priv}`).filter((p) => !WRITER_TABLE_PRIVILEGES.has(p)), [], 'no other table privilege');
    assert.ok(rels.some((r) => r.rel === 'heartbeat.agent_connection_staging' && r.priv === 'INSERT'));
    const { rows: schemaPriv } = await db.pool.query<{ create: boolean }>(
      "SELECT has_schema_privilege($1, 'heartbeat', 'CREATE') AS create", [app],
    );
    assert.equal(schemaPriv[0]!.create, false);
  });
});

describe('a member of heartbeat_reader', () => {
  test('reads status and agent_status(), and can neither merge, disconnect, stage nor touch the staging epoch', async () => {
    const reader = `hb_reader_${randomUUID().slice(0, 8)}`;
    await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(reader)} LOGIN IN ROLE heartbeat_reader`);
    const pool = new pg.Pool({ connectionString: urlAs(reader), max: 1 });
    pool.on('error', () => {});
    try {
      await pool.query('SELECT * FROM heartbeat.status');
      await pool.query('SELECT * FROM heartbeat.part_status()');
      await pool.query('SELECT * FROM heartbeat.agent_status()');
      const refused: string[] = [];
      for (const sql of [
        'SELECT * FROM heartbeat.merge_agent_connections()',
        'SELECT * FROM heartbeat.merge_staging_part(0)',
        'SELECT * FROM heartbeat.staging_epoch()',
        `SELECT heartbeat.disconnect_agent('${randomUUID()}', now(), now())`,
        `SELECT heartbeat.disconnect_replica('${randomUUID()}', now(), now())`,
        `INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES ('${randomUUID()}', now())`,
        "CALL heartbeat.merge_loop(interval '1 second', interval '0')",
      ]) {
        const code = await sqlState(pool, sql);
        if (code !== '42501') refused.push(`${sql} -> ${code ?? 'succeeded'}`);
      }
      assert.deepEqual(refused, [], 'every write is refused with 42501');
    } finally {
      await pool.end();
      await db.pool.query(`DROP ROLE ${pg.escapeIdentifier(reader)}`);
    }
  });
});

describe('search_path hijack', () => {
  before(async () => {
    // a schema the attacker (the writer's login role) controls, full of look-alikes that record being called
    await db.pool.query(`CREATE SCHEMA ${pg.escapeIdentifier(evil)} AUTHORIZATION ${pg.escapeIdentifier(app)}`);
    const s = pg.escapeIdentifier(evil);
    const client = new pg.Client({ connectionString: urlAs(app) });
    await client.connect();
    try {
      await client.query(`
        SET search_path = ${s};
        CREATE TABLE hits (what text, who text);
        GRANT ALL ON hits TO PUBLIC;
        CREATE FUNCTION hit(what text) RETURNS void LANGUAGE sql
          AS $$ INSERT INTO ${s}.hits VALUES (what, current_user) $$;
        GRANT EXECUTE ON FUNCTION hit(text) TO PUBLIC;
        CREATE FUNCTION now() RETURNS timestamptz LANGUAGE sql
          AS $$ SELECT ${s}.hit('now'); SELECT pg_catalog.now() + interval '100 years' $$;
        CREATE FUNCTION clock_timestamp() RETURNS timestamptz LANGUAGE sql
          AS $$ SELECT ${s}.hit('clock_timestamp'); SELECT pg_catalog.now() + interval '100 years' $$;
        CREATE FUNCTION statement_timestamp() RETURNS timestamptz LANGUAGE sql
          AS $$ SELECT ${s}.hit('statement_timestamp'); SELECT pg_catalog.now() + interval '100 years' $$;
        CREATE FUNCTION current_setting(text, boolean) RETURNS text LANGUAGE sql
          AS $$ SELECT ${s}.hit('current_setting'); SELECT '1000 years'::text $$;
        CREATE FUNCTION pg_try_advisory_xact_lock(integer, integer) RETURNS boolean LANGUAGE sql
          AS $$ SELECT ${s}.hit('pg_try_advisory_xact_lock'); SELECT false $$;
        CREATE FUNCTION count_sf(bigint) RETURNS bigint LANGUAGE sql
          AS $$ SELECT ${s}.hit('count'); SELECT $1 + 1000 $$;
        CREATE AGGREGATE count(*) (sfunc = count_sf, stype = bigint, initcond = '0');
        CREATE FUNCTION min_sf(timestamptz, timestamptz) RETURNS timestamptz LANGUAGE sql
          AS $$ SELECT ${s}.hit('min'); SELECT '1901-01-01'::timestamptz $$;
        CREATE AGGREGATE min(timestamptz) (sfunc = min_sf, stype = timestamptz);
        CREATE FUNCTION uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
          AS $$ SELECT ${s}.hit('uuid ='); SELECT true $$;
        CREATE OPERATOR = (function = uuid_eq, leftarg = uuid, rightarg = uuid);
        CREATE FUNCTION ts_lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql
          AS $$ SELECT ${s}.hit('timestamptz <'); SELECT true $$;
        CREATE OPERATOR < (function = ts_lt, leftarg = timestamptz, rightarg = timestamptz);
        CREATE OPERATOR <= (function = ts_lt, leftarg = timestamptz, rightarg = timestamptz);
        CREATE OPERATOR > (function = ts_lt, leftarg = timestamptz, rightarg = timestamptz);
        CREATE FUNCTION ts_plus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql
          AS $$ SELECT ${s}.hit('timestamptz +'); SELECT '9999-01-01'::timestamptz $$;
        CREATE OPERATOR + (function = ts_plus, leftarg = timestamptz, rightarg = interval);
        CREATE FUNCTION text_ne(text, text) RETURNS boolean LANGUAGE sql
          AS $$ SELECT ${s}.hit('text <>'); SELECT true $$;
        CREATE OPERATOR <> (function = text_ne, leftarg = text, rightarg = text);
      `);
    } finally {
      await client.end();
    }
  });

  test('a fake pg_cron (schema cron planted by the writer) never runs inside pg-heartbeat\'s functions', async () => {
    // an application role that may create schemas in its database (common: it owns it), without pg_cron installed
    await db.pool.query(`GRANT CREATE ON DATABASE ${pg.escapeIdentifier(db.name)} TO ${pg.escapeIdentifier(app)}`);
    const s = pg.escapeIdentifier(evil);
    const client = new pg.Client({ connectionString: urlAs(app) });
    await client.connect();
    try {
      await client.query(`DELETE FROM ${s}.hits`);
      await client.query(`
        SET cron.database_name = ${pg.escapeLiteral(db.name)};
        CREATE SCHEMA cron;
        CREATE FUNCTION cron.pwn() RETURNS text LANGUAGE sql
          AS $$ SELECT ${s}.hit('fake cron.job'); SELECT 'pg-heartbeat-merge'::text $$;
        CREATE VIEW cron.job AS SELECT cron.pwn() AS jobname, '* * * * *'::text AS schedule, true AS active, 1::bigint AS jobid;
        GRANT USAGE ON SCHEMA cron TO PUBLIC;
        GRANT SELECT ON cron.job TO PUBLIC;
        GRANT EXECUTE ON FUNCTION cron.pwn() TO PUBLIC;
      `);
      await client.query('SELECT * FROM heartbeat.merge_status()');
      await client.query('SELECT * FROM heartbeat.status');
      const { rows: hits } = await client.query<{ what: string; who: string }>(`SELECT what, who FROM ${s}.hits`);
      assert.deepEqual(hits, [], 'the planted cron.job did not run (as the function owner)');
    } finally {
      await client.query('DROP SCHEMA IF EXISTS cron CASCADE').catch(() => {});
      await client.end();
      await db.pool.query(`REVOKE CREATE ON DATABASE ${pg.escapeIdentifier(db.name)} FROM ${pg.escapeIdentifier(app)}`);
    }
  });

  test('look-alike functions and operators first in search_path never run inside pg-heartbeat\'s functions', async () => {
    const ids = await createAgents(db.pool, 3);
    const [a, b, c] = ids;
    const s = pg.escapeIdentifier(evil);
    const client = new pg.Client({ connectionString: urlAs(app) });
    await client.connect();
    try {
      await client.query(`SET search_path = ${s}, pg_catalog, public`);
      // the trap is live for ordinary queries in this session
      await client.query('SELECT now()');
      const { rows: control } = await client.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${s}.hits`);
      assert.ok(control[0]!.n >= 1, 'the look-alike now() runs for unqualified calls in this session');
      await client.query(`DELETE FROM ${s}.hits`);

      const t = new Date(Date.UTC(2026, 0, 1));
      const stager = new HeartbeatStager({ connectionString: urlAs(app), max: 1 }, { logger: silentLogger });
      stager.stage({ agentId: a!, firstConnectedAt: t, lastConnectedAt: t, updatedAt: t });
      stager.stage({ agentId: b!, firstConnectedAt: t, lastConnectedAt: t, updatedAt: t });
      await stager.close();
      const replica = randomUUID();
      await client.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_replica_id, last_connected_at, updated_at) VALUES ($1, $2, $3, $3)`, [c, replica, t]);

      const { rows: merged } = await client.query('SELECT * FROM heartbeat.merge_agent_connections()');
      assert.equal(merged[0].skipped_concurrent, false, 'the real advisory lock was taken');
      assert.equal(Number(merged[0].agents_updated), 3);
      assert.equal(Number(merged[0].rows_consumed), 3, 'the real count()');
      const later = new Date(t.getTime() + 1000);
      const { rows: d } = await client.query('SELECT heartbeat.disconnect_agent($1, $2, $2, NULL) AS applied', [a, later]);
      assert.equal(d[0].applied, true);
      const { rows: stale } = await client.query('SELECT heartbeat.disconnect_agent($1, $2, $2, NULL) AS applied', [b, new Date(t.getTime() - 1000)]);
      assert.equal(stale[0].applied, false, 'the real < guards the update');
      const { rows: dr } = await client.query('SELECT heartbeat.disconnect_replica($1, $2, $2) AS n', [replica, later]);
      assert.equal(Number(dr[0].n), 1);
      await client.query('SELECT * FROM heartbeat.merge_status()');
      await client.query('SELECT * FROM heartbeat.agent_status(interval \'30 seconds\', $1::uuid[])', [ids]);
      await client.query('SELECT * FROM heartbeat.status');
      await client.query("CALL heartbeat.merge_loop(interval '1 second', interval '0')");

      const { rows: hits } = await client.query<{ what: string; who: string }>(`SELECT what, who FROM ${s}.hits`);
      assert.deepEqual(hits, [], 'no look-alike ran inside pg-heartbeat\'s routines');
    } finally {
      await client.end();
    }
    const rowA = await agentRow(db.pool, a!);
    assert.deepEqual(rowA.first_connected_at, new Date(Date.UTC(2026, 0, 1)), 'the real min()');
    assert.deepEqual(rowA.updated_at, new Date(Date.UTC(2026, 0, 1, 0, 0, 1)));
    assert.deepEqual((await agentRow(db.pool, b!)).updated_at, new Date(Date.UTC(2026, 0, 1)), 'an older disconnect did not apply');
    assert.ok((await agentRow(db.pool, c!)).disconnected_at !== null, 'disconnect_replica found its agent with the real =');
  });
});

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { PermissionDeniedError } from '../src/errors.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { adminQuery, agentRow, createAgents, createTestDb, type TestDb } from './support/db.ts';

let db: TestDb;
let app: pg.Pool;
const role = `hb_app_${randomUUID().slice(0, 8)}`;
let appUrl: string;

before(async () => {
  db = await createTestDb('privileges');
  await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN IN ROLE heartbeat_writer`);
  const u = new URL(db.url);
  u.username = role;
  appUrl = u.toString();
  app = new pg.Pool({ connectionString: appUrl, max: 3 });
  app.on('error', () => {});
});
after(async () => {
  await app.end();
  await db.drop();
  await adminQuery(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
});

describe('heartbeat_writer', () => {
  test('a member can stage by COPY, merge and disconnect', async () => {
    const [agentId] = await createAgents(db.pool, 1);
    const t1 = new Date(Date.now() - 2000);
    const t2 = new Date(Date.now() - 1000);
    await using stager = new HeartbeatStager({ pool: app }, { logger: silentLogger });
    stager.stage({ agentId: agentId!, firstConnectedAt: t1, lastConnectedAt: t1, updatedAt: t1 });
    await stager.flush();
    const merged = await mergeNow(app);
    assert.equal(merged.agentsUpdated, 1);
    assert.equal(await stager.disconnect({ agentId: agentId!, disconnectedAt: t2, updatedAt: t2 }), true);
    assert.deepEqual((await agentRow(db.pool, agentId!)).disconnected_at, t2);
  });

  test('a member can do nothing else', async () => {
    const [agentId] = await createAgents(db.pool, 1);
    const denied = async (sql: string, params: unknown[] = []): Promise<void> => {
      await assert.rejects(app.query(sql, params), (err: { code?: string }) => {
        assert.equal(err.code, '42501', sql);
        return true;
      });
    };
    await denied('UPDATE public.workspace_agents SET disconnected_at = now() WHERE id = $1', [agentId]);
    await denied('SELECT * FROM public.workspace_agents');
    await denied('DELETE FROM public.workspace_agents');
    await denied('SELECT * FROM heartbeat.agent_connection_staging_p0');
    await denied('DELETE FROM heartbeat.agent_connection_staging');
    await denied('DELETE FROM heartbeat.dead_letters');
    await denied('UPDATE heartbeat.settings SET max_rows_per_merge = 1');
    await denied("INSERT INTO heartbeat.staging_epoch VALUES (true, gen_random_uuid(), now())");
    await denied('SELECT heartbeat.set_staging_parts(2)');
    await denied('SELECT heartbeat.apply_privileges()');
    await denied('SELECT heartbeat.retry_dead_letters()');
    await denied('SELECT * FROM heartbeat.merge_part(0, $1, 10, NULL, now(), NULL, now(), NULL, now())', ['agent_connection_staging_p0']);
    await denied("INSERT INTO heartbeat.status_events VALUES (1, gen_random_uuid(), 'a', 'b', 'c', now(), now(), now())");
    await denied('DELETE FROM heartbeat.status_events');
    await denied("INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at) VALUES (gen_random_uuid(), 'a', 'b', 'c', now())");
    await denied('UPDATE heartbeat.event_state SET purged_through = 0');
    await denied('SELECT heartbeat.publish_events()');
    await denied('SELECT heartbeat.sweep_events(true)');
    await denied("SELECT setval('heartbeat.status_event_id', 1)");
    await denied('SET ROLE heartbeat_definer');
    await denied('TRUNCATE heartbeat.agent_connection_staging');
    await denied('UPDATE heartbeat.merge_state SET merges_total = 0');
    await denied('CREATE TABLE heartbeat.evil (x int)');
    await denied('CREATE FUNCTION heartbeat.evil() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$');
    await denied('SELECT * FROM heartbeat.migrations');
  });

  test('PUBLIC cannot execute the functions', async () => {
    const outsider = `hb_out_${randomUUID().slice(0, 8)}`;
    await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(outsider)} LOGIN`);
    const u = new URL(db.url);
    u.username = outsider;
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      await assert.rejects(mergeNow(c), PermissionDeniedError);
      await assert.rejects(c.query('SELECT heartbeat.disconnect_agent($1, now(), now())', [randomUUID()]), { code: '42501' });
    } finally {
      await c.end();
      await db.pool.query(`DROP ROLE ${pg.escapeIdentifier(outsider)}`);
    }
  });

  test('functions run as their owner with a pinned search_path', async () => {
    const { rows } = await db.pool.query(`
      SELECT p.proname, p.prosecdef, p.proconfig
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
       WHERE n.nspname = 'heartbeat' AND p.prosecdef
       ORDER BY 1`);
    assert.deepEqual(rows.map((r) => r.proname), [
      'agent_status', 'disconnect_agent', 'disconnect_replica', 'merge_agent_connections', 'merge_staging_part', 'staging_epoch',
      'sweep_status',
    ]);
    for (const r of rows) {
      assert.ok((r.proconfig as string[]).includes('search_path=pg_catalog, pg_temp'), `${r.proname}: ${r.proconfig}`);
    }
    const owners = await db.pool.query(`
      SELECT DISTINCT pg_get_userbyid(p.proowner) AS owner, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolbypassrls
        FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
       WHERE p.pronamespace = 'heartbeat'::regnamespace AND p.prosecdef`);
    assert.deepEqual(owners.rows, [{ owner: 'heartbeat_definer', rolsuper: false, rolcanlogin: false, rolcreaterole: false, rolbypassrls: false }],
      'every SECURITY DEFINER function runs as the unprivileged heartbeat_definer');
  });
});

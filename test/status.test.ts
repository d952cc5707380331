import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { mergeNow } from '../src/merge.ts';
import { agentStatus, readStatus } from '../src/status.ts';
import { createTestDb, type TestDb } from './support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('status');
});
after(async () => {
  await db.drop();
});

interface StatusRow {
  staged_rows: string;
  oldest_staged_at: Date | null;
  merge_lag_s: number | null;
  last_merge_at: Date | null;
  last_merge_duration: unknown;
  since_last_merge_s: number | null;
  last_merge_rows_consumed: string | null;
  last_merge_agents_updated: string | null;
  last_merge_skipped_unknown: string | null;
  merges_total: string;
  cron_database: string | null;
  cron_scheduled: boolean | null;
}
async function status(): Promise<StatusRow> {
  const { rows } = await db.pool.query<StatusRow>(
    `SELECT *, extract(epoch FROM merge_lag)::float8 AS merge_lag_s, extract(epoch FROM since_last_merge)::float8 AS since_last_merge_s
       FROM heartbeat.status`,
  );
  return rows[0]!;
}

describe('heartbeat.status', () => {
  test('reports staged rows, merge lag and the last merge; nothing staged means no lag', async () => {
    const empty = await status();
    assert.equal(empty.staged_rows, '0');
    assert.equal(empty.oldest_staged_at, null);
    assert.equal(empty.merge_lag_s, null, 'no lag when nothing waits');
    assert.equal(empty.last_merge_at, null, 'no merge yet in this database');
    assert.equal(empty.merges_total, '0');

    const agents = [randomUUID(), randomUUID()];
    await db.pool.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), now() - interval \'1 hour\'', [agents]);
    // staged 10 s and 4 s ago on the database clock, plus one unknown agent
    await db.pool.query(
      `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
       VALUES ($1, now() - interval '10 seconds', now() - interval '10 seconds'),
              ($2, now() - interval '4 seconds', now() - interval '4 seconds'),
              ($3, now() - interval '4 seconds', now() - interval '4 seconds')`,
      [agents[0], agents[1], randomUUID()],
    );
    const waiting = await status();
    assert.equal(waiting.staged_rows, '3');
    assert.ok(waiting.merge_lag_s! >= 10 && waiting.merge_lag_s! < 60, `merge lag ${waiting.merge_lag_s} s is the oldest staged row's age`);

    const result = await mergeNow(db.pool);
    const merged = await status();
    assert.equal(merged.staged_rows, '0');
    assert.equal(merged.merge_lag_s, null);
    assert.ok(merged.last_merge_at instanceof Date);
    assert.notEqual(merged.last_merge_duration, null);
    assert.ok(merged.since_last_merge_s! >= 0);
    assert.equal(Number(merged.last_merge_rows_consumed), result.rowsConsumed);
    assert.equal(merged.last_merge_rows_consumed, '3');
    assert.equal(merged.last_merge_agents_updated, '2');
    assert.equal(merged.last_merge_skipped_unknown, '1');
    assert.equal(merged.merges_total, '4', 'one merge of each of the 4 parts');
    assert.equal(merged.cron_database, null, 'this cluster has no pg_cron');
    assert.equal(merged.cron_scheduled, null);

    await mergeNow(db.pool);
    const again = await status();
    assert.equal(again.merges_total, '8', 'one row per part, updated per merge');
    assert.equal(again.last_merge_rows_consumed, '0', 'describes the last merge only');
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM heartbeat.merge_state');
    assert.equal(rows[0].n, 4, 'merge_state does not grow: a row per part');
  });

  test('readStatus() returns it typed, in milliseconds', async () => {
    await db.pool.query('INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES ($1, now() - interval \'3 seconds\')', [randomUUID()]);
    const s = await readStatus({ pool: db.pool });
    assert.equal(s.stagedRows, 1);
    assert.ok(s.mergeLagMs! >= 3000, String(s.mergeLagMs));
    assert.ok(s.lastMerge !== null && s.lastMerge.durationMs >= 0 && s.lastMerge.sinceMs >= 0);
    assert.equal(s.mergesTotal, 8);
    assert.equal(s.parts.length, 4);
    assert.equal(s.parts.reduce((n, p) => n + p.stagedRows, 0), 1);
    assert.equal(s.deadLetters, 0);
    assert.deepEqual(s.mergeLock, { holderPid: null, busySince: null });
    assert.deepEqual(s.cron, { database: null, jobName: null, schedule: null, scheduled: null });
    await mergeNow(db.pool);
  });
});

describe('heartbeat.agent_status', () => {
  const cases: { name: string; expect: string; row: string; timeout?: string }[] = [
    { name: 'never connected, no connection timeout', expect: 'connecting', row: "created_at => now() - interval '1 day'" },
    { name: 'never connected, within the connection timeout', expect: 'connecting', row: "created_at => now() - interval '30 seconds', timeout => 60" },
    { name: 'never connected, past the connection timeout', expect: 'timeout', row: "created_at => now() - interval '61 seconds', timeout => 60" },
    { name: 'disconnected after the last heartbeat', expect: 'disconnected', row: "first => now() - interval '1 minute', last => now() - interval '5 seconds', disc => now() - interval '4 seconds'" },
    { name: 'disconnected at the same instant as the last heartbeat', expect: 'disconnected', row: "first => now() - interval '1 minute', last => now() - interval '5 seconds', disc => now() - interval '5 seconds'" },
    { name: 'reconnected after a disconnect', expect: 'connected', row: "first => now() - interval '1 minute', last => now() - interval '2 seconds', disc => now() - interval '9 seconds'" },
    { name: 'last heartbeat older than the inactive timeout', expect: 'disconnected', row: "first => now() - interval '1 minute', last => now() - interval '31 seconds'" },
    { name: 'the same with a longer inactive timeout', expect: 'connected', row: "first => now() - interval '1 minute', last => now() - interval '31 seconds'", timeout: '1 minute' },
    { name: 'recent heartbeat', expect: 'connected', row: "first => now() - interval '1 minute', last => now() - interval '1 second'" },
  ];

  for (const c of cases) {
    test(`${c.name}: ${c.expect}`, async () => {
      const id = randomUUID();
      const client = await db.pool.connect();
      try {
        // pg_temp functions belong to the session: create and use on one connection
        await client.query(`
          CREATE OR REPLACE FUNCTION pg_temp.agent(id uuid, created_at timestamptz DEFAULT now(), first timestamptz DEFAULT NULL,
                                        last timestamptz DEFAULT NULL, disc timestamptz DEFAULT NULL, timeout int DEFAULT 0)
          RETURNS void LANGUAGE sql AS $$
            INSERT INTO public.workspace_agents (id, created_at, updated_at, first_connected_at, last_connected_at, disconnected_at, connection_timeout_seconds)
            VALUES (id, created_at, now(), first, last, disc, timeout) $$`);
        await client.query(`SELECT pg_temp.agent($1, ${c.row})`, [id]);
      } finally {
        client.release();
      }
      const sql = c.timeout
        ? 'SELECT status FROM heartbeat.agent_status($2::interval, ARRAY[$1::uuid])'
        : 'SELECT status FROM heartbeat.agent_status(agent_ids => ARRAY[$1::uuid])';
      const { rows } = await db.pool.query(sql, c.timeout ? [id, c.timeout] : [id]);
      assert.deepEqual(rows, [{ status: c.expect }]);
    });
  }

  test('without agent_ids it lists every agent; agentStatus() in TS agrees', async () => {
    const { rows } = await db.pool.query<{ n: string; agents: string }>(
      'SELECT (SELECT count(*) FROM heartbeat.agent_status()) AS n, (SELECT count(*) FROM public.workspace_agents) AS agents',
    );
    assert.equal(rows[0]!.n, rows[0]!.agents);
    const all = await agentStatus(db.pool);
    assert.equal(all.length, Number(rows[0]!.agents));
    const one = all.find((a) => a.status === 'timeout')!;
    const [again] = await agentStatus(db.pool, { agentIds: [one.agentId] });
    assert.deepEqual(again, one);
    const longer = await agentStatus(db.pool, { inactiveTimeoutMs: 60_000 });
    assert.ok(longer.filter((a) => a.status === 'connected').length > all.filter((a) => a.status === 'connected').length);
  });

  test('rejects a non-positive inactive timeout', async () => {
    await assert.rejects(db.pool.query("SELECT * FROM heartbeat.agent_status('0 seconds')"), { code: '22023' });
    await assert.rejects(db.pool.query('SELECT * FROM heartbeat.agent_status(NULL)'), { code: '22023' });
  });
});

describe('privileges', () => {
  test('heartbeat_writer may read status and agent_status; a role without it may not', async () => {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const outsider = `hb_outsider_${randomUUID().slice(0, 8)}`;
    try {
      await client.query('SET ROLE heartbeat_writer');
      const { rows } = await client.query('SELECT staged_rows FROM heartbeat.status');
      assert.equal(rows.length, 1);
      await client.query('SELECT * FROM heartbeat.agent_status()');
      await client.query('RESET ROLE');
      await client.query(`CREATE ROLE ${pg.escapeIdentifier(outsider)}`);
      await client.query(`SET ROLE ${pg.escapeIdentifier(outsider)}`);
      await assert.rejects(client.query('SELECT * FROM heartbeat.status'), { code: '42501' });
      await assert.rejects(client.query('SELECT * FROM heartbeat.agent_status()'), { code: '42501' });
    } finally {
      await client.query('RESET ROLE').catch(() => {});
      await client.query(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(outsider)}`).catch(() => {});
      await client.end();
    }
  });
});

/**
 * Status events in the database (sql/015-017, docs/events.md): every transition
 * and its reason, nothing at steady state, each transition once under concurrent
 * mergers, direct writes and sweeps (a transition oracle), ids published in
 * commit order, NOTIFY, retention, and who may read them.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { mergeNow } from '../src/merge.ts';
import { startMerger } from '../src/merger.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { silentLogger } from '../src/logger.ts';
import { adminQuery, createAgents, createTestDb, type TestDb } from './support/db.ts';
import { eventChainProblems } from './support/event-chain.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('status_events');
});
after(async () => {
  await db.drop();
});

interface Event {
  id: number;
  agent_id: string;
  from_status: string;
  to_status: string;
  reason: string;
  at: Date;
}

async function eventsAfter(after: number, pool: pg.Pool | pg.Client = db.pool): Promise<Event[]> {
  const { rows } = await pool.query<Event & { id: string }>(
    'SELECT id, agent_id, from_status, to_status, reason, at FROM heartbeat.status_events_after($1, 1000000)',
    [after],
  );
  return rows.map((r) => ({ ...r, id: Number(r.id) }));
}
async function head(): Promise<number> {
  const { rows } = await db.pool.query<{ h: string }>('SELECT heartbeat.status_events_head() AS h');
  return Number(rows[0]!.h);
}
/** A sweep now (the one-second rate limit is for the merger's ticks, not for tests). */
async function sweep(): Promise<number | null> {
  await db.pool.query('UPDATE heartbeat.event_state SET last_sweep_at = NULL');
  const { rows } = await db.pool.query<{ n: string | null }>('SELECT heartbeat.sweep_status() AS n');
  return rows[0]!.n === null ? null : Number(rows[0]!.n);
}
async function stage(agentId: string, s: { first?: Date; last?: Date | null; disc?: Date | null; updated: Date; replica?: string }): Promise<void> {
  await db.pool.query(
    `INSERT INTO heartbeat.agent_connection_staging
       (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6)`,
    [agentId, s.first ?? s.last ?? null, s.last ?? null, s.replica ?? null, s.disc ?? null, s.updated],
  );
}
async function dbNow(): Promise<Date> {
  const { rows } = await db.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t');
  return rows[0]!.t;
}
const brief = (e: Event): string => `${e.from_status}->${e.to_status}:${e.reason}`;

describe('status events', () => {
  test('every transition, with its reason and time, in order', async () => {
    await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = '2 seconds'`);
    try {
      const [a, c] = await createAgents(db.pool, 2, new Date('2020-01-01Z'));
      const b = randomUUID();
      await db.pool.query(
        `INSERT INTO public.workspace_agents (id, updated_at, connection_timeout_seconds) VALUES ($1, '2020-01-01Z', 1)`,
        [b],
      );
      await sweep();
      const start = await head();

      const t1 = await dbNow();
      await stage(a!, { last: t1, updated: t1 });
      const merged = await mergeNow(db.pool);
      assert.equal(merged.statusEvents, 1, 'the merge reports the event it recorded');

      const t2 = await dbNow();
      const r = await db.pool.query('SELECT heartbeat.disconnect_agent($1, $2, $2)', [a, t2]);
      assert.equal(r.rows[0].disconnect_agent, true);

      const t3 = await dbNow();
      await stage(a!, { last: t3, updated: t3 });
      await mergeNow(db.pool);

      // b was created with connection_timeout_seconds = 1, and never connects
      await sleep(2_300);   // and a's last heartbeat (t3) is now older than the inactive timeout (2 s)
      await sweep();

      const t4 = await dbNow();
      await stage(b, { last: t4, updated: t4 });
      await mergeNow(db.pool);
      const t5 = await dbNow();
      // a disconnect that arrives through staging (a snapshot with disconnected_at)
      await stage(b, { first: t4, last: t4, disc: t5, updated: t5 });
      await mergeNow(db.pool);

      const replica = randomUUID();
      const t6 = await dbNow();
      await stage(c!, { last: t6, updated: t6, replica });
      await mergeNow(db.pool);
      const t7 = await dbNow();
      const n = await db.pool.query('SELECT heartbeat.disconnect_replica($1, $2, $2) AS n', [replica, t7]);
      assert.equal(Number(n.rows[0].n), 1);

      const events = await eventsAfter(start);
      const name = (id: string): string => (id === a ? 'a' : id === b ? 'b' : 'c');
      const seen = events.map((e) => [name(e.agent_id), brief(e), e.at.getTime()]);
      const created = (await db.pool.query<{ t: Date }>('SELECT created_at AS t FROM workspace_agents WHERE id = $1', [b])).rows[0]!.t;
      assert.deepEqual(seen.slice(0, 3), [
        ['a', 'connecting->connected:first_heartbeat', t1.getTime()],
        ['a', 'connected->disconnected:disconnect', t2.getTime()],
        ['a', 'disconnected->connected:reconnect', t3.getTime()],
      ]);
      // one sweep finds both time-based changes (in the table's order)
      assert.deepEqual(seen.slice(3, 5).sort(), [
        ['a', 'connected->disconnected:inactivity', t3.getTime() + 2_000],
        ['b', 'connecting->timeout:connection_timeout', created.getTime() + 1_000],
      ]);
      assert.deepEqual(seen.slice(5), [
        ['b', 'timeout->connected:first_heartbeat', t4.getTime()],
        ['b', 'connected->disconnected:disconnect', t5.getTime()],
        ['c', 'connecting->connected:first_heartbeat', t6.getTime()],
        ['c', 'connected->disconnected:disconnect', t7.getTime()],
      ]);
      for (let i = 1; i < events.length; i++) assert.ok(events[i]!.id > events[i - 1]!.id, 'ids increase');
    } finally {
      await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = '30 seconds'`);
    }
  });

  test('heartbeats of connected agents record nothing (the steady state)', async () => {
    const ids = await createAgents(db.pool, 500);
    let now = await dbNow();
    for (const id of ids) await stage(id, { last: now, updated: now });
    const before = await head();
    const first = await mergeNow(db.pool);
    // the merge's count also has what its sweep recorded: agents of earlier tests timing out (once on a loaded CI)
    assert.ok(first.statusEvents >= 500, `each first heartbeat is one event (${first.statusEvents})`);
    const { rows: firsts } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM heartbeat.status_events_after($1, 100000) WHERE agent_id = ANY ($2::uuid[])', [before, ids]);
    assert.equal(Number(firsts[0]!.n), 500, 'each first heartbeat is one event');
    const start = await head();
    for (let round = 0; round < 3; round++) {
      now = await dbNow();
      for (const id of ids) await stage(id, { last: now, updated: now });
      const r = await mergeNow(db.pool);
      assert.equal(r.agentsUpdated, 500);
    }
    // (agents of earlier tests in this database may time out meanwhile: the merge's sweep records those)
    const { rows } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM heartbeat.status_events_after($1, 100000) WHERE agent_id = ANY ($2::uuid[])', [start, ids]);
    assert.equal(Number(rows[0]!.n), 0, 'no event for these agents at steady state');
  });

  test('ids become visible in commit order: a reader never finds a new event below one it saw', async () => {
    const [x, y] = await createAgents(db.pool, 2);
    const now = await dbNow();
    await stage(x!, { last: now, updated: now });
    await stage(y!, { last: now, updated: now });
    await mergeNow(db.pool);
    const start = await head();

    const listener = new pg.Client({ connectionString: db.url });
    await listener.connect();
    const notified: string[] = [];
    listener.on('notification', (m) => { if (m.channel === 'pg_heartbeat_status_events') notified.push(m.payload ?? ''); });
    await listener.query('LISTEN pg_heartbeat_status_events');

    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      // x's disconnect is recorded and numbered in a transaction left open
      await holder.query('BEGIN');
      await holder.query('SELECT heartbeat.disconnect_agent($1, clock_timestamp(), clock_timestamp())', [x]);
      // y's commits meanwhile; its event cannot be numbered before x's commits
      await db.pool.query('SELECT heartbeat.disconnect_agent($1, clock_timestamp(), clock_timestamp())', [y]);
      const ours = async (): Promise<Event[]> => (await eventsAfter(start)).filter((e) => e.agent_id === x || e.agent_id === y);
      assert.deepEqual(await ours(), [], 'nothing visible while the first numbered event is uncommitted');
      await holder.query('COMMIT');
      const afterX = await ours();
      assert.deepEqual(afterX.map((e) => e.agent_id), [x]);
      await sweep();   // publishes what was left pending
      const both = await ours();
      assert.deepEqual(both.map((e) => e.agent_id), [x, y]);
      assert.ok(both[1]!.id > both[0]!.id);
      for (let i = 0; i < 50 && notified.length < 2; i++) await sleep(20);
      assert.equal(notified[0], String(both[0]!.id), 'a NOTIFY per publication, with its highest id');
      assert.ok(notified.length === 2 && Number(notified[1]) >= both[1]!.id, `notified ${notified}`);
    } finally {
      await holder.end();
      await listener.end();
    }
  });

  test('REPEATABLE READ and SERIALIZABLE disconnects record their event once', async () => {
    const ids = await createAgents(db.pool, 2);
    const now = await dbNow();
    for (const id of ids) await stage(id, { last: now, updated: now });
    await mergeNow(db.pool);
    const start = await head();
    for (const [i, level] of ['REPEATABLE READ', 'SERIALIZABLE'].entries()) {
      const c = await db.pool.connect();
      try {
        await c.query(`BEGIN ISOLATION LEVEL ${level}`);
        await c.query('SELECT heartbeat.disconnect_agent($1, clock_timestamp(), clock_timestamp())', [ids[i]]);
        await c.query('COMMIT');
      } finally {
        c.release();
      }
    }
    await sweep();
    assert.deepEqual((await eventsAfter(start)).map((e) => [e.agent_id, brief(e)]), [
      [ids[0], 'connected->disconnected:disconnect'],
      [ids[1], 'connected->disconnected:disconnect'],
    ]);
  });

  test('retention: old events are purged, and a reader that asks for purged events gets HBP01', async () => {
    const ids = await createAgents(db.pool, 20);
    const now = await dbNow();
    for (const id of ids) await stage(id, { last: now, updated: now });
    await mergeNow(db.pool);
    const all = await eventsAfter(0);
    const cut = all[all.length - 10]!.id;   // everything up to this one is "old"
    await db.pool.query(`UPDATE heartbeat.settings SET event_retention = '1 hour'`);
    try {
      await db.pool.query(`UPDATE heartbeat.status_events SET published_at = now() - interval '2 hours' WHERE id <= $1`, [cut]);
      await sweep();
      const { rows } = await db.pool.query<{ purged: string; oldest: string }>(
        'SELECT (SELECT purged_through FROM heartbeat.event_state) AS purged, (SELECT min(id) FROM heartbeat.status_events) AS oldest',
      );
      assert.equal(Number(rows[0]!.purged), cut);
      assert.ok(Number(rows[0]!.oldest) > cut);
      await assert.rejects(eventsAfter(0), (err: { code?: string; message?: string }) => {
        assert.equal(err.code, 'HBP01');
        assert.match(err.message ?? '', /purged/);
        return true;
      });
      assert.equal((await eventsAfter(cut)).length, 9, 'reading from the purge horizon on works');
      assert.ok((await head()) >= cut);
    } finally {
      await db.pool.query(`UPDATE heartbeat.settings SET event_retention = '7 days'`);
    }
  });

  test('a reader-only role reads events but cannot sweep or write them', async () => {
    const role = `hb_events_reader_${randomUUID().slice(0, 8)}`;
    await adminQuery(`CREATE ROLE ${role} LOGIN IN ROLE heartbeat_reader`);
    const u = new URL(db.url);
    u.username = role;
    const reader = new pg.Client({ connectionString: u.toString() });
    await reader.connect();
    try {
      const h = Number((await reader.query('SELECT heartbeat.status_events_head() AS h')).rows[0].h);
      assert.ok(h > 0);
      assert.ok((await eventsAfter(h - 1, reader)).length === 1);
      await assert.rejects(reader.query('SELECT heartbeat.sweep_status()'), { code: '42501' });
      await assert.rejects(
        reader.query(`INSERT INTO heartbeat.status_events VALUES (999999999, gen_random_uuid(), 'a', 'b', 'c', now(), now(), now())`),
        { code: '42501' },
      );
      await assert.rejects(reader.query('SELECT heartbeat.publish_events()'), { code: '42501' });
    } finally {
      await reader.end();
      await adminQuery(`DROP OWNED BY ${role}`).catch(() => {});
      await adminQuery(`DROP ROLE ${role}`);
    }
  });

  test('transition oracle: concurrent mergers, stagers, disconnects and sweeps record each transition once, in order', async () => {
    await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = '1 second'`);
    const pools: pg.Pool[] = [];
    const mergers: ReturnType<typeof startMerger>[] = [];
    const stagers: HeartbeatStager[] = [];
    try {
      const ids = await createAgents(db.pool, 200);
      await sweep();
      const start = await head();
      for (let i = 0; i < 3; i++) {
        const p = new pg.Pool({ connectionString: db.url, max: 4 });
        p.on('error', () => {});
        pools.push(p);
        mergers.push(startMerger({ pool: p }, { intervalMs: 250, logger: silentLogger }));
      }
      const replicas = [randomUUID(), randomUUID()];
      for (let i = 0; i < 2; i++) stagers.push(new HeartbeatStager({ pool: pools[0]! }, { flushIntervalMs: 100, logger: silentLogger }));
      const until = Date.now() + 7_000;
      const rnd = (n: number): number => Math.floor(Math.random() * n);
      const heartbeats = (async () => {
        while (Date.now() < until) {
          // a random half of the fleet heartbeats through a random replica; the others fall silent for a while
          for (const id of ids) {
            if (Math.random() < 0.5) {
              const now = new Date();
              const r = rnd(2);
              stagers[r]!.stage({ agentId: id, firstConnectedAt: now, lastConnectedAt: now, lastConnectedReplicaId: replicas[r]!, updatedAt: now });
            }
          }
          await sleep(200 + rnd(600));
        }
      })();
      const disconnects = (async () => {
        while (Date.now() < until) {
          const now = new Date();
          if (Math.random() < 0.2) await stagers[rnd(2)]!.disconnectReplica(replicas[rnd(2)]!, { disconnectedAt: now, updatedAt: now }).catch(() => {});
          else await stagers[rnd(2)]!.disconnect({ agentId: ids[rnd(ids.length)]!, disconnectedAt: now, updatedAt: now }).catch(() => {});
          await sleep(rnd(100));
        }
      })();
      const sweeps = (async () => {
        while (Date.now() < until) {
          await db.pool.query('SELECT heartbeat.sweep_status()').catch(() => {});
          await sleep(rnd(400));
        }
      })();
      await Promise.all([heartbeats, disconnects, sweeps]);
      // a few agents heartbeat once more after the last disconnect (the storm's last calls may have
      // disconnected both replicas), so some are connected when the fleet falls silent below
      const last = new Date();
      for (const id of ids.slice(0, 10)) {
        stagers[0]!.stage({ agentId: id, firstConnectedAt: last, lastConnectedAt: last, lastConnectedReplicaId: replicas[0]!, updatedAt: last });
      }
      for (const s of stagers) await s.close();
      for (const m of mergers) await m.close();
      mergers.length = 0;
      await mergeNow(db.pool);
      await sweep();
      // the fleet falls silent: every agent still connected goes inactive at the next sweep
      await sleep(1_200);
      await sweep();

      const { problems, events, reasons } = await eventChainProblems(db.pool, ids, () => 'connecting', start);
      assert.ok(events > ids.length, `a busy fleet changes status often (${events} events)`);
      assert.deepEqual(problems.slice(0, 5), [], `${problems.length} problem(s)`);
      for (const r of ['first_heartbeat', 'disconnect', 'reconnect', 'inactivity']) assert.ok(reasons.has(r), `saw ${r}`);
    } finally {
      for (const s of stagers) await s.close().catch(() => {});
      for (const m of mergers) await m.close().catch(() => {});
      for (const p of pools) await p.end().catch(() => {});
      await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = '30 seconds'`);
    }
  });
});

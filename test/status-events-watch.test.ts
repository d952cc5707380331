/**
 * watchStatusChanges() against real PostgreSQL (heartbeat.status_events, sql/015): delivery through LISTEN
 * within 1 s, polling without LISTEN, a 10,000-event storm delivered exactly once across a restart and a killed
 * connection, a frozen (half-open) connection and a blackholed server recovered within the deadlines, retention
 * (EventsPurgedError), a bounded idempotent close(), a throwing onChange, a reader-only role.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { ConnectionError, EventsPurgedError, HeartbeatError, InvalidOptionError, TimeoutError } from '../src/errors.ts';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { type Merger, startMerger } from '../src/merger.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { type StatusChange, type StatusWatcher, watchStatusChanges } from '../src/status-events.ts';
import { adminQuery, createTestDb, type TestDb } from './support/db.ts';
import { startFreezeProxy, type FreezeProxy } from './support/freeze-proxy.ts';
import { waitFor } from './support/wait.ts';

let db: TestDb;
const proxies: FreezeProxy[] = [];
const watchers: StatusWatcher[] = [];
const crashes: unknown[] = [];
const onCrash = (err: unknown): void => void crashes.push(err);

before(async () => {
  process.on('unhandledRejection', onCrash);
  process.on('uncaughtException', onCrash);
  db = await createTestDb('status_events_watch');
});
after(async () => {
  for (const p of proxies) await p.close();
  await Promise.all(watchers.map((w) => w.close()));
  await db?.drop();
  process.off('unhandledRejection', onCrash);
  process.off('uncaughtException', onCrash);
  assert.deepEqual(crashes, [], 'no unhandled rejection or uncaught exception');
});

/** A watcher closed in after() whatever happens. */
function watch(...args: Parameters<typeof watchStatusChanges>): StatusWatcher {
  const w = watchStatusChanges(...args);
  watchers.push(w);
  return w;
}

/** `n` agents connected through `replica` (last heartbeat a second ago), as workspace_agents rows. */
async function connectedAgents(n: number, replica = randomUUID()): Promise<{ ids: string[]; replica: string }> {
  const ids = Array.from({ length: n }, () => randomUUID());
  await db.pool.query(
    `INSERT INTO public.workspace_agents (id, created_at, updated_at, first_connected_at, last_connected_at, last_connected_replica_id)
     SELECT unnest($1::uuid[]), now() - interval '1 minute', now() - interval '1 second', now() - interval '1 minute', now() - interval '1 second', $2`,
    [ids, replica],
  );
  return { ids, replica };
}

const disconnect = async (id: string): Promise<boolean> =>
  (await db.pool.query<{ ok: boolean }>('SELECT heartbeat.disconnect_agent($1, now(), now()) AS ok', [id])).rows[0]!.ok;

const head = async (): Promise<number> =>
  Number((await db.pool.query<{ h: string }>('SELECT heartbeat.status_events_head() AS h')).rows[0]!.h);

async function proxy(): Promise<FreezeProxy> {
  const p = await startFreezeProxy(Number(new URL(db.url).port || 5432));
  proxies.push(p);
  return p;
}

describe('delivery', () => {
  test('LISTEN: each disconnect reaches onChange within 1 s (the backstop poll is 60 s away)', async (t) => {
    const { ids } = await connectedAgents(6);
    assert.equal(await disconnect(ids[5]!), true); // an event before the watcher starts: 'now' skips it
    const got: { event: StatusChange; at: number }[] = [];
    const w = watch({ connectionString: db.url }, {
      pollIntervalMs: 60_000, logger: silentLogger, onChange: (event) => void got.push({ event, at: performance.now() }),
    });
    await w.ready;
    const latencies: number[] = [];
    for (const id of ids.slice(0, 5)) {
      const before = got.length;
      const sent = performance.now();
      assert.equal(await disconnect(id), true);
      await waitFor(() => got.length > before, `the event of ${id}`, 5_000, 1);
      const { event, at } = got.at(-1)!;
      latencies.push(at - sent);
      assert.equal(event.agentId, id);
      assert.equal(event.from, 'connected');
      assert.equal(event.to, 'disconnected');
      assert.equal(event.reason, 'disconnect');
      assert.ok(Math.abs(event.at.getTime() - Date.now()) < 60_000, `at is a recent time: ${event.at.toISOString()}`);
      assert.ok(event.recordedAt instanceof Date && !Number.isNaN(event.recordedAt.getTime()));
      assert.equal(w.lastId, event.id);
    }
    assert.equal(got.length, 5, 'the event from before the start was not delivered');
    assert.ok(got.every((g, i) => i === 0 || g.event.id > got[i - 1]!.event.id), 'ids increase');
    const max = Math.max(...latencies);
    t.diagnostic(`disconnect -> onChange: ${latencies.map((l) => l.toFixed(1)).join(', ')} ms`);
    console.log(`LISTEN latency, disconnect_agent() returned -> onChange: max ${max.toFixed(1)} ms of ${latencies.length}`);
    assert.ok(max < 1000, `every event within 1 s (max ${max.toFixed(1)} ms)`);
    assert.equal(w.stats().connections, 1);
    await w.close();
  });

  test('polling (listen: false) delivers in id order to an iterator; breaking out closes the watcher', async () => {
    const { ids } = await connectedAgents(3);
    const w = watch({ connectionString: db.url }, { listen: false, pollIntervalMs: 100, logger: silentLogger });
    await w.ready;
    for (const id of ids) await disconnect(id);
    const seen: StatusChange[] = [];
    for await (const event of w) {
      seen.push(event);
      if (seen.length === 3) break;
    }
    assert.deepEqual(seen.map((e) => e.agentId), ids);
    assert.equal(w.closed, true, 'break closed it');
    assert.equal(w.lastId, seen[2]!.id);
    assert.equal(await w.done, null);
    // polling connections come from a pool and go back to it: none is held open for LISTEN
    const { rows } = await db.pool.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-heartbeat watch' AND query ILIKE 'LISTEN%'");
    assert.equal(rows.length, 0);
  });

  test('since: a number resumes after that id, with a pool of yours (the LISTEN connection is a client of its own)', async () => {
    const { ids } = await connectedAgents(4);
    const start = await head();
    for (const id of ids) await disconnect(id);
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    pool.on('error', () => {});
    try {
      const w = watch({ pool }, { since: start, logger: silentLogger });
      const seen: string[] = [];
      for await (const e of w) {
        seen.push(e.agentId);
        if (seen.length === 4) break;
      }
      assert.deepEqual(seen, ids);
      assert.equal(pool.totalCount, 0, 'nothing was taken from your pool');
    } finally {
      await pool.end();
    }
  });
});

describe('a storm of 10,000 events', () => {
  test('a watcher closed mid-storm and a new one resuming from its lastId deliver every id exactly once', async (t) => {
    const N = 10_000;
    const { ids, replica } = await connectedAgents(N);
    const first: number[] = [];
    const STOP_AT = 3_456; // in the middle of the fourth read of 1,000
    const a = watch({ connectionString: db.url }, {
      logger: silentLogger,
      onChange: (e) => {
        first.push(e.id);
        if (first.length === STOP_AT) void a.close();
      },
    });
    await a.ready;
    const started = performance.now();
    const { rows } = await db.pool.query<{ n: string }>('SELECT heartbeat.disconnect_replica($1, now(), now()) AS n', [replica]);
    assert.equal(Number(rows[0]!.n), N);
    await a.done;
    assert.equal(first.length, STOP_AT, 'nothing delivered after close()');
    assert.equal(a.lastId, first.at(-1));

    const second: number[] = [];
    const b = watch({ connectionString: db.url }, { since: a.lastId, logger: silentLogger, onChange: (e) => void second.push(e.id) });
    await waitFor(() => first.length + second.length >= N, 'every event', 60_000);
    const ms = performance.now() - started;
    await new Promise((r) => setTimeout(r, 300)); // nothing more comes
    await b.close();
    const expected = (await db.pool.query<{ id: string }>(
      'SELECT id FROM heartbeat.status_events WHERE agent_id = ANY($1::uuid[]) ORDER BY id', [ids],
    )).rows.map((r) => Number(r.id));
    assert.equal(expected.length, N, 'one event per agent in the table');
    assert.deepEqual([...first, ...second], expected, 'every id exactly once, in order, across the restart');
    t.diagnostic(`10,000 events delivered in ${ms.toFixed(0)} ms across a restart at ${STOP_AT}`);
    console.log(`storm: 10,000 disconnect events delivered in ${ms.toFixed(0)} ms (close + resume at ${STOP_AT})`);
  });

  test('a watcher whose connection is killed mid-storm reconnects and still delivers each id once', async () => {
    const N = 10_000;
    const { ids, replica } = await connectedAgents(N);
    const seen: number[] = [];
    const errors: HeartbeatError[] = [];
    let killed = false;
    const w = watch({ connectionString: db.url }, {
      applicationName: 'watch-storm-kill', logger: silentLogger, retryInitialDelayMs: 50, onError: (e) => errors.push(e),
      onChange: async (e) => {
        seen.push(e.id);
        if (seen.length === 4_321 && !killed) {
          killed = true;
          await db.pool.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'watch-storm-kill'");
        }
      },
    });
    await w.ready;
    await db.pool.query('SELECT heartbeat.disconnect_replica($1, now(), now())', [replica]);
    await waitFor(() => seen.length >= N, 'every event', 60_000);
    await new Promise((r) => setTimeout(r, 300));
    await w.close();
    const expected = (await db.pool.query<{ id: string }>(
      'SELECT id FROM heartbeat.status_events WHERE agent_id = ANY($1::uuid[]) ORDER BY id', [ids],
    )).rows.map((r) => Number(r.id));
    assert.deepEqual(seen, expected, 'each id once, in order');
    assert.ok(w.stats().connections >= 2, 'it reconnected');
    assert.ok(errors.some((e) => e instanceof ConnectionError), `onError heard of the lost connection: ${errors.map(String).join('; ')}`);
  });
});

describe('a frozen connection', () => {
  test('a half-open LISTEN connection is found by the backstop poll within pollIntervalMs + timeoutMs; the event arrives on a new one', async (t) => {
    const { ids } = await connectedAgents(2);
    const p = await proxy();
    const errors: { at: number; error: HeartbeatError }[] = [];
    const got: StatusChange[] = [];
    const POLL = 500;
    const TIMEOUT = 1000;
    const w = watch({ connectionString: p.url(db.url) }, {
      pollIntervalMs: POLL, timeoutMs: TIMEOUT, retryInitialDelayMs: 100, retryMaxDelayMs: 500, logger: silentLogger,
      onError: (error) => errors.push({ at: Date.now(), error }), onChange: (e) => void got.push(e),
    });
    await w.ready;
    await waitFor(() => w.stats().reads >= 1, 'the first read');
    await new Promise((r) => setTimeout(r, 100)); // idle now, listening, between two backstop polls
    p.freeze(); // the LISTEN connection goes silent; new connections still work
    const frozenAt = Date.now();
    await disconnect(ids[0]!); // its NOTIFY never arrives on the frozen connection
    await waitFor(() => got.length === 1, 'the event, on a new connection', 15_000);
    const deliveredMs = Date.now() - frozenAt;
    const timeout = errors.find((e) => e.error instanceof TimeoutError);
    assert.ok(timeout, `onError got a TimeoutError: ${errors.map((e) => String(e.error)).join('; ')}`);
    const detectedMs = timeout.at - frozenAt;
    assert.ok(detectedMs <= POLL + TIMEOUT + 1500, `frozen connection detected after ${detectedMs} ms (poll ${POLL} + deadline ${TIMEOUT})`);
    assert.ok(deliveredMs <= POLL + TIMEOUT + 4000, `delivered ${deliveredMs} ms after the freeze`);
    assert.equal(got[0]!.agentId, ids[0]);
    assert.ok(p.accepted >= 2, 'a new connection');

    // a blackhole: new connections are accepted and never answered; connecting times out, then the network heals
    p.freeze({ newConnections: true });
    const errorsBefore = errors.length;
    await disconnect(ids[1]!);
    await waitFor(() => errors.length >= errorsBefore + 2, 'failed reconnects', 15_000);
    assert.equal(got.length, 1, 'nothing delivered while blackholed');
    assert.ok(errors.slice(errorsBefore).every((e) => e.error instanceof TimeoutError), 'each a TimeoutError (the connect deadline)');
    p.thaw();
    const thawedAt = Date.now();
    await waitFor(() => got.length === 2, 'the second event after the thaw', 15_000);
    assert.equal(got[1]!.agentId, ids[1]);
    assert.deepEqual(got.map((e) => e.id), [...new Set(got.map((e) => e.id))], 'no duplicate');
    t.diagnostic(`frozen: detected after ${detectedMs} ms, delivered after ${deliveredMs} ms; blackhole: delivered ${Date.now() - thawedAt} ms after the thaw`);
    console.log(`frozen LISTEN connection (poll ${POLL}, timeoutMs ${TIMEOUT}): TimeoutError after ${detectedMs} ms, event delivered ${deliveredMs} ms after the freeze`);
    await w.close();
  });

  test('close() is bounded while everything is blackholed, idempotent, and nothing is sent after it', async () => {
    const p = await proxy();
    let calls = 0;
    const w = watch({ connectionString: p.url(db.url) }, { timeoutMs: 60_000, pollIntervalMs: 200, logger: silentLogger, onChange: () => void calls++ });
    await w.ready;
    p.freeze({ newConnections: true });
    await new Promise((r) => setTimeout(r, 500)); // a backstop poll is now waiting on the frozen connection (deadline 60 s)
    const started = Date.now();
    const closing = w.close();
    assert.equal(w.close(), closing, 'close() twice is the same promise');
    await closing;
    const ms = Date.now() - started;
    assert.ok(ms < 2_000, `close() took ${ms} ms with a query frozen and a 60 s deadline`);
    assert.equal(await w.done, null);
    const accepted = p.accepted;
    p.thaw();
    const { ids } = await connectedAgents(1);
    await disconnect(ids[0]!);
    await new Promise((r) => setTimeout(r, 700));
    assert.equal(calls, 0, 'no onChange after close()');
    assert.equal(p.accepted, accepted, 'no new connection after close()');
    await w.close();
  });

  test('close() before the first connection is made rejects ready with a ClosedError', async () => {
    const p = await proxy();
    p.freeze({ newConnections: true });
    const w = watch({ connectionString: p.url(db.url) }, { logger: silentLogger });
    await new Promise((r) => setTimeout(r, 100));
    const started = Date.now();
    await w.close();
    assert.ok(Date.now() - started < 2_000);
    await assert.rejects(w.ready, (err) => err instanceof HeartbeatError && err.code === 'CLOSED');
  });
});

describe('retention', () => {
  test('resuming from before the retention horizon stops the watcher with EventsPurgedError; onPurged: skip goes on', async () => {
    const { ids } = await connectedAgents(5);
    const start = await head();
    for (const id of ids) await disconnect(id);
    const { kept, through } = await purgeOldest(2, ids); // the first two of these events are gone
    const errors: HeartbeatError[] = [];
    const w = watch({ connectionString: db.url }, { since: start, logger: silentLogger, onError: (e) => errors.push(e) });
    await w.ready;
    const iterated = (async () => {
      for await (const _ of w) assert.fail('no event is delivered past a gap');
    })();
    await assert.rejects(iterated, (err) => err instanceof EventsPurgedError && err.code === 'EVENTS_PURGED' && err.sqlState === 'HBP01');
    const done = await w.done;
    assert.ok(done instanceof EventsPurgedError, String(done));
    assert.equal(done.afterId, start);
    assert.equal(done.purgedThrough, through, 'the database said where what is left starts');
    assert.equal(w.closed, true);
    assert.ok(errors[0] instanceof EventsPurgedError, 'onError heard it too');

    const skipping = watch({ connectionString: db.url }, { since: start, onPurged: 'skip', logger: silentLogger });
    const seen: number[] = [];
    for await (const e of skipping) {
      seen.push(e.id);
      if (seen.length === kept.length) break;
    }
    assert.deepEqual(seen, kept, 'skip: from the oldest retained event on');
  });
});

describe('onChange that throws', () => {
  test('a failing event is offered again; one that always fails is skipped after handlerAttempts; the watcher goes on', async () => {
    const { ids } = await connectedAgents(3);
    const attempts = new Map<string, number>();
    const delivered: string[] = [];
    const errors: HeartbeatError[] = [];
    const w = watch({ connectionString: db.url }, {
      handlerAttempts: 3, logger: silentLogger, onError: (e) => errors.push(e),
      onChange: async (e) => {
        const n = (attempts.get(e.agentId) ?? 0) + 1;
        attempts.set(e.agentId, n);
        if (e.agentId === ids[0] && n === 1) throw new Error('transient');
        if (e.agentId === ids[1]) return Promise.reject(new Error('poison'));
        delivered.push(e.agentId);
      },
    });
    await w.ready;
    for (const id of ids) await disconnect(id);
    await waitFor(() => delivered.length === 2, 'the good events', 15_000);
    assert.deepEqual(delivered, [ids[0], ids[2]]);
    assert.equal(attempts.get(ids[0]!), 2, 'offered again after a throw');
    assert.equal(attempts.get(ids[1]!), 3, 'the poison event: handlerAttempts times, then skipped');
    assert.equal(w.stats().skipped, 1);
    assert.ok(errors.every((e) => e.code === 'HANDLER_FAILED') && errors.length === 4, errors.map(String).join('; '));
    assert.match(errors.at(-1)!.message, /\(attempt 3 of 3\): poison; skipped it$/);
    assert.equal(w.closed, false);
    await w.close();
  });
});

describe('options and roles', () => {
  test('bad options throw InvalidOptionError at once; iterating a watcher that has onChange is refused', () => {
    for (const bad of [{ since: -1 }, { since: 1.5 }, { since: 'later' }, { batchSize: 0 }, { timeoutMs: 0 }, { onPurged: 'ignore' }, { sinse: 3 }]) {
      assert.throws(() => watchStatusChanges({ connectionString: db.url }, bad as never), InvalidOptionError, JSON.stringify(bad));
    }
    const w = watch({ connectionString: db.url }, { onChange: () => {}, logger: silentLogger });
    assert.throws(() => w[Symbol.asyncIterator](), InvalidOptionError);
  });

  test('a role with only heartbeat_reader can watch', async () => {
    const role = `watch_reader_${randomUUID().slice(0, 8)}`;
    await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN IN ROLE heartbeat_reader`);
    try {
      const { ids } = await connectedAgents(1);
      const u = new URL(db.url);
      u.username = role;
      const w = watch({ connectionString: u.toString() }, { logger: silentLogger });
      await w.ready;
      await disconnect(ids[0]!);
      for await (const e of w) {
        assert.equal(e.agentId, ids[0]);
        break;
      }
    } finally {
      await adminQuery(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
    }
  });
});

describe('events from the merge and the sweep', () => {
  test('first heartbeat: within 1 s of the merge; inactivity: within inactive timeout + merge interval + 1 s of the last heartbeat', async (t) => {
    const agentId = randomUUID();
    await db.pool.query("INSERT INTO public.workspace_agents (id, updated_at) VALUES ($1, now() - interval '1 minute')", [agentId]);
    const got: { event: StatusChange; at: number }[] = [];
    const w = watch({ connectionString: db.url }, {
      pollIntervalMs: 60_000, logger: silentLogger,
      onChange: (event) => void (event.agentId === agentId && got.push({ event, at: Date.now() })),
    });
    await w.ready;
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    const INACTIVE_MS = 2_000;
    const INTERVAL_MS = 500;
    let merger: Merger | undefined;
    try {
      const heartbeat = new Date();
      stager.stage({ agentId, firstConnectedAt: heartbeat, lastConnectedAt: heartbeat, updatedAt: heartbeat });
      await stager.flush();
      await mergeNow(db.pool);
      const merged = Date.now();
      await waitFor(() => got.length === 1, 'the first_heartbeat event', 5_000, 1);
      const first = got[0]!;
      assert.deepEqual([first.event.from, first.event.to, first.event.reason], ['connecting', 'connected', 'first_heartbeat']);
      assert.equal(first.event.at.getTime(), heartbeat.getTime(), 'at: the heartbeat that connected it');
      assert.ok(first.at - merged < 1000, `delivered ${first.at - merged} ms after the merge`);

      await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = make_interval(secs => $1::float8 / 1000)`, [INACTIVE_MS]);
      merger = startMerger({ connectionString: db.url }, { intervalMs: INTERVAL_MS, logger: silentLogger });
      await waitFor(() => got.length === 2, 'the inactivity event', 15_000, 5);
      const second = got[1]!;
      assert.deepEqual([second.event.from, second.event.to, second.event.reason], ['connected', 'disconnected', 'inactivity']);
      const afterLast = second.at - heartbeat.getTime();
      const bound = INACTIVE_MS + INTERVAL_MS * 1.1 + 1000;
      t.diagnostic(`first_heartbeat ${first.at - merged} ms after the merge; inactivity ${afterLast} ms after the last heartbeat (bound ${bound})`);
      assert.ok(afterLast < bound + 1000, `inactivity delivered ${afterLast} ms after the last heartbeat (target ${bound} ms)`);
    } finally {
      await merger?.close();
      await stager.close();
      await db.pool.query(`UPDATE heartbeat.settings SET inactive_timeout = interval '30 seconds'`);
      await w.close();
    }
  });
});

/**
 * Purges the oldest `n` events of `ids` as heartbeat.purge_events() does (sql/015): deletes them and records
 * heartbeat.event_state.purged_through. Returns the ids of the events kept (in order) and the horizon.
 */
async function purgeOldest(n: number, ids: string[]): Promise<{ kept: number[]; through: number }> {
  const all = (await db.pool.query<{ id: string }>('SELECT id FROM heartbeat.status_events WHERE agent_id = ANY($1::uuid[]) ORDER BY id', [ids]))
    .rows.map((r) => Number(r.id));
  const through = all[n - 1]!;
  await db.pool.query('DELETE FROM heartbeat.status_events WHERE id <= $1', [through]);
  await db.pool.query('UPDATE heartbeat.event_state SET purged_through = GREATEST(purged_through, $1)', [through]);
  return { kept: all.slice(n), through };
}

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { InvalidOptionError, MigrationsMissingError, type HeartbeatError } from '../src/errors.ts';
import { checkTimingInvariant } from '../src/invariant.ts';
import type { Logger } from '../src/logger.ts';
import { migrate } from '../src/migrate.ts';
import { silentLogger } from '../src/logger.ts';
import { startMerger, type MergeReport } from '../src/merger.ts';
import { mergeNow } from '../src/merge.ts';
import { agentRow, createAgents, createTestDb, stageBacklog, stagedCount, type TestDb } from './support/db.ts';
import { startFreezeProxy } from './support/freeze-proxy.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('merger');
});
after(async () => {
  await db.drop();
});

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface LogLine { level: string; message: string; meta?: Record<string, unknown> }
function captureLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const at = (level: string) => (message: string, meta?: Record<string, unknown>) => void lines.push({ level, message, meta });
  return { lines, logger: { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') } };
}

async function stage(agentIds: string[], at: Date): Promise<void> {
  await db.pool.query(
    `INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
     SELECT id, $2, $2, $2 FROM unnest($1::uuid[]) AS id`,
    [agentIds, at],
  );
}

/** Holds a row lock on one agent (as a long application transaction would) until release(). */
async function lockAgent(agentId: string): Promise<{ release(): Promise<void> }> {
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  await client.query('BEGIN');
  await client.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [agentId]);
  return {
    release: async () => {
      await client.query('ROLLBACK');
      await client.end();
    },
  };
}

/** Part merges recorded in heartbeat.merge_state (every part's counter). */
async function mergesTotal(): Promise<number> {
  const { rows } = await db.pool.query<{ n: string }>('SELECT COALESCE(sum(merges_total), 0) AS n FROM heartbeat.merge_state');
  return Number(rows[0]!.n);
}

describe('startMerger', () => {
  test('merges on its interval: staged heartbeats reach workspace_agents, counts go to onMerge and the logger', async () => {
    const ids = await createAgents(db.pool, 3);
    const at = new Date(Date.now() - 1000);
    await stage(ids, at);
    const reports: MergeReport[] = [];
    const { logger, lines } = captureLogger();
    const merger = startMerger({ connectionString: db.url }, { intervalMs: 50, logger, onMerge: (r) => reports.push(r) });
    try {
      await waitFor('three merges', () => reports.length >= 3);
    } finally {
      await merger.stop();
    }
    const worked = reports.filter((r) => r.rowsConsumed > 0);
    assert.equal(worked.length, 1, 'the three staged rows were consumed by exactly one merge');
    assert.equal(worked[0]!.agentsUpdated, 3);
    assert.ok(worked[0]!.durationMs >= 0 && worked[0]!.startedAt instanceof Date);
    for (const id of ids) assert.deepEqual((await agentRow(db.pool, id)).last_connected_at, at);
    assert.equal(await stagedCount(db.pool), 0);
    const info = lines.filter((l) => l.level === 'info');
    assert.ok(info.length >= 3, 'every merge is logged');
    assert.equal(info.find((l) => l.meta?.rowsConsumed === 3)?.meta?.agentsUpdated, 3, 'the log carries the counts');
    assert.ok(info.every((l) => typeof l.meta?.durationMs === 'number'), 'and the duration');
    assert.equal(merger.stats().merges, reports.length);
  });

  test('two mergers on separate pools never merge a part at the same time: one skips it without waiting', async () => {
    const ids = await createAgents(db.pool, 20);
    const before = await mergesTotal();
    // one locked row makes every merge of its part take lock_timeout (2 s), so the mergers collide on that part
    const lock = await lockAgent(ids[0]!);
    const reports: MergeReport[] = [];
    const options = { intervalMs: 30, jitter: 0, logger: silentLogger, onMerge: (r: MergeReport) => reports.push(r) };
    const a = startMerger({ connectionString: db.url }, options);
    const b = startMerger({ connectionString: db.url }, options);
    try {
      await stage(ids, new Date(Date.now() - 1000));
      await waitFor('a part skipped because the other merger held it, and merges that did work', () =>
        reports.some((r) => r.partsSkippedConcurrent > 0) && reports.filter((r) => r.partsMerged > 0).length >= 2);
    } finally {
      await lock.release();
    }
    try {
      await waitFor('the locked agent merged too', async () => (await agentRow(db.pool, ids[0]!)).last_connected_at !== null);
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
    const contended = reports.filter((r) => r.partsSkippedConcurrent > 0 && r.partsMerged === 0);
    for (const r of contended) {
      assert.equal(r.rowsConsumed + r.agentsUpdated, 0, 'a tick that merged no part did nothing');
      assert.ok(r.durationMs < 2000, 'and did not wait for the running merge (lock_timeout is 2 s)');
    }
    const partMerges = reports.reduce((n, r) => n + r.partsMerged, 0);
    assert.equal(await mergesTotal() - before, partMerges, 'every part merge that ran is in merge_state, none twice');
    const consumed = reports.reduce((n, r) => n + r.rowsConsumed, 0);
    const deferred = reports.reduce((n, r) => n + r.deferredLocked, 0);
    assert.equal(consumed, 20 + deferred, 'each staged row consumed once (re-staged locked rows once more each time)');
    assert.equal(reports.reduce((n, r) => n + r.agentsUpdated, 0), 20, 'each agent updated exactly once');
  });

  test('replicas do not multiply merges: a part another merger merged just now is skipped', async () => {
    const reports: MergeReport[][] = [[], [], []];
    const mergers = reports.map((list) =>
      // listen: false: this is the SQL's own skip (a merger that hears the others skips without asking: below)
      startMerger({ connectionString: db.url }, { intervalMs: 300, listen: false, logger: silentLogger, onMerge: (r) => list.push(r) }));
    try {
      await new Promise((r) => setTimeout(r, 3200));
    } finally {
      await Promise.all(mergers.map((m) => m.close()));
    }
    const all = reports.flat();
    const merged = all.reduce((n, r) => n + r.partsMerged, 0) / (all[0]?.parts ?? 1);
    // three replicas tick 3 x ~10 times in 3.2 s; without the skip each would merge every part every tick
    assert.ok(all.length >= 24, `ticks: ${all.length}`);
    assert.ok(merged <= 16, `merges of every part: ${merged} for ${all.length} ticks of 3 replicas`);
    assert.ok(all.reduce((n, r) => n + r.partsSkippedRecent, 0) > 0, 'parts were skipped as merged recently');
  });

  test('stop() is idempotent and safe to call concurrently; nothing runs afterwards; asyncDispose stops it', async () => {
    let merges = 0;
    const merger = startMerger({ connectionString: db.url }, { intervalMs: 20, logger: silentLogger, onMerge: () => merges++ });
    await waitFor('a merge', () => merges >= 1);
    const first = merger.stop();
    const second = merger.stop();
    assert.equal(first, second, 'concurrent stop() calls share one shutdown');
    await Promise.all([first, second, merger[Symbol.asyncDispose]()]);
    await merger.stop();
    assert.equal(merger.stopped, true);
    const seen = merges;
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(merges, seen, 'no merge after stop()');

    let disposedMerges = 0;
    {
      await using m = startMerger({ connectionString: db.url }, { intervalMs: 20, logger: silentLogger, onMerge: () => disposedMerges++ });
      await waitFor('a merge', () => disposedMerges >= 1);
      assert.equal(m.stopped, false);
    }
    const afterDispose = disposedMerges;
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(disposedMerges, afterDispose, 'await using stopped it');
  });

  test('stop() during a merge waits for that merge (on the caller\'s pool, which it leaves open)', async () => {
    const [id] = await createAgents(db.pool, 1);
    const lock = await lockAgent(id!);
    await stage([id!], new Date(Date.now() - 1000));
    const events: string[] = [];
    const reports: MergeReport[] = [];
    const app = `merger-stop-${process.pid}`;
    const pool = new pg.Pool({ connectionString: db.url, application_name: app, max: 1 });
    const merger = startMerger({ pool }, {
      intervalMs: 10, logger: silentLogger,
      onMerge: (r) => { events.push('merged'); reports.push(r); },
    });
    try {
      await waitFor('the merge waiting for the locked row', async () => {
        const { rows } = await db.pool.query(
          "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE '%merge_%'",
          [app],
        );
        return rows.length > 0;
      });
      assert.equal(events.length, 0);
      await merger.stop();
      events.push('stopped');
      assert.deepEqual(events, ['merged', 'stopped'], 'stop() resolved only after the merge in progress finished');
      assert.equal(reports[0]!.deferredLocked, 1, 'the merge finished normally (the locked agent was re-staged)');
      assert.equal((await pool.query('SELECT 1 AS ok')).rows[0].ok, 1, 'the caller\'s pool is still usable');
    } finally {
      await lock.release();
      await pool.end();
    }
  });

  test('stop() ends the pool it created from a connection string', async () => {
    const app = `merger-owned-${process.pid}`;
    let merges = 0;
    const merger = startMerger({ connectionString: db.url }, { intervalMs: 10, logger: silentLogger, applicationName: app, onMerge: () => merges++ });
    await waitFor('a merge', () => merges >= 1);
    const connected = await db.pool.query('SELECT 1 FROM pg_stat_activity WHERE application_name = $1', [app]);
    assert.equal(connected.rows.length, 1);
    await merger.stop();
    await waitFor('its connection to close', async () =>
      (await db.pool.query('SELECT 1 FROM pg_stat_activity WHERE application_name = $1', [app])).rows.length === 0, 5_000);
  });

  test('a failing merge is logged, passed to onError and retried; it never crashes; it recovers', async () => {
    const broken = await createTestDb('merger_unmigrated', { migrated: false });
    const unhandled: unknown[] = [];
    const onUnhandled = (err: unknown): void => void unhandled.push(err);
    process.on('unhandledRejection', onUnhandled);
    const errors: HeartbeatError[] = [];
    const reports: MergeReport[] = [];
    const { logger, lines } = captureLogger();
    const merger = startMerger({ connectionString: broken.url }, {
      intervalMs: 20, logger, onError: (e) => errors.push(e), onMerge: (r) => reports.push(r),
    });
    try {
      await waitFor('three failed merges', () => errors.length >= 3);
      assert.ok(errors.every((e) => e instanceof MigrationsMissingError), String(errors[0]));
      assert.equal(merger.stats().consecutiveFailures >= 3, true);
      const logged = lines.filter((l) => l.level === 'error');
      assert.ok(logged.length >= 3);
      assert.match(logged[0]!.message, /run the migrations.*retrying/);
      await migrate({ connectionString: broken.url }, { logger: silentLogger });
      await waitFor('a merge after the migrations', () => reports.length >= 1);
      assert.equal(merger.stats().consecutiveFailures, 0);
    } finally {
      await merger.stop();
      process.off('unhandledRejection', onUnhandled);
      await broken.drop();
    }
    assert.deepEqual(unhandled, []);
  });

  test('a throwing hook is logged and the loop goes on', async () => {
    let calls = 0;
    const { logger, lines } = captureLogger();
    const merger = startMerger({ connectionString: db.url }, {
      intervalMs: 20, logger, onMerge: () => { calls++; throw new Error('hook bug'); },
    });
    try {
      await waitFor('two merges', () => calls >= 2);
    } finally {
      await merger.stop();
    }
    assert.ok(lines.some((l) => l.level === 'warn' && /onMerge hook threw/.test(l.message)));
  });

  test('bad options are rejected before anything starts, with a typed error naming the option', () => {
    const bad: [Record<string, unknown>, string][] = [
      [{ intervalMs: 0 }, 'intervalMs'], [{ intervalMs: 2 ** 31 }, 'intervalMs'], [{ intervalMs: Number.NaN }, 'intervalMs'],
      [{ jitter: 1 }, 'jitter'], [{ queryTimeoutMs: -5 }, 'queryTimeoutMs'], [{ maxRows: 1.5 }, 'maxRows'],
      [{ parallelism: 0 }, 'parallelism'], [{ stopTimeoutMs: 2 ** 40 }, 'stopTimeoutMs'], [{ onMerge: 'x' }, 'onMerge'],
      [{ align: 1 }, 'align'], [{ listen: 'yes' }, 'listen'],
    ];
    for (const [options, option] of bad) {
      assert.throws(() => startMerger({ connectionString: db.url }, options as never),
        (e: unknown) => e instanceof InvalidOptionError && e.option === option, JSON.stringify(options));
    }
    assert.throws(() => startMerger(null as never), TypeError);
  });
});

/** A pool that counts checkouts: every statement the merger sends (a merge, a sweep) takes one. */
function countingPool(url: string, options: pg.PoolConfig = {}): { pool: pg.Pool; checkouts: () => number } {
  const pool = new pg.Pool({ connectionString: url, max: 2, ...options });
  pool.on('error', () => {});
  let n = 0;
  pool.on('acquire', () => void n++);
  return { pool, checkouts: () => n };
}

/** Backends of the LISTEN connection of the merger started with this applicationName. */
async function listenBackends(applicationName: string): Promise<number[]> {
  const { rows } = await db.pool.query<{ pid: number }>(
    'SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()', [`${applicationName} listen`]);
  return rows.map((r) => r.pid);
}

describe('ticks on the grid, and skipping a tick another merger did (NOTIFY)', () => {
  test('ticks fall on the wall-clock grid: multiples of intervalMs since the epoch, plus at most jitter x interval', async () => {
    const INTERVAL = 400;
    const reports: MergeReport[] = [];
    const merger = startMerger({ connectionString: db.url }, {
      intervalMs: INTERVAL, jitter: 0.1, listen: false, logger: silentLogger, onMerge: (r) => reports.push(r),
    });
    try {
      await waitFor('four ticks', () => reports.length >= 4);
    } finally {
      await merger.close();
    }
    const phases = reports.map((r) => r.startedAt.getTime() % INTERVAL);
    // offsets are 0..40 ms; a busy machine's timer lag on top, still far from a free-running phase
    for (const phase of phases) assert.ok(phase < 40 + 120, `tick phases (ms after a grid instant): ${phases}`);
    const slots = reports.map((r) => Math.floor(r.startedAt.getTime() / INTERVAL));
    assert.equal(new Set(slots).size, slots.length, `one tick per grid slot: ${slots}`);
  });

  test('a merger that hears another merger\'s merge of every part skips its tick without sending a statement', async () => {
    const ids = await createAgents(db.pool, 10);
    const INTERVAL = 1000;
    // three replicas as deployed: the one whose merge of every part was announced last ticks at each grid instant,
    // the others 250 to 500 ms later, after its NOTIFY, and skip
    const replicas = [0, 1, 2].map((i) => {
      const counted = countingPool(db.url);
      const reports: MergeReport[] = [];
      const merger = startMerger({ pool: counted.pool }, {
        intervalMs: INTERVAL, jitter: 0.5, logger: silentLogger, onMerge: (r) => reports.push(r), applicationName: `notify-${i}`,
      });
      return { counted, reports, merger };
    });
    try {
      await waitFor('every replica listening', () => replicas.every((r) => r.merger.stats().listenConnections === 1));
      // two intervals to settle who leads
      await new Promise((r) => setTimeout(r, 2 * INTERVAL));
      const start = replicas.map((r) => ({ stats: r.merger.stats(), checkouts: r.counted.checkouts(), reports: r.reports.length }));
      const feeding = setInterval(() => void stage(ids, new Date()).catch(() => {}), 100);
      try {
        await new Promise((r) => setTimeout(r, 8 * INTERVAL));
      } finally {
        clearInterval(feeding);
      }
      let skipped = 0;
      let asked = 0;
      let merged = 0;
      for (const [i, r] of replicas.entries()) {
        const s = r.merger.stats();
        const s0 = start[i]!.stats;
        const ownSkipped = s.skippedNotified - s0.skippedNotified;
        const ownAsked = s.merges + s.skippedRecent + s.skippedConcurrent + s.failures - (s0.merges + s0.skippedRecent + s0.skippedConcurrent + s0.failures);
        const checkouts = r.counted.checkouts() - start[i]!.checkouts;
        assert.ok(checkouts <= 2 * ownAsked, `replica ${i}: ${checkouts} statements for ${ownAsked} ticks that asked: a skipped tick sends none`);
        skipped += ownSkipped;
        asked += ownAsked;
        merged += r.reports.slice(start[i]!.reports).filter((x) => x.partsMerged > 0).length;
      }
      console.log(`3 replicas over 8 intervals: ${skipped} ticks skipped on NOTIFY, ${asked} asked the database, ${merged} merged`);
      // 24 ticks: on a quiet machine 8 merge and 16 skip; a late timer now and then makes two of them ask
      assert.ok(skipped >= 10, `ticks skipped on notifications: ${skipped} (asked: ${asked})`);
      assert.ok(merged >= 7, `every interval merged: ${merged} merges in 8 intervals`);
    } finally {
      await Promise.all(replicas.map((r) => r.merger.close()));
      await Promise.all(replicas.map((r) => r.counted.pool.end()));
    }
    await mergeNow({ pool: db.pool });
    for (const id of ids) assert.notEqual((await agentRow(db.pool, id)).last_connected_at, null, 'the staged heartbeats were merged');
  });

  test('safe direction: with its LISTEN connection killed (pg_terminate_backend) a merger merges every interval, and listens again', async () => {
    const ids = await createAgents(db.pool, 5);
    const INTERVAL = 300;
    const reports: MergeReport[] = [];
    const merger = startMerger({ connectionString: db.url }, {
      intervalMs: INTERVAL, logger: silentLogger, onMerge: (r) => reports.push(r), applicationName: 'killed-listen',
    });
    try {
      await waitFor('listening', async () => (await listenBackends('killed-listen')).length === 1 && merger.stats().listenConnections === 1);
      const [pid] = await listenBackends('killed-listen');
      await db.pool.query('SELECT pg_terminate_backend($1)', [pid]);
      const before = reports.length;
      const at = new Date(Date.now() - 1000);
      await stage(ids, at);
      await waitFor('the staged rows merged', async () => (await agentRow(db.pool, ids[0]!)).last_connected_at !== null, 5000);
      await new Promise((r) => setTimeout(r, 6 * INTERVAL));
      assert.ok(reports.length - before >= 5, `ticks that merged after the kill: ${reports.length - before} in ~7 intervals`);
      assert.equal(merger.stats().skippedNotified, 0, 'alone, it never skips a tick');
      await waitFor('a new LISTEN connection', async () => merger.stats().listenConnections >= 2 && (await listenBackends('killed-listen')).length === 1, 10_000);
      assert.equal(merger.stats().failures, 0);
    } finally {
      await merger.close();
    }
    // the backend leaves pg_stat_activity a moment after the connection closed
    await waitFor('close() to close the LISTEN connection', async () => (await listenBackends('killed-listen')).length === 0, 5000);
  });

  test('safe direction: with its LISTEN connection frozen (half-open) a merger asks the database on every tick, and reconnects', async () => {
    await createAgents(db.pool, 5);
    const INTERVAL = 500;
    const proxy = await startFreezeProxy(Number(new URL(db.url).port || 5432));
    // maxUses 1: each statement on a fresh connection, so only the long-lived LISTEN connection stays frozen
    const counted = countingPool(proxy.url(db.url), { maxUses: 1 });
    const leader = startMerger({ connectionString: db.url }, { intervalMs: INTERVAL, jitter: 0, logger: silentLogger, applicationName: 'frozen-leader' });
    const follower = startMerger({ pool: counted.pool }, {
      intervalMs: INTERVAL, jitter: 0.2, queryTimeoutMs: 2000, logger: silentLogger, applicationName: 'frozen-follower',
    });
    const asked = (): number => {
      const s = follower.stats();
      return s.merges + s.skippedRecent + s.skippedConcurrent;
    };
    try {
      await waitFor('the follower skipping on notifications', () => follower.stats().skippedNotified >= 3, 10_000);
      proxy.freeze(); // existing connections go silent: the LISTEN one; new connections still work
      // a notification heard just before the freeze may still skip the tick of its slot (a late timer on a busy machine)
      await new Promise((r) => setTimeout(r, 2 * INTERVAL));
      const skippedAtFreeze = follower.stats().skippedNotified;
      const askedAtFreeze = asked();
      let deaf = { skipped: skippedAtFreeze, asked: askedAtFreeze };
      // the database keeps saying "merged by another just now" while nothing is heard (after 3 such ticks), or its
      // own merge of every part is not heard back: the follower drops the frozen connection and listens on a new one
      await waitFor('a new LISTEN connection', () => {
        if (follower.stats().listenConnections >= 2) return true;
        deaf = { skipped: follower.stats().skippedNotified, asked: asked() };
        return false;
      }, 15_000);
      assert.equal(deaf.skipped, skippedAtFreeze, 'while deaf, nothing heard, nothing skipped');
      assert.ok(deaf.asked - askedAtFreeze >= 1, `while deaf, its ticks asked the database (${deaf.asked - askedAtFreeze})`);
      await waitFor('skipping on notifications again', () => follower.stats().skippedNotified > skippedAtFreeze, 10_000);
      assert.equal(follower.stats().failures, 0);
    } finally {
      await Promise.all([leader.close(), follower.close()]);
      await counted.pool.end();
      await proxy.close();
    }
  });
});

describe('the timing invariant', () => {
  test('checkTimingInvariant: defaults hold (5 + 15 + 5 < 30 s); a slow merge or long heartbeat breaks it', () => {
    assert.deepEqual(checkTimingInvariant(), { ok: true, worstCaseMs: 25_000, inactiveTimeoutMs: 30_000 });
    const slow = checkTimingInvariant({ mergeIntervalMs: 15_000 });
    assert.equal(slow.ok, false);
    assert.equal(slow.worstCaseMs, 35_000);
    assert.match(slow.message!, /inactive timeout 30000 ms/);
    assert.equal(checkTimingInvariant({ heartbeatIntervalMs: 20_000, inactiveTimeoutMs: 60_000 }).ok, true);
    assert.equal(checkTimingInvariant({ flushIntervalMs: 10_000 }).ok, false, 'equal is not below');
    assert.throws(() => checkTimingInvariant({ flushIntervalMs: -1 }), RangeError);
  });

  test('startMerger warns when its configuration breaks the invariant, and only then', async () => {
    const ok = captureLogger();
    await startMerger({ connectionString: db.url }, { logger: ok.logger }).stop();
    assert.equal(ok.lines.filter((l) => l.level === 'warn').length, 0);
    const bad = captureLogger();
    await startMerger({ connectionString: db.url }, { logger: bad.logger, heartbeatIntervalMs: 25_000 }).stop();
    const warned = bad.lines.filter((l) => l.level === 'warn');
    assert.equal(warned.length, 1);
    assert.match(warned[0]!.message, /heartbeat interval 25000 ms .* inactive timeout 30000 ms/);
  });
});

describe('a backlog: fan-out over the parts', () => {
  test('a tick whose call over every part leaves rows merges the parts in parallel at once; the next tick goes straight to one call per part', async () => {
    const fan = await createTestDb('merger_fanout');
    const sent: string[] = [];
    const pool = new pg.Pool({ connectionString: fan.url, max: 4 });
    pool.on('error', () => {});
    pool.on('connect', (client) => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown;
      (client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        const text = typeof args[0] === 'string' ? args[0] : (args[0] as { text?: string }).text ?? '';
        const m = /heartbeat\.(merge_agent_connections|merge_staging_part)\(/.exec(text);
        if (m) sent.push(m[1]!);
        return query(...args);
      };
    });
    try {
      await stageBacklog(fan.pool, 20_000);
      // at most 100 staged rows per statement (25 per part in a call over every part): 200 statements and more,
      // in ticks of at most 200 ms each
      const ticks: { report: MergeReport; statements: string[] }[] = [];
      let mark = 0;
      const merger = startMerger({ pool }, {
        intervalMs: 200, jitter: 0, maxRows: 100, parallelism: 4, listen: false, logger: silentLogger,
        onMerge: (report) => {
          ticks.push({ report, statements: sent.slice(mark) });
          mark = sent.length;
        },
      });
      try {
        await waitFor('the backlog drained', async () => (await stagedCount(fan.pool)) === 0, 120_000);
      } finally {
        await merger.close();
      }
      const [first] = ticks;
      assert.equal(first!.statements[0], 'merge_agent_connections', 'a tick begins with one call over every part');
      // that call left rows: the same tick merges the parts in parallel — unless that one call took the whole
      // tick (a loaded CI machine), which then left rows, so the next tick fans out (checked below)
      assert.ok(first!.report.parallel || (first!.report.more && first!.report.durationMs >= 200),
        `that call left rows: the same tick merged the parts in parallel (${first!.statements.join(', ')} in ${first!.report.durationMs} ms)`);
      if (first!.report.parallel) {
        assert.ok(first!.statements.slice(1).length > 0 && first!.statements.slice(1).every((x) => x === 'merge_staging_part'));
      }
      const afterBacklog = ticks.filter((_, i) => i > 0 && ticks[i - 1]!.report.more);
      assert.ok(afterBacklog.length > 0, `the backlog outlasted a tick (${ticks.length} ticks)`);
      for (const t of afterBacklog) {
        assert.ok(t.statements.length > 0 && t.statements.every((x) => x === 'merge_staging_part'),
          `after a tick that left rows: straight to one call per part (${t.statements.join(', ')})`);
      }
      const { rows } = await fan.pool.query('SELECT count(*)::int AS n FROM public.workspace_agents WHERE last_connected_at IS NOT NULL');
      assert.equal(rows[0].n, 20_000, 'every agent merged');
    } finally {
      await pool.end();
      await fan.drop();
    }
  });
});

describe('statement_timeout shorter than a merge statement', () => {
  test('the merger halves its rows per statement (warning once per halving) and drains without a failed tick', async () => {
    const tight = await createTestDb('merger_tight');
    try {
      await stageBacklog(tight.pool, 200_000);
      // one statement of 200,000 rows takes longer than this here (1.5 s and more); 1,000 rows, the least a
      // statement is halved to, a few tens of ms even with parts in parallel: room for a loaded CI machine (at
      // 300 ms and 50,000 rows, statements of the least budget timed out there)
      await tight.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 200000');
      await tight.pool.query(`ALTER DATABASE ${pg.escapeIdentifier(tight.name)} SET statement_timeout = '1s'`);
      const warnings: string[] = [];
      const errors: HeartbeatError[] = [];
      const logger: Logger = { ...silentLogger, warn: (m) => void warnings.push(m) };
      const merger = startMerger({ connectionString: tight.url }, { intervalMs: 100, jitter: 0, logger, onError: (e) => void errors.push(e) });
      try {
        const until = Date.now() + 60_000;
        while ((await stagedCount(tight.pool)) > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
      } finally {
        await merger.close();
      }
      assert.equal(await stagedCount(tight.pool), 0, 'drained');
      assert.ok(warnings.some((w) => /statement_timeout; this merger now merges at most \d+ staged rows per statement/.test(w)), warnings.join('\n'));
      assert.deepEqual(errors.map(String), [], 'no failed tick');
      const { rows } = await tight.pool.query("SELECT count(*)::int AS n FROM public.workspace_agents WHERE last_connected_at IS NOT NULL");
      assert.equal(rows[0].n, 200_000, 'every agent merged');
    } finally {
      await tight.drop();
    }
  });

  test('when statements of the least budget still time out with parts in parallel, fewer parts at once', async () => {
    const slow = await createTestDb('merger_parallel_cap');
    try {
      await stageBacklog(slow.pool, 8_000);
      // a server that cannot afford merges side by side: a merge statement of one part sleeps past
      // statement_timeout whenever another one runs at the same time (alone it takes 0.15 s more, whatever its
      // rows, so statements sent together overlap; a call over every part is not slowed)
      await slow.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 2000');
      await slow.pool.query(`CREATE FUNCTION public.crowded() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          -- another merge's update holds this until its transaction ends (the trigger runs as the merge's
          -- definer role, which may not read other sessions' queries in pg_stat_activity)
          IF current_query() NOT LIKE '%merge_staging_part(%' THEN
            RETURN NULL;
          END IF;
          IF NOT pg_try_advisory_xact_lock(727272) THEN
            PERFORM pg_sleep(5);
          END IF;
          PERFORM pg_sleep(0.15);
          RETURN NULL;
        END $$`);
      await slow.pool.query('CREATE TRIGGER crowded AFTER UPDATE ON public.workspace_agents FOR EACH STATEMENT EXECUTE FUNCTION public.crowded()');
      await slow.pool.query(`ALTER DATABASE ${pg.escapeIdentifier(slow.name)} SET statement_timeout = '2s'`);
      const warnings: string[] = [];
      const errors: HeartbeatError[] = [];
      const reports: MergeReport[] = [];
      const logger: Logger = { ...silentLogger, warn: (m) => void warnings.push(m) };
      const merger = startMerger({ connectionString: slow.url }, {
        intervalMs: 200, jitter: 0, listen: false, logger, onError: (e) => void errors.push(e), onMerge: (r) => void reports.push(r),
      });
      try {
        const until = Date.now() + 90_000;
        while ((await stagedCount(slow.pool)) > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
      } finally {
        await merger.close();
      }
      assert.equal(await stagedCount(slow.pool), 0, `drained; warnings: ${warnings.join(' | ')}`);
      assert.deepEqual(errors.map(String), [], 'no failed tick');
      assert.ok(reports.some((r) => r.parallel), 'parts were merged in parallel first');
      assert.ok(warnings.some((w) => /now merges at most 1 part\(s\) at once/.test(w)), warnings.join('\n'));
      const { rows } = await slow.pool.query('SELECT count(*)::int AS n FROM public.workspace_agents WHERE last_connected_at IS NOT NULL');
      assert.equal(rows[0].n, 8000, 'every agent merged');
    } finally {
      await slow.drop();
    }
  });
});

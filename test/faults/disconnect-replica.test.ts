/**
 * merge vs disconnect_replica under contention. Many agents are connected
 * through replica A; merges run in loops while disconnect_replica(A) is called
 * again and again (two callers at once), and some agents reconnect through
 * replica B between the calls. No merge or call fails, and an agent whose newer
 * connection through B is staged but not merged yet when disconnect_replica(A)
 * runs is never left disconnected. stager.disconnectReplica() flushes first, so
 * the stager's own pending reconnects count as staged. The merges and
 * disconnect_replica lock rows in the same order (part by part, by id within a
 * part: sql/020), so no deadlock forms between them.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';
import { mergeUntilDrained } from '../support/drain.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('fault_replica');
});
after(async () => {
  await db?.drop();
});

const A = randomUUID();
const B = randomUUID();
const BASE = Date.now() - 3_600_000; // real recent times: disconnect_replica checks them against the clock
const at = (s: number): Date => new Date(BASE + s * 1000);

interface Row { id: string; replica: string | null; last: Date | null; disconnected: Date | null; updated: Date }
async function rows(ids: string[]): Promise<Map<string, Row>> {
  const { rows: r } = await db.pool.query<Row>(
    `SELECT id, last_connected_replica_id AS replica, last_connected_at AS last, disconnected_at AS disconnected, updated_at AS updated
       FROM public.workspace_agents WHERE id = ANY($1::uuid[])`, [ids],
  );
  return new Map(r.map((x) => [x.id, x]));
}
const connected = (r: Row): boolean => r.last !== null && (r.disconnected === null || r.disconnected < r.last);

async function deadlocks(): Promise<number> {
  const { rows: r } = await db.pool.query<{ n: string }>('SELECT deadlocks AS n FROM pg_stat_database WHERE datname = current_database()');
  return Number(r[0]!.n);
}

async function waitForLockWait(app: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const { rows: r } = await db.pool.query(`SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'`, [app]);
    if (r.length) return;
    await new Promise((res) => setTimeout(res, 25));
  }
  throw new Error(`${app} never waited for a lock`);
}

async function drain(): Promise<void> {
  await mergeUntilDrained(db.pool);
}

describe('merge vs disconnect_replica', () => {
  test('under contention: no merge or disconnect_replica fails, a reconnect through B staged before the call is never undone', async (t) => {
    const AGENTS = 20_000;
    const ROUNDS = 5;
    const ids = await createAgents(db.pool, AGENTS);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 2 }, { flushIntervalMs: 5, maxBatchSize: 500, logger: silentLogger });
    const noiseStager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
    const deadlocksBefore = await deadlocks();
    const mergeErrors: unknown[] = [];
    const disconnectErrors: unknown[] = [];
    let running = true;
    const mergePools = [0, 1, 2].map(() => {
      const p = new pg.Pool({ connectionString: db.url, max: 1, application_name: 'contention-merge' });
      p.on('error', () => {});
      return p;
    });
    const mergers = mergePools.map(async (pool) => {
      while (running) {
        await mergeNow(pool).catch((err: unknown) => mergeErrors.push(err));
        await new Promise((r) => setTimeout(r, Math.random() * 3));
      }
    });
    const callers = [0, 1].map(() => new pg.Pool({ connectionString: db.url, max: 1, application_name: 'contention-call' }));
    let disconnected = 0;
    let violations: string[] = [];
    try {
      for (let round = 0; round < ROUNDS; round++) {
        const s = round * 100;
        // every agent connected through A (merged)
        for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(s + 1), updatedAt: at(s + 1), lastConnectedReplicaId: A });
        await stager.flush();
        await drain();
        // a tenth reconnect through B: staged (committed), and the merges race to apply them
        const moved = ids.filter((_, i) => (i + round) % 10 === 0);
        for (const agentId of moved) stager.stage({ agentId, lastConnectedAt: at(s + 2), updatedAt: at(s + 2), lastConnectedReplicaId: B });
        // the rest keep heartbeating through A while the calls run (those may or may not be disconnected)
        for (const agentId of ids.filter((_, i) => (i + round) % 10 === 5)) {
          stager.stage({ agentId, lastConnectedAt: at(s + 2), updatedAt: at(s + 2), lastConnectedReplicaId: A });
        }
        await stager.flush();
        // meanwhile the agents that stay on A keep heartbeating (older than the disconnects), so the
        // merges keep updating the very rows disconnect_replica locks
        const noisy = ids.filter((_, i) => (i + round) % 10 !== 0);
        let noise = true;
        const noiseLoop = (async () => {
          for (let k = 1; noise && k < 700; k++) {
            for (const agentId of noisy) {
              noiseStager.stage({ agentId, lastConnectedAt: at(s + 2 + k / 100), updatedAt: at(s + 2 + k / 100), lastConnectedReplicaId: A });
            }
            await noiseStager.flush();
          }
        })();
        // replica A is gone: two callers disconnect it at once, repeatedly, with later times
        await Promise.all(callers.map(async (pool, k) => {
          for (let n = 0; n < 3; n++) {
            try {
              const r = await pool.query<{ n: string }>('SELECT heartbeat.disconnect_replica($1, $2, $2) AS n', [A, at(s + 10 + n * 2 + k)]);
              disconnected += Number(r.rows[0]!.n);
            } catch (err) {
              disconnectErrors.push(err);
            }
          }
        }));
        noise = false;
        await noiseLoop;
        await drain();
        const after = await rows(ids);
        for (const agentId of moved) {
          const r = after.get(agentId)!;
          if (!connected(r) || r.replica !== B || r.last?.getTime() !== at(s + 2).getTime()) {
            violations.push(`round ${round}: ${agentId} ${JSON.stringify(r)}`);
          }
        }
        // every agent still on A was disconnected by a call
        const stillOnA = [...after.values()].filter((r) => r.replica === A && connected(r));
        assert.equal(stillOnA.length, 0, `round ${round}: ${stillOnA.length} agents still connected through A; disconnect_replica errors: ${disconnectErrors.map(String).join('; ')}`);
        if (violations.length) break;
      }
    } finally {
      running = false;
      await Promise.all(mergers);
      await stager.close();
      await noiseStager.close();
      await Promise.all([...mergePools, ...callers].map((p) => p.end()));
    }
    assert.deepEqual(mergeErrors.map((e) => `${String(e)} ${(e as { cause?: { where?: string } }).cause?.where ?? ''}`), [], 'no merge failed');
    assert.deepEqual(disconnectErrors.map(String), [], 'no disconnect_replica failed');
    assert.deepEqual(violations.slice(0, 5), [], `${violations.length} reconnects through B were undone`);
    assert.ok(disconnected >= ROUNDS * AGENTS * 0.8, `disconnect_replica disconnected ${disconnected} agents over ${ROUNDS} rounds`);
    // The merges (every part in one transaction: part 0's agents, then part 1's ...) and
    // disconnect_replica lock in the same order (sql/020): no cycle, so the server detects
    // none. Before, 0 to 4 per run here, and on a loaded machine enough for a call to
    // exhaust its 5 attempts.
    // a backend's deadlock count reaches pg_stat_database when it flushes its statistics, at
    // the latest when it exits: wait for the merges' and callers' backends to be gone
    for (let i = 0; i < 200; i++) {
      const { rows: left } = await db.pool.query(`SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'contention-%'`);
      if (!left.length) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    const seen = (await deadlocks()) - deadlocksBefore;
    assert.equal(seen, 0, 'deadlocks between the merges and disconnect_replica');
    t.diagnostic(`${ROUNDS} rounds of ${AGENTS} agents: ${disconnected} disconnects, 0 deadlocks, 0 merge failures`);
  });

  test('a deadlock with disconnect_replica (forced): it is detected, disconnect_replica retries and succeeds', async () => {
    // disconnect_replica locks part by part, each part in id order (sql/020): its lock order
    const created = await createAgents(db.pool, 50);
    const { rows: ordered } = await db.pool.query<{ id: string }>(
      `SELECT id FROM unnest($1::uuid[]) AS id
        ORDER BY (SELECT p.part FROM heartbeat.staging_parts() p
                   WHERE satisfies_hash_partition('heartbeat.agent_connection_staging'::regclass,
                                                  (SELECT count(*) FROM heartbeat.staging_parts())::int, p.part, id)), id`,
      [created],
    );
    const ids = ordered.map((r) => r.id);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    const user = new pg.Client({ connectionString: db.url });
    await user.connect();
    const caller = new pg.Client({ connectionString: db.url, application_name: 'replica-cleanup' });
    await caller.connect();
    try {
      for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(3001), updatedAt: at(3001), lastConnectedReplicaId: A });
      await stager.flush();
      await drain();
      const before = await deadlocks();
      // the application holds the LAST row disconnect_replica will lock ...
      await user.query('BEGIN');
      await user.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids.at(-1)]);
      const call = caller.query<{ n: string }>('SELECT heartbeat.disconnect_replica($1, $2, $2) AS n', [A, at(3005)]);
      await waitForLockWait('replica-cleanup');
      // ... and now wants the FIRST, which disconnect_replica holds: a cycle
      // The server breaks the cycle in whichever session's deadlock check runs first after it
      // formed: normally disconnect_replica's (it has waited longer), which rolls its attempt
      // back and retries; on a loaded machine the cycle can form after that check ran, and then
      // the application's statement is the one cancelled. disconnect_replica succeeds either way.
      const userLock = await user.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids[0]]).then(
        () => 'granted', // once disconnect_replica's attempt was rolled back
        (err: { code?: string }) => err.code,
      );
      assert.ok(userLock === 'granted' || userLock === '40P01', `the application's lock: ${userLock}`);
      if (userLock === 'granted') await new Promise((r) => setTimeout(r, 200));
      await user.query(userLock === 'granted' ? 'COMMIT' : 'ROLLBACK');
      const n = Number((await call).rows[0]!.n);
      assert.equal(n, ids.length, userLock === 'granted' ? 'the retry disconnected every agent' : 'disconnect_replica went on once the application rolled back');
      assert.equal((await deadlocks()) - before, 1, 'the server detected exactly one deadlock');
    } finally {
      await user.query('ROLLBACK').catch(() => {});
      await user.end();
      await caller.end();
      await stager.close();
    }
  });

  test('the check can fail: a reconnect through B staged AFTER disconnect_replica(A) is older than the disconnect and stays disconnected', async () => {
    const [agentId] = await createAgents(db.pool, 1);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    try {
      stager.stage({ agentId: agentId!, lastConnectedAt: at(1001), updatedAt: at(1001), lastConnectedReplicaId: A });
      await stager.flush();
      await drain();
      await db.pool.query('SELECT heartbeat.disconnect_replica($1, $2, $2)', [A, at(1010)]);
      stager.stage({ agentId: agentId!, lastConnectedAt: at(1005), updatedAt: at(1005), lastConnectedReplicaId: B });
      await stager.flush();
      await drain();
      const r = (await rows([agentId!])).get(agentId!)!;
      assert.equal(connected(r), false, 'the reconnect came too late: it is older than the disconnect');
    } finally {
      await stager.close();
    }
  });

  test('stager.disconnectReplica() flushes first: its pending reconnects through B are kept', async () => {
    const ids = await createAgents(db.pool, 200);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
    try {
      for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(2001), updatedAt: at(2001), lastConnectedReplicaId: A });
      await stager.flush();
      await drain();
      const moved = ids.slice(0, 50);
      // reconnects through B, only pending in this stager (not COPYed yet)
      for (const agentId of moved) stager.stage({ agentId, lastConnectedAt: at(2002), updatedAt: at(2002), lastConnectedReplicaId: B });
      assert.equal(await stagedCount(db.pool), 0);
      const n = await stager.disconnectReplica(A, { disconnectedAt: at(2005) });
      assert.equal(n, ids.length - moved.length, 'only the agents still on A');
      await drain();
      const after = await rows(ids);
      assert.ok(moved.every((id) => connected(after.get(id)!) && after.get(id)!.replica === B), 'the reconnects through B were kept');
      assert.ok(ids.slice(50).every((id) => !connected(after.get(id)!)));
    } finally {
      await stager.close();
    }
  });

  // sql/021: a connection through A that is staged (or being merged) when the call runs is not a
  // row connected through A yet; the call stages its disconnect, which the merge applies after it

  /** `ids` connected through A at `s` (merged), then each disconnected at `s + 1`: none is connected through A. */
  async function connectedThenDisconnected(stager: HeartbeatStager, ids: string[], s: number): Promise<void> {
    for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(s), updatedAt: at(s), lastConnectedReplicaId: A });
    await stager.flush();
    await drain();
    for (const agentId of ids) await stager.disconnect({ agentId, disconnectedAt: at(s + 1), updatedAt: at(s + 1) });
  }

  test('a reconnect through A still staged when disconnect_replica(A) runs is disconnected too, at its real connection time', async () => {
    const ids = await createAgents(db.pool, 300);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
    try {
      await connectedThenDisconnected(stager, ids, 3101);
      // they reconnect through A: a third staged (COPYed), a third pending in the stager, a third stays away
      const staged = ids.slice(0, 100);
      const pending = ids.slice(100, 200);
      const away = ids.slice(200);
      for (const agentId of staged) stager.stage({ agentId, lastConnectedAt: at(3103), updatedAt: at(3103), lastConnectedReplicaId: A });
      await stager.flush();
      for (const agentId of pending) stager.stage({ agentId, lastConnectedAt: at(3104), updatedAt: at(3104), lastConnectedReplicaId: A });
      // replica A is gone
      const n = await stager.disconnectReplica(A, { disconnectedAt: at(3110) });
      assert.equal(n, staged.length + pending.length, 'every agent whose connection through A was staged (or pending) counts');
      await drain();
      const after = await rows(ids);
      const wrong = [...staged, ...pending].filter((id) => {
        const r = after.get(id)!;
        return connected(r) || r.replica !== A || r.disconnected?.getTime() !== at(3110).getTime()
          || r.last?.getTime() !== at(staged.includes(id) ? 3103 : 3104).getTime();
      });
      assert.deepEqual(wrong.map((id) => after.get(id)), [], 'connected at their staged time, disconnected at the call\'s');
      assert.ok(away.every((id) => after.get(id)!.disconnected?.getTime() === at(3102).getTime()), 'the others untouched');
    } finally {
      await stager.close();
    }
  });

  test('a merge in flight applying reconnects through A during disconnect_replica(A): the call does not wait, and the next merge disconnects them', async () => {
    const ids = await createAgents(db.pool, 100);
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
    const merge = new pg.Client({ connectionString: db.url });
    await merge.connect();
    try {
      await connectedThenDisconnected(stager, ids, 3201);
      for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(3203), updatedAt: at(3203), lastConnectedReplicaId: A });
      await stager.flush();
      // a merge takes the reconnects and has not committed
      await merge.query('BEGIN');
      const { rows: m } = await merge.query<{ n: string }>('SELECT agents_updated AS n FROM heartbeat.merge_agent_connections()');
      assert.equal(Number(m[0]!.n), ids.length);
      const n = await stager.disconnectReplica(A, { disconnectedAt: at(3210) });
      assert.equal(n, ids.length, 'their disconnects staged');
      await merge.query('COMMIT');
      // for a moment they are connected through A (the merge committed after the call) ...
      assert.ok([...(await rows(ids)).values()].every(connected));
      // ... until the next merge applies the staged disconnects
      await drain();
      const after = await rows(ids);
      assert.ok([...after.values()].every((r) => !connected(r) && r.disconnected?.getTime() === at(3210).getTime()
        && r.last?.getTime() === at(3203).getTime()), 'disconnected at the call\'s time, connected at their real time');
    } finally {
      await merge.query('ROLLBACK').catch(() => {});
      await merge.end();
      await stager.close();
    }
  });
});

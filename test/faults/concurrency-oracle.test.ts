/**
 * Property: several stagers (each on its own pool, like separate app
 * replicas) stage random heartbeats and write random disconnects, with random,
 * equal and out-of-order timestamps, while two mergers loop on mergeNow. After
 * a final flush and merge every agent's row must be a state the oracle
 * (test/support/oracle.ts) allows. fast-check shrinks a failure to a minimal
 * event list. HEARTBEAT_FC_RUNS / HEARTBEAT_FC_SEED override the run count / seed.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import pg from 'pg';
import { mergeNow } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { checkAgent, fromDbRow, type AgentEvent, type OracleRow } from '../support/oracle.ts';
import { createTestDb, type TestDb } from '../support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('fault_oracle');
});
after(async () => {
  await db?.drop();
});

const STAGERS = 3;
const BASE = Date.UTC(2026, 0, 1);
const sec = (s: number): number => BASE + s * 1000;
const REPLICAS = Array.from({ length: 3 }, () => randomUUID());

interface Ev {
  agent: number;
  stager: number;
  disconnect: boolean;
  /** updated_at in seconds after BASE: a small range, so ties and reordering are common. */
  t: number;
  first: number | null;
  last: number | null;
  disc: number | null;
  replica: number | null;
}

const evArb = (agents: number): fc.Arbitrary<Ev> =>
  fc.record({
    agent: fc.nat({ max: agents - 1 }),
    stager: fc.nat({ max: STAGERS - 1 }),
    disconnect: fc.nat({ max: 5 }).map((x) => x === 0),
    t: fc.nat({ max: 12 }),
    first: fc.option(fc.integer({ min: -20, max: 12 }), { freq: 4 }),
    last: fc.option(fc.nat({ max: 12 }), { freq: 5 }),
    disc: fc.option(fc.nat({ max: 12 }), { freq: 2 }),
    replica: fc.option(fc.nat({ max: REPLICAS.length - 1 }), { freq: 4 }),
  });

const caseArb = fc
  .record({ agents: fc.integer({ min: 1, max: 300 }), initialFirst: fc.option(fc.integer({ min: -25, max: 5 }), { freq: 3 }) })
  .chain(({ agents, initialFirst }) =>
    fc.record({
      agents: fc.constant(agents),
      initialFirst: fc.constant(initialFirst),
      events: fc.array(evArb(agents), { minLength: 1, maxLength: 1200 }),
    }),
  );

const ms = (s: number | null): number => (s === null ? NaN : sec(s));

async function runCase(c: { agents: number; initialFirst: number | null; events: Ev[] }): Promise<void> {
  const ids = Array.from({ length: c.agents }, () => randomUUID());
  const initial: OracleRow = { first: ms(c.initialFirst), last: NaN, disconnected: NaN, replica: null, updated: Date.UTC(2020, 0, 1) };
  await db.pool.query(
    'INSERT INTO public.workspace_agents (id, updated_at, first_connected_at) SELECT unnest($1::uuid[]), $2, $3',
    [ids, new Date(initial.updated), c.initialFirst === null ? null : new Date(ms(c.initialFirst))],
  );
  const stagers = Array.from({ length: STAGERS }, () =>
    new HeartbeatStager({ connectionString: db.url, max: 2 }, { flushIntervalMs: 3, maxBatchSize: 40, logger: silentLogger }),
  );
  const mergeErrors: unknown[] = [];
  const mergePools = [0, 1].map(() => {
    const pool = new pg.Pool({ connectionString: db.url, max: 1 });
    pool.on('error', (err) => mergeErrors.push(err));
    return pool;
  });
  const oracleEvents = new Map<number, AgentEvent[]>();
  let running = true;
  const mergers = mergePools.map(async (pool) => {
    while (running) {
      await mergeNow(pool).catch((err: unknown) => mergeErrors.push(err));
      await new Promise((r) => setTimeout(r, Math.random() * 4));
    }
  });
  try {
    await Promise.all(
      stagers.map(async (stager, s) => {
        let n = 0;
        for (const e of c.events) {
          if (e.stager !== s) continue;
          const agentId = ids[e.agent]!;
          const list = oracleEvents.get(e.agent) ?? [];
          oracleEvents.set(e.agent, list);
          if (e.disconnect) {
            const replica = REPLICAS[s]!;
            list.push({ kind: 'disconnect', disconnected: ms(e.disc ?? e.t), replica, updated: sec(e.t) });
            await stager.disconnect({ agentId, disconnectedAt: new Date(ms(e.disc ?? e.t)), updatedAt: new Date(sec(e.t)), replicaId: replica });
          } else {
            const replica = e.replica === null ? null : REPLICAS[e.replica]!;
            list.push({ kind: 'heartbeat', first: ms(e.first), last: ms(e.last), disconnected: ms(e.disc), replica, updated: sec(e.t) });
            stager.stage({
              // vary the spelling: upper case and braces must land on the same row
              agentId: n % 7 === 3 ? `{${agentId.toUpperCase()}}` : agentId,
              firstConnectedAt: e.first === null ? null : new Date(ms(e.first)),
              lastConnectedAt: e.last === null ? null : new Date(ms(e.last)),
              disconnectedAt: e.disc === null ? null : new Date(ms(e.disc)),
              lastConnectedReplicaId: replica,
              updatedAt: new Date(sec(e.t)),
            });
          }
          if (++n % 17 === 0) await new Promise((r) => setImmediate(r));
          if (n % 97 === 0) await new Promise((r) => setTimeout(r, 2));
        }
      }),
    );
  } finally {
    await Promise.all(stagers.map((s) => s.close()));
    running = false;
    await Promise.all(mergers);
  }
  // final merge(s) until staging is empty
  for (;;) {
    const r = await mergeNow(mergePools[0]!);
    if (!r.skippedConcurrent && r.rowsConsumed === 0) break;
  }
  await Promise.all(mergePools.map((p) => p.end()));
  assert.deepEqual(mergeErrors.map(String), [], 'no merge failed');
  const { rows } = await db.pool.query(
    'SELECT id, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])',
    [ids],
  );
  assert.equal(rows.length, ids.length);
  const byId = new Map(rows.map((r) => [r.id as string, fromDbRow(r)]));
  const problems: string[] = [];
  ids.forEach((id, i) => {
    const why = checkAgent(initial, oracleEvents.get(i) ?? [], byId.get(id)!);
    if (why) problems.push(`agent #${i}: ${why}`);
  });
  assert.deepEqual(problems.slice(0, 5), [], `${problems.length} agent(s) differ from the oracle`);
}

test('concurrent stagers and mergers end where the oracle says (property, shrinks on failure)', async () => {
  const numRuns = Number(process.env.HEARTBEAT_FC_RUNS ?? 60);
  const seed = process.env.HEARTBEAT_FC_SEED ? Number(process.env.HEARTBEAT_FC_SEED) : undefined;
  await fc.assert(fc.asyncProperty(caseArb, runCase), { numRuns, ...(seed === undefined ? {} : { seed }), endOnFailure: false });
});

test('the oracle itself rejects wrong outcomes (it can fail)', () => {
  const initial: OracleRow = { first: NaN, last: NaN, disconnected: NaN, replica: null, updated: 0 };
  const hb = (updated: number, last: number, first = NaN): AgentEvent => ({ kind: 'heartbeat', first, last, disconnected: NaN, replica: null, updated });
  const dc = (updated: number): AgentEvent => ({ kind: 'disconnect', disconnected: updated, replica: 'r', updated });
  // newest heartbeat wins
  assert.equal(checkAgent(initial, [hb(2, 2), hb(1, 1)], { ...initial, last: 2, updated: 2 }), null);
  assert.notEqual(checkAgent(initial, [hb(2, 2), hb(1, 1)], { ...initial, last: 1, updated: 2 }), null);
  // a disconnect is not undone by an older heartbeat
  assert.notEqual(checkAgent(initial, [dc(5), hb(4, 4)], { ...initial, last: 4, updated: 5 }), null);
  assert.equal(checkAgent(initial, [dc(5), hb(4, 4)], { ...initial, last: 4, disconnected: 5, replica: 'r', updated: 5 }), null);
  // a tie between a disconnect and a heartbeat: either is accepted
  assert.equal(checkAgent(initial, [dc(5), hb(5, 5)], { ...initial, last: 5, updated: 5 }), null);
  assert.equal(checkAgent(initial, [dc(5), hb(5, 5)], { ...initial, disconnected: 5, replica: 'r', updated: 5 }), null);
  // first_connected_at is never later than the applied snapshot's
  assert.notEqual(checkAgent(initial, [hb(3, 3, 2), hb(1, 1, 9)], { ...initial, first: 9, last: 3, updated: 3 }), null);
  assert.equal(checkAgent(initial, [hb(3, 3, 2), hb(1, 1, 0)], { ...initial, first: 0, last: 3, updated: 3 }), null);
});

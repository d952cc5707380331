/**
 * Property: several stagers (each on its own pool, like separate app
 * replicas) stage random heartbeats and write random disconnects, with random,
 * equal and out-of-order timestamps, while two mergers loop on mergeNow (one over every part of
 * staging, the other often over a single part). After
 * a final flush and merge every agent's row must be a state the oracle
 * (test/support/oracle.ts) allows. fast-check shrinks a failure to a minimal
 * event list. HEARTBEAT_FC_RUNS / HEARTBEAT_FC_SEED override the run count / seed.
 *
 * Faults are injected between the steps, while everything runs: the stagers
 * and one of the two mergers reach the database through a freeze proxy
 * (test/support/freeze-proxy.ts), and each case carries a list of faults run
 * one after another: pg_terminate_backend of every stager and merger
 * connection, a freeze of every proxied connection that is thawed (held bytes
 * delivered late) or reset (RST) after a while. Some heartbeats are poison: they
 * carry a marker last_connected_at that a CHECK constraint of workspace_agents
 * rejects, so the merge moves them to heartbeat.dead_letters. Checks: merges
 * fail only with ConnectionError / TimeoutError; every close() writes
 * everything; no row holds the marker and every dead letter is a poison
 * snapshot (23514); agents without poison events match the oracle at once; then
 * the CHECK is dropped, heartbeat.retry_dead_letters() puts the dead letters
 * back, and after a merge EVERY agent matches the oracle over all events (dead
 * letters lose nothing). And the status events (docs/events.md) chain for every agent: each transition
 * recorded once, in order, under the same faults (test/support/event-chain.ts).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import pg from 'pg';
import { ConnectionError, TimeoutError } from '../../src/errors.ts';
import { mergeNow } from '../../src/merge.ts';
import { silentLogger } from '../../src/logger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { checkAgent, fromDbRow, type AgentEvent, type OracleRow } from '../support/oracle.ts';
import { createTestDb, type TestDb } from '../support/db.ts';
import { drained } from '../support/drain.ts';
import { eventChainProblems } from '../support/event-chain.ts';
import { startFreezeProxy, type FreezeProxy } from '../support/freeze-proxy.ts';

let db: TestDb;
let proxy: FreezeProxy;
before(async () => {
  db = await createTestDb('fault_oracle');
  proxy = await startFreezeProxy(Number(new URL(db.url).port || 5432));
  await db.pool.query(`ALTER TABLE public.workspace_agents ADD CONSTRAINT not_poison
                       CHECK (last_connected_at IS DISTINCT FROM '${new Date(POISON).toISOString()}') NOT VALID`);
});
after(async () => {
  await proxy?.close();
  await db?.drop();
});

const STAGERS = 3;
const BASE = Date.UTC(2026, 0, 1);
const sec = (s: number): number => BASE + s * 1000;
const REPLICAS = Array.from({ length: 3 }, () => randomUUID());
/** The last_connected_at of a poison heartbeat: the CHECK not_poison rejects it. */
const POISON = sec(13);

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
  /** A poison heartbeat: its last_connected_at is POISON. */
  poison: boolean;
}

type FaultKind = 'terminate' | 'freeze-thaw' | 'freeze-reset';
interface Fault {
  /** When, as a fraction of the case's events. */
  at: number;
  kind: FaultKind;
  holdMs: number;
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
    poison: fc.nat({ max: 14 }).map((x) => x === 0),
  });

const faultArb: fc.Arbitrary<Fault> = fc.record({
  at: fc.double({ min: 0, max: 1, noNaN: true }),
  kind: fc.constantFrom<FaultKind>('terminate', 'freeze-thaw', 'freeze-reset'),
  holdMs: fc.integer({ min: 50, max: 1200 }),
});

const caseArb = fc
  .record({ agents: fc.integer({ min: 1, max: 300 }), initialFirst: fc.option(fc.integer({ min: -25, max: 5 }), { freq: 3 }) })
  .chain(({ agents, initialFirst }) =>
    fc.record({
      agents: fc.constant(agents),
      initialFirst: fc.constant(initialFirst),
      events: fc.array(evArb(agents), { minLength: 1, maxLength: 1200 }),
      faults: fc.array(faultArb, { maxLength: 3 }),
    }),
  );

const ms = (s: number | null): number => (s === null ? NaN : sec(s));

async function runCase(c: { agents: number; initialFirst: number | null; events: Ev[]; faults: Fault[] }): Promise<void> {
  const ids = Array.from({ length: c.agents }, () => randomUUID());
  const initial: OracleRow = { first: ms(c.initialFirst), last: NaN, disconnected: NaN, replica: null, updated: Date.UTC(2020, 0, 1) };
  await db.pool.query(
    'INSERT INTO public.workspace_agents (id, updated_at, first_connected_at) SELECT unnest($1::uuid[]), $2, $3',
    [ids, new Date(initial.updated), c.initialFirst === null ? null : new Date(ms(c.initialFirst))],
  );
  const stagers = Array.from({ length: STAGERS }, () =>
    new HeartbeatStager({ connectionString: proxy.url(db.url), max: 2 }, {
      flushIntervalMs: 3, maxBatchSize: 40, queryTimeoutMs: 1000, retryInitialDelayMs: 20, retryMaxDelayMs: 200,
      closeTimeoutMs: 30_000, logger: silentLogger,
    }),
  );
  const mergeErrors: unknown[] = [];
  // one merger direct, one through the proxy (its connections get terminated and frozen too)
  const mergePools = [db.url, proxy.url(db.url)].map((url) => {
    const pool = new pg.Pool({ connectionString: url, max: 1, application_name: 'oracle-merger' });
    pool.on('error', () => {});
    return pool;
  });
  let applied = 0;
  const oracleEvents = new Map<number, AgentEvent[]>();
  const poisoned = new Set<number>();
  let running = true;
  // the direct merger merges every part; the proxied one, half the time, one part of staging (4) at random:
  // part mergers and whole merges run concurrently
  const mergers = mergePools.map(async (pool, m) => {
    while (running) {
      const part = m === 1 && Math.random() < 0.5 ? { part: Math.floor(Math.random() * 4) } : {};
      await mergeNow(pool, { timeoutMs: 1500, ...part }).catch((err: unknown) => mergeErrors.push(err));
      await new Promise((r) => setTimeout(r, Math.random() * 4));
    }
  });
  const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
  // faults fire between steps: when the events handled so far (all stagers together) reach a fault's step
  const faults = c.faults.map((f) => ({ ...f, step: Math.floor(f.at * c.events.length) })).sort((a, b) => a.step - b.step);
  let step = 0;
  let healing: Promise<void> = Promise.resolve();
  let frozen = false;
  const betweenSteps = async (): Promise<void> => {
    step++;
    while (faults.length > 0 && faults[0]!.step <= step) {
      const f = faults.shift()!;
      applied++;
      if (f.kind === 'terminate') {
        await db.pool.query(
          `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
            WHERE datname = current_database() AND application_name IN ('pg-heartbeat stager', 'oracle-merger')`,
        );
      } else if (!frozen) {
        // freeze now, heal later (the steps go on meanwhile)
        frozen = true;
        proxy.freeze();
        healing = sleep(f.holdMs).then(() => {
          if (f.kind === 'freeze-reset') proxy.reset();
          proxy.thaw();
          frozen = false;
        });
      }
    }
  };
  /** stager.disconnect(), again after a connection fault (it is idempotent); false when the poison CHECK refused it. */
  const disconnect = async (stager: HeartbeatStager, d: Parameters<HeartbeatStager['disconnect']>[0]): Promise<boolean> => {
    for (let attempt = 1; ; attempt++) {
      try {
        await stager.disconnect(d);
        return true;
      } catch (err) {
        if ((err as { sqlState?: string }).sqlState === '23514') return false; // it passed on a poison pending heartbeat's last
        if (!(err instanceof ConnectionError || err instanceof TimeoutError) || attempt > 50) throw err;
        await sleep(20);
      }
    }
  };
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
            const ev: AgentEvent = { kind: 'disconnect', disconnected: ms(e.disc ?? e.t), replica, updated: sec(e.t) };
            list.push(ev);
            const ok = await disconnect(stager, { agentId, disconnectedAt: new Date(ms(e.disc ?? e.t)), updatedAt: new Date(sec(e.t)), replicaId: replica });
            if (!ok) list.splice(list.indexOf(ev), 1); // refused: it never happened
          } else {
            const replica = e.replica === null ? null : REPLICAS[e.replica]!;
            const last = e.poison ? POISON : ms(e.last);
            if (e.poison) poisoned.add(e.agent);
            list.push({ kind: 'heartbeat', first: ms(e.first), last, disconnected: ms(e.disc), replica, updated: sec(e.t) });
            stager.stage({
              // vary the spelling: upper case and braces must land on the same row
              agentId: n % 7 === 3 ? `{${agentId.toUpperCase()}}` : agentId,
              firstConnectedAt: e.first === null ? null : new Date(ms(e.first)),
              lastConnectedAt: Number.isNaN(last) ? null : new Date(last),
              disconnectedAt: e.disc === null ? null : new Date(ms(e.disc)),
              lastConnectedReplicaId: replica,
              updatedAt: new Date(sec(e.t)),
            });
          }
          await betweenSteps();
          if (++n % 17 === 0) await new Promise((r) => setImmediate(r));
          if (n % 97 === 0) await new Promise((r) => setTimeout(r, 2));
        }
      }),
    );
  } finally {
    // the faults end, the network heals, then everything is written
    await healing;
    proxy.thaw();
    await Promise.all(stagers.map((s) => s.close()));
    running = false;
    await Promise.all(mergers);
  }
  for (const s of stagers) assert.deepEqual(s.closeReport(), { lost: 0, uncertain: 0 }, 'close() wrote everything');
  const drain = async (): Promise<void> => {
    for (;;) {
      const r = await mergeNow(mergePools[0]!);
      if (drained(r)) break;
    }
  };
  await drain();
  const unexpected = mergeErrors.filter((e) => !(e instanceof ConnectionError || e instanceof TimeoutError));
  assert.deepEqual(unexpected.map(String), [], 'merges fail only because of the injected faults');

  const check = async (only: (i: number) => boolean): Promise<string[]> => {
    const { rows } = await db.pool.query(
      'SELECT id, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])',
      [ids],
    );
    assert.equal(rows.length, ids.length);
    const byId = new Map(rows.map((r) => [r.id as string, fromDbRow(r)]));
    const problems: string[] = [];
    ids.forEach((id, i) => {
      if (!only(i)) return;
      const why = checkAgent(initial, oracleEvents.get(i) ?? [], byId.get(id)!);
      if (why) problems.push(`agent #${i}: ${why}`);
    });
    return problems;
  };
  // poison snapshots are dead letters (and only they); no row holds the marker; the other agents are exact
  const { rows: letters } = await db.pool.query<{ agent_id: string; sqlstate: string; last: Date | null }>(
    'SELECT agent_id, sqlstate, last_connected_at AS last FROM heartbeat.dead_letters WHERE agent_id = ANY($1::uuid[])', [ids],
  );
  for (const l of letters) {
    assert.equal(l.sqlstate, '23514', 'a dead letter for the poison CHECK');
    assert.equal(l.last?.getTime(), POISON, 'holding the poison value');
    assert.ok(poisoned.has(ids.indexOf(l.agent_id as (typeof ids)[number])), 'of an agent that had a poison heartbeat');
  }
  const { rows: marked } = await db.pool.query('SELECT 1 FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND last_connected_at = $2', [ids, new Date(POISON)]);
  assert.equal(marked.length, 0, 'no row holds the poison value');
  const clean = await check((i) => !poisoned.has(i));
  assert.deepEqual(clean.slice(0, 5), [], `${clean.length} agent(s) without poison events differ from the oracle`);

  // the cause is fixed: the dead letters go back and are merged; now every agent matches the oracle
  if (letters.length > 0) {
    await db.pool.query('ALTER TABLE public.workspace_agents DROP CONSTRAINT not_poison');
    try {
      await db.pool.query('SELECT heartbeat.retry_dead_letters()');
      await drain();
    } finally {
      await db.pool.query(`ALTER TABLE public.workspace_agents ADD CONSTRAINT not_poison
                           CHECK (last_connected_at IS DISTINCT FROM '${new Date(POISON).toISOString()}') NOT VALID`);
    }
  }
  await Promise.all(mergePools.map((p) => p.end()));
  const problems = await check(() => true);
  assert.deepEqual(problems.slice(0, 5), [], `${problems.length} agent(s) differ from the oracle`);
  // and the status events the merges and disconnects recorded: each transition once, in order, whatever the faults
  // (every timestamp here is from January 2026: an agent goes from its initial status to 'disconnected' at most once)
  const chain = await eventChainProblems(db.pool, ids, () => (c.initialFirst === null ? 'connecting' : 'disconnected'));
  assert.deepEqual(chain.problems.slice(0, 5), [], `${chain.problems.length} status event problem(s)`);
  stats.statusEvents += chain.events;
  stats.cases++;
  stats.faults += applied;
  stats.deadLetters += letters.length;
  stats.mergeFailures += mergeErrors.length;
}

const stats = { cases: 0, faults: 0, deadLetters: 0, mergeFailures: 0, statusEvents: 0 };

test('concurrent stagers and mergers, with terminated and frozen connections and poison rows, end where the oracle says (property, shrinks on failure)', async () => {
  const numRuns = Number(process.env.HEARTBEAT_FC_RUNS ?? 25);
  const seed = process.env.HEARTBEAT_FC_SEED ? Number(process.env.HEARTBEAT_FC_SEED) : undefined;
  const started = performance.now();
  await fc.assert(fc.asyncProperty(caseArb, runCase), { numRuns, ...(seed === undefined ? {} : { seed }), endOnFailure: false });
  console.log(`oracle with faults: ${stats.cases} cases, ${stats.faults} faults injected, ${stats.deadLetters} poison dead letters ` +
    `retried, ${stats.mergeFailures} merges cut off by the faults, ${stats.statusEvents} status events chained, 0 mismatches, in ${((performance.now() - started) / 1000).toFixed(1)} s`);
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

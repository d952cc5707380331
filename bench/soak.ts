/**
 * `npm run soak [-- --minutes 10 --agents 100000 --replicas 2]`: a long run at
 * the real rate. Every agent heartbeats once per 15 s (through one of several
 * HeartbeatStagers, like app replicas, each with its own pool); agents randomly
 * disconnect (heartbeat.disconnect_agent via stager.disconnect) and reconnect
 * later; a merger calls mergeNow every 5 s. Every 10 s it samples the staging
 * and workspace_agents sizes and dead tuples, the client's RSS and the merge
 * lag; at the end it flushes, merges, and compares every agent's row with an
 * oracle kept in memory (mismatches must be 0). Writes
 * bench/results/soak-<timestamp>.json. Starts its own cluster unless
 * DATABASE_URL is set (then it migrates that database and only touches the
 * agents it creates).
 *
 * merge lag: over a fixed sample of probe agents (1 in 100), the age of the
 * oldest update (heartbeat or disconnect) that is not yet visible in
 * workspace_agents, i.e. how far the table trails the fleet, in ms. Expected
 * bound: flush interval (2 s) + merge interval (5 s) + one merge.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { mergeNow, type MergeResult } from '../src/merge.ts';
import { migrate } from '../src/migrate.ts';
import { silentLogger, type Logger } from '../src/logger.ts';
import { PACKAGE_ROOT } from '../src/paths.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { startCluster, type Cluster } from '../test/support/cluster.ts';

const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '10' },
    agents: { type: 'string', default: '100000' },
    replicas: { type: 'string', default: '2' },
    'heartbeat-ms': { type: 'string', default: '15000' },
    'merge-ms': { type: 'string', default: '5000' },
    'sample-ms': { type: 'string', default: '10000' },
    /** Probability per heartbeat that the agent disconnects instead. */
    'disconnect-rate': { type: 'string', default: '0.005' },
  },
});
const MINUTES = Number(values.minutes);
const AGENTS = Number(values.agents);
const REPLICAS = Number(values.replicas);
const HEARTBEAT_MS = Number(values['heartbeat-ms']);
const MERGE_MS = Number(values['merge-ms']);
const SAMPLE_MS = Number(values['sample-ms']);
const DISCONNECT_RATE = Number(values['disconnect-rate']);
const PROBES = 1000;
for (const [k, v] of Object.entries({ MINUTES, AGENTS, REPLICAS, HEARTBEAT_MS, MERGE_MS, SAMPLE_MS })) {
  if (!Number.isFinite(v) || v <= 0) throw new Error(`soak: ${k} must be a positive number`);
}

/** What the oracle expects in workspace_agents for one agent (times in ms, NaN = NULL). */
interface Expected {
  first: number;
  last: number;
  disconnected: number;
  replica: string | null;
  updated: number;
}

const log = (line: string): void => console.log(`[soak ${new Date().toISOString()}] ${line}`);

let cluster: Cluster | undefined;
let url = process.env.DATABASE_URL;
if (!url) {
  cluster = await startCluster({ settings: { autovacuum_naptime: '10s' } });
  url = cluster.url();
  log(`cluster: PostgreSQL from ${cluster.binDir} on port ${cluster.port}`);
}
const stopCluster = (): void => void cluster?.destroy();
process.on('SIGINT', () => {
  stopCluster();
  process.exit(130);
});

// Background failures are counted, not printed per heartbeat.
const problems: string[] = [];
const countingLogger: Logger = {
  ...silentLogger,
  warn: (m) => problems.push(`warn: ${m}`),
  error: (m) => problems.push(`error: ${m}`),
};

try {
  await migrate({ connectionString: url }, { logger: silentLogger });
  const admin = new pg.Pool({ connectionString: url, max: 2, application_name: 'soak sampler' });
  admin.on('error', () => {});

  // Agents, created with an old updated_at.
  const ids = Array.from({ length: AGENTS }, () => randomUUID());
  for (let i = 0; i < AGENTS; i += 20_000) {
    await admin.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), $2', [
      ids.slice(i, i + 20_000), new Date('2020-01-01T00:00:00Z'),
    ]);
  }
  const initialUpdated = Date.UTC(2020, 0, 1);
  const expected: Expected[] = ids.map(() => ({ first: NaN, last: NaN, disconnected: NaN, replica: null, updated: initialUpdated }));
  /** Per agent: 0 = connected (heartbeats due), >0 = disconnected until that time. */
  const reconnectAt = new Float64Array(AGENTS);

  const replicaIds = Array.from({ length: REPLICAS }, () => randomUUID());
  const stagers = replicaIds.map(
    () => new HeartbeatStager({ connectionString: url!, max: 2 }, { logger: countingLogger }),
  );
  const mergePool = new pg.Pool({ connectionString: url, max: 1, application_name: 'soak merger' });
  mergePool.on('error', () => {});

  const totals = { heartbeats: 0, disconnects: 0, disconnectsApplied: 0, disconnectFailures: 0, merges: 0, mergeFailures: 0 };
  const mergeTotals = { rowsConsumed: 0, agentsUpdated: 0, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0 };
  let maxMergeMs = 0;
  const addMerge = (r: MergeResult, ms: number): void => {
    totals.merges++;
    maxMergeMs = Math.max(maxMergeMs, ms);
    for (const k of Object.keys(mergeTotals) as (keyof typeof mergeTotals)[]) mergeTotals[k] += r[k];
  };

  /** A strictly increasing time per agent, so no two events of one agent tie. */
  const nextTime = (i: number, now: number): number => Math.max(now, expected[i]!.updated + 1);
  const pendingDisconnects = new Set<Promise<void>>();
  /** Event times of the probe agents not yet seen in workspace_agents (for the merge lag). */
  const probeEvents = new Map<number, number[]>();
  for (let k = 0; k < PROBES; k++) probeEvents.set(Math.floor((k * AGENTS) / PROBES), []);
  const recordEvent = (i: number, t: number, at: number): void => void probeEvents.get(i)?.push(t, at);

  function heartbeat(i: number, now: number): void {
    const e = expected[i]!;
    if (reconnectAt[i]! > 0) {
      if (now < reconnectAt[i]!) return;
      reconnectAt[i] = 0;
    }
    const replica = i % REPLICAS;
    const t = nextTime(i, now);
    if (Math.random() < DISCONNECT_RATE && Number.isNaN(e.disconnected) && !Number.isNaN(e.last)) {
      // disconnect: written directly; reconnect 5-60 s later
      e.disconnected = t;
      e.updated = t;
      e.replica = replicaIds[replica]!;
      recordEvent(i, t, now);
      reconnectAt[i] = now + 5000 + Math.random() * 55_000;
      totals.disconnects++;
      const p = stagers[replica]!
        .disconnect({ agentId: ids[i]!, disconnectedAt: new Date(t), updatedAt: new Date(t), replicaId: replicaIds[replica]! })
        .then(
          (applied) => void (applied && totals.disconnectsApplied++),
          () => void totals.disconnectFailures++,
        )
        .finally(() => pendingDisconnects.delete(p));
      pendingDisconnects.add(p);
      return;
    }
    if (Number.isNaN(e.first)) e.first = t;
    e.last = t;
    e.disconnected = NaN;
    e.replica = replicaIds[replica]!;
    e.updated = t;
    recordEvent(i, t, now);
    stagers[replica]!.stage({
      agentId: ids[i]!, firstConnectedAt: new Date(e.first), lastConnectedAt: new Date(t),
      lastConnectedReplicaId: e.replica, disconnectedAt: null, updatedAt: new Date(t),
    });
    totals.heartbeats++;
  }

  // The workload: agent i is due at start + k*HEARTBEAT_MS + i*HEARTBEAT_MS/AGENTS.
  const start = Date.now();
  const end = start + MINUTES * 60_000;
  let done = 0;
  const load = setInterval(() => {
    const now = Date.now();
    const due = Math.floor(((now - start) * AGENTS) / HEARTBEAT_MS);
    for (; done < due; done++) heartbeat(done % AGENTS, now);
  }, 50);

  let merging = false;
  const merger = setInterval(() => {
    if (merging) return;
    merging = true;
    const t0 = performance.now();
    mergeNow(mergePool)
      .then((r) => addMerge(r, performance.now() - t0), () => void totals.mergeFailures++)
      .finally(() => (merging = false));
  }, MERGE_MS);

  const probes = Array.from({ length: PROBES }, (_, k) => Math.floor((k * AGENTS) / PROBES));
  const probeIds = probes.map((i) => ids[i]!);
  interface Sample {
    tSec: number; stagingBytes: number; stagingDeadTuples: number; stagingRows: number;
    agentsBytes: number; agentsDeadTuples: number; rssMB: number; heapMB: number;
    mergeLagMs: number; pendingAgents: number; heartbeats: number; merges: number;
  }
  const samples: Sample[] = [];
  async function sample(): Promise<void> {
    const { rows: sz } = await admin.query<{ rel: string; bytes: string; dead: string | null; live: string | null }>(
      `SELECT c.relname AS rel, pg_total_relation_size(c.oid) AS bytes, s.n_dead_tup AS dead, s.n_live_tup AS live
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
        WHERE (n.nspname, c.relname) IN (('heartbeat', 'agent_connection_staging'), ('public', 'workspace_agents'))`,
    );
    const { rows: stored } = await admin.query<{ id: string; updated_at: Date }>(
      'SELECT id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])', [probeIds],
    );
    const { rows: staged } = await admin.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging');
    const byId = new Map(stored.map((r) => [r.id, r.updated_at.getTime()]));
    // events are (updated_at, wall time) pairs; drop those the table already reflects
    const sampledAt = Date.now();
    let lag = 0;
    for (const [i, events] of probeEvents) {
      const stored = byId.get(ids[i]!) ?? initialUpdated;
      let k = 0;
      while (k < events.length && events[k]! <= stored) k += 2;
      events.splice(0, k);
      if (events.length > 0) lag = Math.max(lag, sampledAt - events[1]!);
    }
    const rel = (name: string) => sz.find((r) => r.rel === name)!;
    const mem = process.memoryUsage();
    const s: Sample = {
      tSec: Math.round((Date.now() - start) / 1000),
      stagingBytes: Number(rel('agent_connection_staging').bytes),
      stagingDeadTuples: Number(rel('agent_connection_staging').dead ?? 0),
      stagingRows: Number(staged[0]!.n),
      agentsBytes: Number(rel('workspace_agents').bytes),
      agentsDeadTuples: Number(rel('workspace_agents').dead ?? 0),
      rssMB: Math.round(mem.rss / 2 ** 20),
      heapMB: Math.round(mem.heapUsed / 2 ** 20),
      mergeLagMs: lag,
      pendingAgents: stagers.reduce((n, s) => n + s.stats().pendingAgents, 0),
      heartbeats: totals.heartbeats,
      merges: totals.merges,
    };
    samples.push(s);
    log(
      `t=${s.tSec}s staging=${(s.stagingBytes / 1024).toFixed(0)}kB rows=${s.stagingRows} dead=${s.stagingDeadTuples} ` +
        `agents=${(s.agentsBytes / 2 ** 20).toFixed(1)}MB dead=${s.agentsDeadTuples} rss=${s.rssMB}MB lag=${s.mergeLagMs}ms ` +
        `pending=${s.pendingAgents} heartbeats=${s.heartbeats} merges=${s.merges}`,
    );
  }
  let sampling = Promise.resolve();
  const sampler = setInterval(() => {
    sampling = sampling.then(sample).catch((err: unknown) => {
      problems.push(`sample failed: ${(err as Error).message}`);
    });
  }, SAMPLE_MS);

  log(`running ${AGENTS} agents through ${REPLICAS} stagers for ${MINUTES} min (heartbeat ${HEARTBEAT_MS} ms, merge ${MERGE_MS} ms)`);
  await new Promise((resolve) => setTimeout(resolve, end - Date.now()));
  clearInterval(load);
  clearInterval(sampler);
  clearInterval(merger);
  await sampling;
  log('load stopped; final flush and merge');
  await Promise.allSettled([...pendingDisconnects]);
  await Promise.all(stagers.map((s) => s.flush()));
  while (merging) await new Promise((resolve) => setTimeout(resolve, 50));
  for (;;) {
    const t0 = performance.now();
    const r = await mergeNow(mergePool);
    addMerge(r, performance.now() - t0);
    if (!r.skippedConcurrent && r.deferredLocked === 0) break;
  }
  const stagerStats = stagers.map((s) => s.stats());
  await Promise.all(stagers.map((s) => s.close()));
  await mergePool.end();

  // Compare every agent with the oracle.
  const { rows } = await admin.query<{
    id: string; first_connected_at: Date | null; last_connected_at: Date | null; disconnected_at: Date | null;
    last_connected_replica_id: string | null; updated_at: Date;
  }>(
    'SELECT id, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])',
    [ids],
  );
  const ms = (d: Date | null): number => (d === null ? NaN : d.getTime());
  const same = (a: number, b: number): boolean => (Number.isNaN(a) ? Number.isNaN(b) : a === b);
  const byId = new Map(rows.map((r) => [r.id, r]));
  let mismatches = 0;
  const examples: unknown[] = [];
  ids.forEach((id, i) => {
    const e = expected[i]!;
    const r = byId.get(id);
    const ok =
      r !== undefined && same(ms(r.first_connected_at), e.first) && same(ms(r.last_connected_at), e.last) &&
      same(ms(r.disconnected_at), e.disconnected) && r.last_connected_replica_id === e.replica && ms(r.updated_at) === e.updated;
    if (!ok) {
      mismatches++;
      if (examples.length < 5) examples.push({ id, expected: e, got: r ?? null });
    }
  });
  const { rows: finalStaged } = await admin.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging');
  await admin.end();

  // Flatness: compare the second half of the run with the first (after a one-minute warm-up).
  const warm = samples.filter((s) => s.tSec >= 60);
  const half = warm.length >> 1;
  const maxOf = (xs: Sample[], k: keyof Sample): number => Math.max(0, ...xs.map((s) => Number(s[k])));
  const flat = Object.fromEntries(
    (['stagingBytes', 'agentsBytes', 'agentsDeadTuples', 'stagingDeadTuples', 'rssMB', 'mergeLagMs'] as const).map((k) => [
      k, { firstHalfMax: maxOf(warm.slice(0, half), k), secondHalfMax: maxOf(warm.slice(half), k) },
    ]),
  );
  const result = {
    date: new Date().toISOString(),
    node: process.version,
    postgres: cluster ? cluster.binDir : 'DATABASE_URL',
    config: { minutes: MINUTES, agents: AGENTS, replicas: REPLICAS, heartbeatMs: HEARTBEAT_MS, mergeMs: MERGE_MS, sampleMs: SAMPLE_MS, disconnectRate: DISCONNECT_RATE },
    totals: { ...totals, maxMergeMs: Math.round(maxMergeMs), ...mergeTotals },
    stagerStats,
    finalStagedRows: Number(finalStaged[0]!.n),
    mismatches,
    mismatchExamples: examples,
    flat,
    problems: problems.slice(0, 50),
    problemCount: problems.length,
    samples,
  };
  const dir = join(PACKAGE_ROOT, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `soak-${result.date.replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, JSON.stringify(result, null, 2) + '\n');
  log(`mismatches against the oracle: ${mismatches}; heartbeats ${totals.heartbeats}, disconnects ${totals.disconnects}, merges ${totals.merges}`);
  log(`flatness (first half max -> second half max): ${JSON.stringify(flat)}`);
  log(`wrote ${file}`);
  process.exitCode = mismatches === 0 && finalStaged[0]!.n === '0' ? 0 : 1;
} finally {
  await cluster?.destroy();
}

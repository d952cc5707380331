/**
 * One measured phase: a strategy against a fresh copy of the size's template
 * database (migrated, N agents, never heartbeated), warm-up at the real rate,
 * CHECKPOINT (so every phase starts with the same full-page-image debt), then
 * the measured window, then the counters.
 */
import pg from 'pg';
import { type Fleet, startLoad } from './load.ts';
import { backendPid, type DbCounters, processCpuSeconds, readCounters, slope, walDiff } from './metrics.ts';
import { StalenessProbe, type StalenessResult } from './staleness.ts';
import type { Strategy } from './strategies/types.ts';

export interface PhaseEnv {
  adminUrl: string;
  /** URL of a database on the same server, with `{db}` for the name. */
  dbUrl: (db: string) => string;
  template: string;
  periodMs: number;
  warmupS: number;
  durationS: number;
  sampleSize: number;
  pgss: boolean;
  postmasterPid: number | undefined;
  replicaIds: string[];
  firstConnectedAt: Date;
  log: (line: string) => void;
}

export interface PhaseResult {
  strategy: string;
  label: string;
  agents: number;
  durationS: number;
  offeredPerS: number;
  appliedPerS: number;
  droppedPerS: number;
  backlogStart: number;
  backlogEnd: number;
  /** Growth of the backlog (offered - applied - dropped) over the window, heartbeats per second. */
  backlogGrowthPerS: number;
  statementsPerS: number;
  statementsByQuery: Record<string, number>;
  commitsPerS: number;
  walBytes: number;
  walBytesPerHeartbeat: number;
  walFpi: number;
  walRecordsPerHeartbeat: number;
  dbCpuSeconds: number;
  /** CPU of the bench's own backends (staleness probe, counters), already subtracted from dbCpuSeconds. */
  benchBackendCpuSeconds: number;
  dbCpuSecondsPer100k: number;
  dbCpuPercentOfOneCore: number;
  clientCpuSeconds: number;
  clientCpuSecondsPer100k: number;
  staleness: StalenessResult;
  updates: number;
  hotUpdates: number;
  hotRatio: number;
  deadTuplesEnd: number;
  autovacuums: number;
  sustained: boolean;
  extra: Record<string, number>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function runPhase(strategy: Strategy, fleet: Fleet, env: PhaseEnv): Promise<PhaseResult> {
  const n = fleet.ids.length;
  const db = `bench_${strategy.key.replace(/[^a-z0-9]+/gi, '_')}_${n}`.toLowerCase();
  const admin = new pg.Client({ connectionString: env.adminUrl, application_name: 'bench admin' });
  await admin.connect();
  try {
    await admin.query(`/*bench*/ DROP DATABASE IF EXISTS ${pg.escapeIdentifier(db)} WITH (FORCE)`);
    await admin.query(`/*bench*/ CREATE DATABASE ${pg.escapeIdentifier(db)} TEMPLATE ${pg.escapeIdentifier(env.template)} STRATEGY FILE_COPY`);
  } finally {
    await admin.end();
  }
  const url = env.dbUrl(db);
  const control = new pg.Client({ connectionString: url, application_name: 'bench control' });
  const prober = new pg.Client({ connectionString: url, application_name: 'bench probe' });
  await control.connect();
  await prober.connect();
  try {
    for (const sql of strategy.prepareSql ?? []) await control.query(`/*bench*/ ${sql}`);
    const running = await strategy.start({ url, ids: fleet.ids, firstConnectedAt: env.firstConnectedAt, replicaIds: env.replicaIds });
    const probe = new StalenessProbe(fleet.ids, env.sampleSize);
    const load = startLoad(fleet, env.periodMs, [running, probe]);
    const backlog = (): number => load.offered - running.applied() - running.dropped();
    env.log(`  ${strategy.key} @ ${n}: warm-up ${env.warmupS} s`);
    await sleep(env.warmupS * 1000);
    await control.query('/*bench*/ CHECKPOINT');
    // the bench's own backends (staleness probe, counters) are not the strategy's cost
    const ownPids = [await backendPid(control), await backendPid(prober)];
    const ownCpu = (): number => ownPids.reduce((a, pid) => a + processCpuSeconds(pid), 0);
    const own0 = ownCpu();
    const c0: DbCounters = await readCounters(control, env.pgss, env.postmasterPid);
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const offered0 = load.offered;
    const applied0 = running.applied();
    const extra0 = running.extra();
    const dropped0 = running.dropped();
    const backlog0 = backlog();
    probe.start(prober);
    const points: Array<[number, number]> = [];
    const offeredPts: Array<[number, number]> = [[0, offered0]];
    const appliedPts: Array<[number, number]> = [[0, applied0]];
    env.log(`  ${strategy.key} @ ${n}: measuring ${env.durationS} s`);
    const end = t0 + env.durationS * 1000;
    while (performance.now() < end) {
      await sleep(Math.min(1000, end - performance.now()));
      const t = (performance.now() - t0) / 1000;
      points.push([t, backlog()]);
      offeredPts.push([t, load.offered]);
      appliedPts.push([t, running.applied()]);
    }
    load.stop();
    const t1 = performance.now();
    const offered = load.offered - offered0;
    const applied = running.applied() - applied0;
    const dropped = running.dropped() - dropped0;
    const backlog1 = backlog();
    const extra1 = running.extra();
    const extra = Object.fromEntries(
      Object.entries(extra1).map(([k, v]) => [k, /max|pending|queued|backlog/i.test(k) ? v : round(v - (extra0[k] ?? 0), 1)]),
    );
    const staleness = await probe.stop();
    const cpu1 = process.cpuUsage(cpu0);
    // WAL, CPU, statements and commits at the end of the window, before stopping the strategy
    // (its shutdown, e.g. the stagers' final COPY, is not part of the window)
    const c1 = await readCounters(control, env.pgss, env.postmasterPid);
    const ownUsed = ownCpu() - own0;
    await running.stop();
    // table statistics after the strategy's connections closed (they report on exit)
    await sleep(500);
    const c2 = await readCounters(control, env.pgss, env.postmasterPid);
    const seconds = (t1 - t0) / 1000;
    const wal = await walDiff(control, c0.walLsn, c1.walLsn);
    const benchQueries = staleness.queries + 6;
    const dbCpu = c1.dbCpuSeconds - c0.dbCpuSeconds - (Number.isFinite(ownUsed) ? ownUsed : 0);
    const clientCpu = (cpu1.user + cpu1.system) / 1e6;
    const updates = c2.tupUpd - c0.tupUpd;
    const hot = c2.tupHotUpd - c0.tupHotUpd;
    const byQuery: Record<string, number> = {};
    for (const [q, calls] of Object.entries(c1.statementsByQuery)) {
      const d = calls - (c0.statementsByQuery[q] ?? 0);
      if (d > 0) byQuery[q] = d;
    }
    // rates as least-squares slopes of the cumulative counts (sampled every second): a strategy that
    // applies in steps (a merge every 5 s) is not over- or under-counted by where the window cuts a step
    const offeredPerS = slope(offeredPts);
    const appliedPerS = slope(appliedPts);
    const growth = slope(points);
    const result: PhaseResult = {
      strategy: strategy.key,
      label: strategy.label,
      agents: n,
      durationS: round(seconds, 1),
      offeredPerS: round(offeredPerS, 1),
      appliedPerS: round(appliedPerS, 1),
      droppedPerS: round(dropped / seconds, 1),
      backlogStart: backlog0,
      backlogEnd: backlog1,
      backlogGrowthPerS: round(growth, 1),
      statementsPerS: round((c1.statements - c0.statements) / seconds, 2),
      statementsByQuery: byQuery,
      commitsPerS: round((c1.xactCommit - c0.xactCommit - benchQueries) / seconds, 2),
      walBytes: wal,
      walBytesPerHeartbeat: round(wal / applied, 1),
      walFpi: c1.walFpi - c0.walFpi,
      walRecordsPerHeartbeat: round((c1.walRecords - c0.walRecords) / applied, 3),
      dbCpuSeconds: round(dbCpu, 2),
      benchBackendCpuSeconds: round(ownUsed, 2),
      dbCpuSecondsPer100k: round((dbCpu / applied) * 1e5, 3),
      dbCpuPercentOfOneCore: round((dbCpu / seconds) * 100, 1),
      clientCpuSeconds: round(clientCpu, 2),
      clientCpuSecondsPer100k: round((clientCpu / offered) * 1e5, 3),
      staleness,
      updates,
      hotUpdates: hot,
      hotRatio: round(updates > 0 ? hot / updates : NaN, 3),
      deadTuplesEnd: c2.deadTup,
      autovacuums: c2.autovacuums - c0.autovacuums,
      sustained: appliedPerS >= 0.97 * offeredPerS && staleness.p99Ms < 10_000,
      extra,
    };
    return result;
  } finally {
    await control.end().catch(() => {});
    await prober.end().catch(() => {});
    const cleanup = new pg.Client({ connectionString: env.adminUrl });
    await cleanup.connect();
    await cleanup.query(`/*bench*/ DROP DATABASE IF EXISTS ${pg.escapeIdentifier(db)} WITH (FORCE)`).catch(() => {});
    await cleanup.end();
  }
}

export function round(x: number, digits: number): number {
  if (!Number.isFinite(x)) return x;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

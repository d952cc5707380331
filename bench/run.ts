/**
 * `npm run bench [-- options]`: the write
 * reduction measured side by side. See docs/benchmark.md.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { migrate } from '../src/migrate.ts';
import { PACKAGE_ROOT } from '../src/paths.ts';
import { type Cluster, startCluster } from '../test/support/cluster.ts';
import { renderChart } from './chart.ts';
import { makeFleet } from './load.ts';
import { findPostmaster, hasPgStatStatements } from './metrics.ts';
import { runMicro, type MicroResult } from './micro.ts';
import { type PhaseEnv, type PhaseResult, runPhase } from './phase.ts';
import { allStrategies, DEFAULT_STRATEGIES } from './strategies/index.ts';
import { formatTable } from './table.ts';
import { searchCeiling, type CeilingResult } from './ceiling.ts';

/** Server settings of the bench cluster (reported in the results). Production-like durability: fsync, full pages. */
export const BENCH_SETTINGS: Record<string, string | number> = {
  shared_preload_libraries: 'pg_stat_statements',
  'pg_stat_statements.track': 'top',
  fsync: 'on',
  synchronous_commit: 'on',
  full_page_writes: 'on',
  wal_compression: 'off',
  shared_buffers: '1GB',
  work_mem: '4MB',
  maintenance_work_mem: '256MB',
  max_wal_size: '20GB',
  min_wal_size: '1GB',
  checkpoint_timeout: '1h',
  max_connections: 200,
  log_checkpoints: 'on',
};

const OPTIONS = {
  sizes: { type: 'string', default: '10000,100000,1000000' },
  duration: { type: 'string', default: '60' },
  warmup: { type: 'string', default: '20' },
  period: { type: 'string', default: '15' },
  strategies: { type: 'string', default: DEFAULT_STRATEGIES.join(',') },
  sample: { type: 'string', default: '1000' },
  ceiling: { type: 'boolean', default: false },
  'ceiling-strategies': { type: 'string', default: 'reference,pg-heartbeat' },
  'ceiling-duration': { type: 'string', default: '30' },
  'ceiling-start': { type: 'string', default: '' },
  micro: { type: 'boolean', default: true },
  'no-micro': { type: 'boolean', default: false },
  out: { type: 'string', default: join(PACKAGE_ROOT, 'bench', 'results') },
  tag: { type: 'string', default: '' },
  help: { type: 'boolean', short: 'h' },
} as const;

export const BENCH_HELP: Record<string, string> = {
  sizes: 'fleet sizes, comma-separated (default 10000,100000,1000000)',
  duration: 'seconds measured per phase at the real rate (default 60)',
  warmup: 'seconds of load before each measured window (default 20)',
  period: 'heartbeat period per agent in seconds (default 15)',
  strategies: `comma-separated (default ${DEFAULT_STRATEGIES.join(',')})`,
  sample: 'agents sampled for staleness (default 1000)',
  ceiling: 'also search the largest sustained fleet per strategy',
  'ceiling-strategies': 'strategies for --ceiling (default reference,pg-heartbeat)',
  'ceiling-duration': 'seconds measured per ceiling probe (default 30)',
  'ceiling-start': 'first fleet size tried per strategy, e.g. reference=400000,pg-heartbeat=800000',
  'no-micro': 'skip the stage() micro-benchmark',
  out: 'results folder (default bench/results)',
  tag: 'suffix for the result file names',
};

export interface BenchReport {
  date: string;
  machine: Record<string, unknown>;
  postgres: Record<string, unknown>;
  options: Record<string, unknown>;
  method: string[];
  micro?: MicroResult;
  results: PhaseResult[];
  ceiling?: CeilingResult[];
}

const log = (line: string): void => console.error(line);

export async function runBench(argv: string[], out: (line: string) => void = console.log, databaseUrl = process.env.DATABASE_URL): Promise<number> {
  const { values } = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false });
  if (values.help) {
    out('usage: npm run bench -- [options]\n');
    for (const [k, v] of Object.entries(BENCH_HELP)) out(`  --${k.padEnd(20)} ${v}`);
    return 0;
  }
  const sizes = values.sizes.split(',').map((s) => Number(s.trim())).filter((n) => n > 0);
  const known = allStrategies();
  const chosen = values.strategies.split(',').map((s) => s.trim()).filter(Boolean);
  for (const k of chosen) if (!known.has(k)) throw new Error(`unknown strategy ${k}; known: ${[...known.keys()].join(', ')}`);
  const durationS = Number(values.duration);
  const warmupS = Number(values.warmup);
  const periodMs = Number(values.period) * 1000;

  let cluster: Cluster | undefined;
  let adminUrl: string;
  if (databaseUrl) {
    adminUrl = databaseUrl;
    log(`using DATABASE_URL (server settings are the server's own)`);
  } else {
    log('starting a PostgreSQL cluster for the bench');
    cluster = await startCluster({ settings: BENCH_SETTINGS });
    adminUrl = cluster.url('postgres');
  }
  const dbUrl = (db: string): string => {
    const u = new URL(adminUrl);
    u.pathname = `/${db}`;
    return u.toString();
  };
  const stopping = async (): Promise<void> => {
    await cluster?.destroy();
  };
  const onSignal = (): void => {
    void stopping().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const admin = new pg.Client({ connectionString: adminUrl });
    await admin.connect();
    const version = (await admin.query('/*bench*/ SELECT version() AS v')).rows[0].v as string;
    const settingRows = (
      await admin.query(
        `/*bench*/ SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1)`,
        [[...Object.keys(BENCH_SETTINGS), 'autovacuum', 'autovacuum_naptime', 'max_worker_processes', 'wal_level']],
      )
    ).rows as Array<{ name: string; setting: string; unit: string | null }>;
    const postmasterPid = await findPostmaster(admin);
    await admin.end();
    const settings = Object.fromEntries(settingRows.map((r) => [r.name, r.unit ? `${r.setting} ${r.unit}` : r.setting]));
    const date = new Date().toISOString().slice(0, 10);
    const machine = {
      cpuModel: cpus()[0]?.model,
      cores: cpus().length,
      memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
      node: process.version,
      loadAverageAtStart: readFileSync('/proc/loadavg', 'utf8').trim(),
      note: 'shared with other engineers\' test runs; compare ratios measured within one run',
    };
    const replicaIds = [randomUUID(), randomUUID(), randomUUID()];
    const firstConnectedAt = new Date();
    mkdirSync(values.out, { recursive: true });

    let micro: MicroResult | undefined;
    if (values.micro && !values['no-micro']) {
      log('micro-benchmark: stage() and heap per pending agent');
      const tpl = await createTemplate(adminUrl, dbUrl, 'bench_micro', 0, false);
      micro = await runMicro(dbUrl(tpl));
      await dropDb(adminUrl, tpl);
      out(`stage(): median ${micro.stageNsMedianNewAgent} ns (new agent), ${micro.stageNsMedianRepeatAgent} ns (repeat agent); ` +
        `heap ${micro.heapBytesPerPendingAgent} bytes per pending agent`);
    }

    const envFor = (template: string, pgss: boolean, d: number, w: number): PhaseEnv => ({
      adminUrl, dbUrl, template, periodMs, warmupS: w, durationS: d, sampleSize: Number(values.sample), pgss,
      postmasterPid, replicaIds, firstConnectedAt, log,
    });
    const all: PhaseResult[] = [];
    const tag = values.tag ? `-${values.tag}` : '';
    const method = methodNotes(periodMs);
    for (const n of sizes) {
      log(`preparing ${n.toLocaleString('en-US')} agents`);
      const template = await createTemplate(adminUrl, dbUrl, `bench_tpl_${n}`, n, true);
      const ids = await agentIds(dbUrl(template));
      const pgss = await withClient(dbUrl(template), hasPgStatStatements);
      const fleet = makeFleet(ids);
      const results: PhaseResult[] = [];
      for (const key of chosen) {
        let r: PhaseResult;
        try {
          r = await runPhase(known.get(key)!, fleet, envFor(template, pgss, durationS, warmupS));
        } catch (err) {
          log(`  ${key} @ ${n} failed: ${err instanceof Error ? err.message : String(err)}`);
          continue;
        }
        results.push(r);
        all.push(r);
        out(formatTable([r], results.length === 1));
      }
      await dropDb(adminUrl, template);
      const report: BenchReport = {
        date: new Date().toISOString(), machine, postgres: { version, settings }, method,
        options: { sizes, durationS, warmupS, periodMs, strategies: chosen, sample: Number(values.sample) },
        micro, results,
      };
      const file = join(values.out, `${date}-${n}${tag}.json`);
      writeFileSync(file, JSON.stringify(report, null, 2) + '\n');
      log(`wrote ${file}`);
    }
    out('');
    out(formatTable(all, true));

    let ceiling: CeilingResult[] | undefined;
    if (values.ceiling) {
      const starts = Object.fromEntries(
        values['ceiling-start'].split(',').filter(Boolean).map((kv) => kv.split('=') as [string, string]).map(([k, v]) => [k, Number(v)]),
      );
      ceiling = [];
      for (const key of values['ceiling-strategies'].split(',').map((s) => s.trim()).filter(Boolean)) {
        const strategy = known.get(key);
        if (!strategy) throw new Error(`unknown strategy ${key}`);
        const c = await searchCeiling(strategy, starts[key] ?? 400_000, {
          prepare: async (n) => {
            const template = await createTemplate(adminUrl, dbUrl, `bench_tpl_${n}`, n, true);
            const ids = await agentIds(dbUrl(template));
            const pgss = await withClient(dbUrl(template), hasPgStatStatements);
            return { fleet: makeFleet(ids), env: envFor(template, pgss, Number(values['ceiling-duration']), warmupS), done: () => dropDb(adminUrl, template) };
          },
          log,
        });
        ceiling.push(c);
        out(`ceiling ${key}: ${c.ceiling.toLocaleString('en-US')} agents (${Math.round(c.ceiling / (periodMs / 1000)).toLocaleString('en-US')} heartbeats/s)`);
      }
      const file = join(values.out, `${date}-ceiling${tag}.json`);
      writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), machine, postgres: { version, settings }, method, ceiling }, null, 2) + '\n');
      log(`wrote ${file}`);
    }
    if (all.length) {
      const svg = join(values.out, `${date}${tag}.svg`);
      writeFileSync(svg, renderChart(all, `pg-heartbeat benchmark ${date}: ${machine.cores} cores, ${version.split(' ').slice(0, 2).join(' ')}`));
      log(`wrote ${svg}`);
    }
    return 0;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await stopping();
  }
}

function methodNotes(periodMs: number): string[] {
  return [
    `Each agent heartbeats every ${periodMs / 1000} s at a random phase (a fixed random permutation), so the fleet offers N/${periodMs / 1000} heartbeats/s at the real rate; no time compression.`,
    'Every strategy runs against its own copy (CREATE DATABASE ... TEMPLATE, FILE_COPY) of the same template: migrated, N agents never heartbeated, VACUUM ANALYZEd.',
    'Warm-up at the real rate, then CHECKPOINT, then the measured window; counters are deltas over the window.',
    'statementsPerS: top-level statements of the phase database from pg_stat_statements (the bench\'s own probe/counter queries excluded); commitsPerS: pg_stat_database.xact_commit delta minus the bench\'s own queries.',
    'walBytesPerHeartbeat: pg_current_wal_lsn() difference over the window / heartbeats applied in the window (includes full-page images after the CHECKPOINT, alike for every strategy).',
    'dbCpuSecondsPer100k: utime+stime of the postmaster, its children, and reaped children (cutime/cstime) from /proc, over the window, minus the CPU of the bench\'s own backends (staleness probe, counter queries), per 100k heartbeats applied; clientCpu: process.cpuUsage() of the bench process (load generator and prober included, the same for all strategies) per 100k offered.',
    'applied: heartbeats committed to workspace_agents (naive: UPDATEs done; reference: heartbeats in successful flushes/direct writes; pg-heartbeat: staged rows consumed by merges, one per heartbeat at this period).',
    'staleness: for a random sample of agents, time from stage()/Add()/UPDATE call until workspace_agents shows that updated_at (or newer), polled every 200 ms; not visible by the end of the window counts with its age then.',
    'offered/applied per second: least-squares slopes of the cumulative counts sampled every second (so a merge every 5 s is not miscounted by where the window cuts it); backlogGrowthPerS: slope of offered - applied - dropped.',
    'sustained: applied >= 97% of offered (i.e. the backlog grows by less than 3% of the rate) and staleness p99 < 10 s.',
  ];
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

async function dropDb(adminUrl: string, name: string): Promise<void> {
  await withClient(adminUrl, (c) => c.query(`/*bench*/ DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`));
}

/** A migrated database with `n` agents (never heartbeated) and pg_stat_statements, vacuumed and checkpointed. */
async function createTemplate(adminUrl: string, dbUrl: (db: string) => string, name: string, n: number, pgss: boolean): Promise<string> {
  await dropDb(adminUrl, name);
  await withClient(adminUrl, (c) => c.query(`/*bench*/ CREATE DATABASE ${pg.escapeIdentifier(name)}`));
  await migrate({ connectionString: dbUrl(name) }, { logger: silentLogger });
  await withClient(dbUrl(name), async (c) => {
    if (pgss) await c.query('/*bench*/ CREATE EXTENSION IF NOT EXISTS pg_stat_statements').catch(() => {});
    if (n > 0) {
      await c.query(
        `/*bench*/ INSERT INTO public.workspace_agents (id, created_at, updated_at)
         SELECT gen_random_uuid(), now() - interval '1 day', timestamptz '2020-01-01' FROM generate_series(1, $1::int)`,
        [n],
      );
    }
    await c.query('/*bench*/ VACUUM ANALYZE');
    await c.query('/*bench*/ CHECKPOINT');
  });
  return name;
}

async function agentIds(url: string): Promise<string[]> {
  return withClient(url, async (c) => {
    const { rows } = await c.query<{ id: string }>('/*bench*/ SELECT id::text AS id FROM public.workspace_agents');
    return rows.map((r) => r.id);
  });
}

if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  runBench(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`bench: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
      process.exit(1);
    },
  );
}

/**
 * What the metrics queries cost as the fleet grows: `npm run bench:metrics-cost` (or
 * `node --import tsx bench/metrics-cost.ts [10000 100000 1000000]`), on a throwaway PostgreSQL it
 * starts (or on DATABASE_URL). For each fleet size it fills workspace_agents (a third connected, a
 * third disconnected, a third never connected), VACUUM ANALYZEs, then times, after one warm-up run,
 * 7 runs of each query the collectors and /metrics run, and prints the median and the largest:
 *   - agents by status: the sql_exporter query over heartbeat.agent_status() (a whole-table scan);
 *   - heartbeat.status + part_status(): what a /metrics scrape and `status --check` read (staging only).
 */
import pg from 'pg';
import { migrate } from '../src/migrate.ts';
import { silentLogger } from '../src/logger.ts';
import { type Cluster, startCluster } from '../test/support/cluster.ts';
import { parse } from 'yaml';
import { readFileSync } from 'node:fs';

const sizes = process.argv.slice(2).map(Number).filter((n) => n > 0);
const SIZES = sizes.length ? sizes : [10_000, 100_000, 1_000_000];
const RUNS = 7;

const collector = (file: string, query: string): string =>
  (parse(readFileSync(`operations/sql_exporter/${file}`, 'utf8')) as { queries: { query_name: string; query: string }[] })
    .queries.find((q) => q.query_name === query)!.query;
const AGENTS_SQL = collector('pg_heartbeat_agents.collector.yml', 'agents_by_status');
const PARTS_SQL = collector('pg_heartbeat.collector.yml', 'parts');
const STATUS_SQL = 'SELECT * FROM heartbeat.status';

async function time(client: pg.Client, sql: string): Promise<{ median: number; max: number }> {
  await client.query(sql);
  const ms: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    await client.query(sql);
    ms.push(performance.now() - t0);
  }
  ms.sort((a, b) => a - b);
  return { median: ms[Math.floor(RUNS / 2)]!, max: ms.at(-1)! };
}

let cluster: Cluster | undefined;
let url = process.env.DATABASE_URL;
if (!url) {
  cluster = await startCluster({ settings: { shared_buffers: '256MB' } });
  url = cluster.url();
}
const admin = new pg.Client({ connectionString: url });
await admin.connect();
const name = `hb_metrics_cost_${process.pid}`;
await admin.query(`CREATE DATABASE ${name}`);
const dbUrl = new URL(url);
dbUrl.pathname = `/${name}`;
try {
  await migrate({ connectionString: dbUrl.toString() }, { logger: silentLogger });
  const client = new pg.Client({ connectionString: dbUrl.toString() });
  await client.connect();
  const fmt = (t: { median: number; max: number }): string => `${t.median.toFixed(1)} ms (max ${t.max.toFixed(1)})`;
  console.log(`PostgreSQL ${(await client.query('SHOW server_version')).rows[0].server_version}, ${RUNS} runs after a warm-up, median (max)`);
  console.log('| agents | agents by status (agent_status() scan) | heartbeat.status | part_status() (collector) | table size |');
  console.log('| ---: | ---: | ---: | ---: | ---: |');
  let have = 0;
  for (const n of SIZES) {
    const add = n - have;
    await client.query(
      `INSERT INTO public.workspace_agents (id, first_connected_at, last_connected_at, disconnected_at, updated_at)
       SELECT gen_random_uuid(),
              CASE WHEN i % 3 = 2 THEN NULL ELSE now() - interval '1 hour' END,
              CASE WHEN i % 3 = 2 THEN NULL ELSE now() END,
              CASE WHEN i % 3 = 1 THEN now() + interval '1 second' END,
              now()
         FROM generate_series(1, $1) i`,
      [add],
    );
    have = n;
    await client.query('VACUUM ANALYZE public.workspace_agents');
    const agents = await time(client, AGENTS_SQL);
    const status = await time(client, STATUS_SQL);
    const parts = await time(client, PARTS_SQL);
    const size = (await client.query("SELECT pg_size_pretty(pg_total_relation_size('public.workspace_agents')) AS s")).rows[0].s;
    console.log(`| ${n.toLocaleString('en-US')} | ${fmt(agents)} | ${fmt(status)} | ${fmt(parts)} | ${size} |`);
  }
  await client.end();
} finally {
  await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  await admin.end();
  await cluster?.destroy();
}

/**
 * operations/: the Grafana dashboard uses only metrics that `/metrics` or the sql_exporter collectors
 * actually serve; the collectors' SQL runs against a real migrated database, as a heartbeat_reader, and
 * returns the columns each metric declares; docs/operations.md lists every metric. And the health check,
 * `pg-heartbeat status --check`, returns each of its exit codes in a real situation.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { Registry } from 'prom-client';
import { parse } from 'yaml';
import { HeartbeatStager, HEARTBEAT_METRICS, mergeNow, registerHeartbeatMetrics, serveMetrics, silentLogger, startMerger } from '../src/index.ts';
import { runCli, type Run } from './support/cli-process.ts';
import { freePort } from './support/cluster.ts';
import { adminQuery, createAgents, createTestDb, type TestDb } from './support/db.ts';
import { scrape, servedNames } from './support/prometheus.ts';
import { waitFor } from './support/wait.ts';

const DASHBOARD = 'operations/grafana/pg-heartbeat.dashboard.json';
const COLLECTOR_DIR = 'operations/sql_exporter';

interface CollectorMetric {
  metric_name: string;
  type: string;
  help: string;
  key_labels?: string[];
  values: string[];
  query_ref?: string;
  query?: string;
}
interface Collector { collector_name: string; min_interval?: string; metrics: CollectorMetric[]; queries?: { query_name: string; query: string }[] }

const collectors: [string, Collector][] = readdirSync(COLLECTOR_DIR)
  .filter((f) => f.endsWith('.collector.yml'))
  .sort()
  .map((f) => [f, parse(readFileSync(`${COLLECTOR_DIR}/${f}`, 'utf8')) as Collector]);
const collectorNames = new Set(collectors.flatMap(([, c]) => c.metrics.map((m) => m.metric_name)));

const PROMQL_WORDS = new Set([
  'sum', 'max', 'min', 'avg', 'count', 'rate', 'irate', 'increase', 'delta', 'deriv', 'histogram_quantile', 'topk', 'bottomk',
  'quantile', 'stddev', 'abs', 'clamp_min', 'clamp_max', 'absent', 'vector', 'scalar', 'time', 'max_over_time', 'min_over_time',
  'avg_over_time', 'label_replace', 'and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right',
]);

/** The metric names a PromQL expression reads (strings, label matchers, ranges and grouping labels removed). */
export function promqlMetricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, '')
    .replace(/\[[^\]]*\]/g, '')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, '');
  return [...new Set((bare.match(/[a-zA-Z_:][a-zA-Z0-9_:]*/g) ?? []).filter((t) => !PROMQL_WORDS.has(t)))];
}

function dashboardExprs(): { title: string; expr: string }[] {
  const d = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { title: string; panels: { title: string; targets?: { expr?: string }[] }[] };
  assert.equal(d.title, 'pg-heartbeat');
  assert.ok(d.panels.length >= 6);
  return d.panels.flatMap((p) => {
    assert.ok(p.targets && p.targets.length > 0, `panel ${p.title} has queries`);
    return p.targets.map((t) => ({ title: p.title, expr: t.expr! }));
  });
}

let db: TestDb;
before(async () => {
  db = await createTestDb('operations');
});
after(async () => {
  await db.drop();
});

describe('the Grafana dashboard', () => {
  test('the PromQL name extractor finds names and nothing else', () => {
    assert.deepEqual(promqlMetricNames('histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket{job="x"}[$__rate_interval])))'), ['a_seconds_bucket']);
    assert.deepEqual(promqlMetricNames('max by (part) (b) or min(c) == 0'), ['b', 'c']);
  });

  test('parses, and every metric its queries use is served by /metrics or a sql_exporter collector', async () => {
    const registry = new Registry();
    const stager = new HeartbeatStager({ pool: db.pool }, { logger: silentLogger });
    const merger = startMerger({ pool: db.pool }, { intervalMs: 100, logger: silentLogger });
    const metrics = await registerHeartbeatMetrics(registry, { stager, merger, database: { pool: db.pool } });
    const server = await serveMetrics(registry, { port: 0 });
    try {
      const [id] = await createAgents(db.pool, 1);
      stager.stage({ agentId: id!, lastConnectedAt: new Date(), updatedAt: new Date() });
      await stager.flush();
      const start = merger.stats().merges;
      await waitFor(() => merger.stats().merges > start, 'a merge', 30_000);
      const served = servedNames(await scrape(server.url));
      const exprs = dashboardExprs();
      const used = new Set(exprs.flatMap((e) => promqlMetricNames(e.expr)));
      const missing = [...used].filter((n) => !served.has(n) && !collectorNames.has(n));
      assert.deepEqual(missing, [], 'metrics the dashboard uses that nothing serves');
      for (const n of used) assert.match(n, /^pg_heartbeat_/, `${n}: the dashboard reads pg-heartbeat's metrics only`);
      // the panels the issue asks for
      for (const n of ['pg_heartbeat_staging_oldest_row_age_seconds', 'pg_heartbeat_staging_rows', 'pg_heartbeat_merger_agents_updated_total',
        'pg_heartbeat_merger_failures_total', 'pg_heartbeat_agents']) assert.ok(used.has(n), `the dashboard shows ${n}`);
    } finally {
      await server.close();
      await metrics.unregister();
      await merger.close();
      await stager.close();
    }
  });
});

describe('the sql_exporter collectors', () => {
  test('well-formed: names, types, HELP, values, a query for each metric; the same type and HELP as /metrics for shared names', () => {
    assert.deepEqual(collectors.map(([f]) => f), ['pg_heartbeat.collector.yml', 'pg_heartbeat_agents.collector.yml']);
    for (const [file, c] of collectors) {
      assert.match(c.collector_name, /^pg_heartbeat/, file);
      for (const m of c.metrics) {
        assert.match(m.metric_name, /^pg_heartbeat_[a-z0-9_]+$/, `${file}: ${m.metric_name}`);
        assert.ok(['gauge', 'counter'].includes(m.type), `${m.metric_name}: type ${m.type}`);
        assert.equal(m.type === 'counter', m.metric_name.endsWith('_total'), `${m.metric_name}: counters and only counters end in _total`);
        assert.ok(m.help.length > 10, `${m.metric_name}: HELP`);
        assert.equal(m.values.length, 1, `${m.metric_name}: one value column`);
        assert.ok(m.query !== undefined || c.queries?.some((q) => q.query_name === m.query_ref), `${m.metric_name}: its query ${m.query_ref} exists`);
        const same = HEARTBEAT_METRICS.find((d) => d.name === m.metric_name);
        if (same) {
          assert.equal(m.type, same.type, `${m.metric_name}: the same type as /metrics`);
          assert.equal(m.help, same.help, `${m.metric_name}: the same HELP as /metrics`);
          assert.deepEqual(m.key_labels ?? [], [...same.labels], `${m.metric_name}: the same labels as /metrics`);
        }
      }
    }
    assert.equal(collectors[1]![1].min_interval, '60s', 'the agent_status() scan runs at most once a minute');
  });

  test('every query runs against a migrated database as a heartbeat_reader and returns the declared columns', async () => {
    const ids = await createAgents(db.pool, 5);
    await db.pool.query('UPDATE public.workspace_agents SET first_connected_at = now(), last_connected_at = now(), updated_at = now() WHERE id = ANY($1)', [ids.slice(0, 3)]);
    await db.pool.query("INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now() - interval '3 seconds')", [ids[4]]);
    await mergeNow(db.pool);
    await db.pool.query("INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now() - interval '3 seconds')", [ids[3]]);
    const role = `hb_metrics_${Math.random().toString(36).slice(2, 8)}`;
    await adminQuery(`CREATE ROLE ${role} NOLOGIN IN ROLE heartbeat_reader`);
    const client = await db.pool.connect();
    try {
      await client.query(`SET ROLE ${role}`);
      for (const [file, c] of collectors) {
        for (const m of c.metrics) {
          const sql = m.query ?? c.queries!.find((q) => q.query_name === m.query_ref)!.query;
          const { rows, fields } = await client.query(sql);
          const columns = fields.map((f) => f.name);
          for (const col of [...(m.key_labels ?? []), ...m.values]) assert.ok(columns.includes(col), `${file}: ${m.metric_name}: column ${col} in ${columns.join(', ')}`);
          assert.ok(rows.length > 0, `${file}: ${m.metric_name}: rows`);
          for (const row of rows) {
            for (const v of m.values) assert.ok(Number.isFinite(Number(row[v])) && row[v] !== null, `${m.metric_name}: ${v} = ${row[v]}`);
            for (const l of m.key_labels ?? []) assert.equal(typeof row[l], 'string', `${m.metric_name}: label ${l} is text`);
          }
        }
      }
      const staged = await client.query<{ staged_rows: number; oldest_row_age_seconds: number }>(collectors[0]![1].queries!.find((q) => q.query_name === 'parts')!.query);
      assert.equal(staged.rows.reduce((t, r) => t + r.staged_rows, 0), 1);
      assert.ok(Math.max(...staged.rows.map((r) => r.oldest_row_age_seconds)) >= 3);
      const agents = await client.query<{ status: string; agents: number }>(collectors[1]![1].queries![0]!.query);
      const byStatus = Object.fromEntries(agents.rows.map((r) => [r.status, r.agents]));
      const { rows: truth } = await db.pool.query<{ status: string; n: string }>('SELECT status, count(*) AS n FROM heartbeat.agent_status() GROUP BY status');
      assert.deepEqual(Object.keys(byStatus).sort(), ['connected', 'connecting', 'disconnected', 'timeout']);
      for (const t of truth) assert.equal(byStatus[t.status], Number(t.n), t.status);
      assert.ok(byStatus.connected! >= 3);
    } finally {
      await client.query('RESET ROLE').catch(() => {});
      client.release();
      await adminQuery(`DROP ROLE ${role}`);
    }
  });
});

test('docs/operations.md lists every metric /metrics and the collectors serve', () => {
  const doc = readFileSync('docs/operations.md', 'utf8');
  for (const name of [...HEARTBEAT_METRICS.map((m) => m.name), ...collectorNames]) assert.match(doc, new RegExp(`\\| \`${name}\` \\|`), `${name} in the metrics tables`);
});

/** Asserts one line on the expected stream, nothing on the other. */
function oneLine(run: Run, code: number, pattern: RegExp): void {
  const [stream, other] = code === 0 ? [run.stdout, run.stderr] : [run.stderr, run.stdout];
  assert.equal(run.code, code, `exit code; stdout ${run.stdout} stderr ${run.stderr}`);
  assert.equal(other, '');
  assert.equal(stream.trim().split('\n').length, 1, stream);
  assert.match(stream.trim(), pattern);
}

describe('pg-heartbeat status --check', () => {
  test('0: a fresh install (nothing merged, nothing staged) and a merge just done are healthy', async () => {
    const fresh = await createTestDb('ops_fresh');
    try {
      oneLine(await runCli(['status', '--check', '--database-url', fresh.url]), 0, /^healthy: no merge since the server started; nothing staged \(--max-lag 30\.0 s\)$/);
      await mergeNow(fresh.pool);
      oneLine(await runCli(['status', '--check', '--max-lag', '30s'], { DATABASE_URL: fresh.url }), 0, /^healthy: last merge [\d.]+ m?s ago.*; nothing staged/);
    } finally {
      await fresh.drop();
    }
  });

  test('1: merges stopped for longer than --max-lag with rows staged; a staged row older than it; migrations missing', async () => {
    const stopped = await createTestDb('ops_stopped');
    const bare = await createTestDb('ops_bare', { migrated: false });
    try {
      await mergeNow(stopped.pool);
      const [id] = await createAgents(stopped.pool, 1);
      await stopped.pool.query('INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now())', [id]);
      oneLine(await runCli(['status', '--check', '--max-lag', '1m', '--database-url', stopped.url]), 0, /^healthy: last merge .*; 1 staged row\(s\), the oldest [\d.]+ m?s old/);
      await new Promise((r) => setTimeout(r, 1500));
      oneLine(await runCli(['status', '--check', '--max-lag', '1s', '--database-url', stopped.url]), 1,
        /^pg-heartbeat status: unhealthy: last merge [\d.]+ s ago.*, more than --max-lag 1\.0 s: are merges running\?; 1 staged row\(s\), the oldest [\d.]+ s old, more than --max-lag 1\.0 s$/);
      // never merged, but a row waits: the backlog alone is unhealthy
      const fresh = await createTestDb('ops_backlog');
      try {
        await fresh.pool.query("INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES (gen_random_uuid(), now() - interval '1 hour')");
        oneLine(await runCli(['status', '--check', '--database-url', fresh.url]), 1, /^pg-heartbeat status: unhealthy: 1 staged row\(s\), the oldest 360\d\.\d s old, more than --max-lag 30\.0 s$/);
      } finally {
        await fresh.drop();
      }
      oneLine(await runCli(['status', '--check', '--database-url', bare.url]), 1, /^pg-heartbeat status: unhealthy: .*run the migrations: pg-heartbeat migrate/);
      const bad = await runCli(['status', '--check', '--max-lag', 'soon', '--database-url', stopped.url]);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, /^pg-heartbeat status: --max-lag must be a positive duration such as 30s, 500ms or 2m, not "soon"\n$/);
    } finally {
      await Promise.all([stopped.drop(), bare.drop()]);
    }
  });

  test('2: nothing listening, a server that never answers, a black-holed address; each within the deadline', async () => {
    const closed = `postgresql://postgres@127.0.0.1:${await freePort()}/nowhere`;
    const sockets = new Set<Socket>();
    const silent = createServer((s) => void sockets.add(s.on('error', () => {})));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const silentUrl = `postgresql://postgres@127.0.0.1:${(silent.address() as { port: number }).port}/nowhere`;
    try {
      const [refused, mute, hole] = await Promise.all([
        runCli(['status', '--check', '--database-url', closed]),
        runCli(['status', '--check', '--timeout', '1s', '--database-url', silentUrl]),
        // TEST-NET-1 (RFC 5737): routed nowhere; SYNs vanish, or the kernel says unreachable at once
        runCli(['status', '--check', '--timeout', '1s', '--database-url', 'postgresql://postgres@192.0.2.1:5432/nowhere']),
      ]);
      oneLine(refused, 2, /^pg-heartbeat status: unreachable: cannot reach the database at postgresql:\/\/postgres@127\.0\.0\.1:\d+\/nowhere within 5\.0 s: .*ECONNREFUSED/);
      oneLine(mute, 2, /^pg-heartbeat status: unreachable: cannot reach the database at .* within 1\.0 s: /);
      oneLine(hole, 2, /^pg-heartbeat status: unreachable: cannot reach the database at postgresql:\/\/postgres@192\.0\.2\.1:5432\/nowhere within 1\.0 s: /);
      // generous: node and tsx start in a few seconds on a loaded machine; the OS's TCP timeout is minutes
      for (const r of [mute, hole]) assert.ok(r.ms < 30_000, `exited after ${Math.round(r.ms)} ms`);
    } finally {
      for (const s of sockets) s.destroy();
      silent.close();
    }
  });
});

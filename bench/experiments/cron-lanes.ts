/**
 * How fast pg_cron's merge lanes (sql/019) drain a backlog, measured side by side in one run:
 * a database holding N connected agents gets one staged heartbeat per agent (a backlog after an
 * outage of the merge: every row is the agent's newest, none changes its status), then
 * `CALL heartbeat.merge_loop(every => '59 seconds', run_for => '0', lane => k, lanes => L)` runs in
 * L sessions at once (what L pg_cron jobs do at one grid instant), for L = 1, 2 and 4, in turn and
 * repeated. Reported: the wall time until staging is empty, per L, and the ratio to L = 1.
 * The lanes start on a backlog their parts' merge_state shows (one bounded merge of every part first).
 *
 *   node --import tsx bench/experiments/cron-lanes.ts [DATABASE_URL] [agents=1000000] [repeats=2]
 * (DATABASE_URL: a superuser on a server on this machine; default postgresql://postgres@127.0.0.1:5432/postgres)
 */
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

const admin = process.argv[2] ?? 'postgresql://postgres@127.0.0.1:5432/postgres';
const agents = Number(process.argv[3] ?? 1_000_000);
const repeats = Number(process.argv[4] ?? 2);
const SQL_DIR = fileURLToPath(new URL('../../sql/', import.meta.url));
const files = readdirSync(SQL_DIR).filter((f) => /^\d{3}_.*\.sql$/.test(f)).sort();
const DB = 'hb_cron_lanes_experiment';

const urlFor = (db: string): string => {
  const u = new URL(admin);
  u.pathname = `/${db}`;
  return u.toString();
};

async function install(): Promise<void> {
  const a = new pg.Client({ connectionString: admin });
  await a.connect();
  await a.query(`DROP DATABASE IF EXISTS ${DB} WITH (FORCE)`);
  await a.query(`CREATE DATABASE ${DB}`);
  await a.query(readFileSync(`${SQL_DIR}roles.sql`, 'utf8')).catch(() => {});   // once per cluster
  await a.end();
  const c = new pg.Client({ connectionString: urlFor(DB) });
  await c.connect();
  await c.query('CREATE SCHEMA heartbeat');
  for (const f of files) {
    await c.query('BEGIN');
    await c.query(readFileSync(SQL_DIR + f, 'utf8'));
    await c.query('COMMIT');
  }
  await c.query(`INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at)
                 SELECT gen_random_uuid(), now() - interval '1 minute', now() - interval '1 minute', now() - interval '1 minute'
                   FROM generate_series(1, $1)`, [agents]);
  await c.query('VACUUM ANALYZE public.workspace_agents');
  await c.query('SELECT heartbeat.sweep_status()');
  await c.end();
}

async function stageBacklog(c: pg.Client): Promise<void> {
  await c.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
                 SELECT id, now(), now() FROM public.workspace_agents`);
  // one bounded merge of every part: merge_state now says each part left rows (as after an outage)
  await c.query('SELECT * FROM heartbeat.merge_agent_connections(max_rows => 4)');
  await c.query('VACUUM heartbeat.agent_connection_staging');
}

async function drain(lanes: number): Promise<number> {
  const clients = await Promise.all(Array.from({ length: lanes }, async () => {
    const c = new pg.Client({ connectionString: urlFor(DB) });
    await c.connect();
    return c;
  }));
  const t0 = performance.now();
  await Promise.all(clients.map((c, lane) =>
    c.query(`CALL heartbeat.merge_loop(every => '59 seconds', run_for => '0', lane => ${lane}, lanes => ${lanes})`)));
  const ms = performance.now() - t0;
  const { rows } = await clients[0]!.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging');
  await Promise.all(clients.map((c) => c.end()));
  if (Number(rows[0]!.n) !== 0) throw new Error(`${lanes} lane(s) left ${rows[0]!.n} rows staged (a drain stops after 59 s)`);
  return ms;
}

await install();
const c = new pg.Client({ connectionString: urlFor(DB) });
await c.connect();
const { rows: parts } = await c.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.staging_parts()');
const { rows: budget } = await c.query<{ n: number }>('SELECT max_rows_per_merge AS n FROM heartbeat.settings');
console.log(`${agents} agents, ${parts[0]!.n} staging parts, max_rows_per_merge ${budget[0]!.n}`);
const times = new Map<number, number[]>();
for (let r = 0; r < repeats; r++) {
  for (const lanes of [1, 2, 4]) {
    await stageBacklog(c);
    const ms = await drain(lanes);
    times.set(lanes, [...(times.get(lanes) ?? []), ms]);
    console.log(`  round ${r + 1}: ${lanes} lane(s) drained ${agents} staged rows in ${(ms / 1000).toFixed(2)} s`);
  }
}
await c.end();
const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
const one = mean(times.get(1)!);
console.log('\n| lanes | drain of the backlog (mean s) | vs 1 lane |\n|---:|---:|---:|');
for (const [lanes, xs] of times) console.log(`| ${lanes} | ${(mean(xs) / 1000).toFixed(2)} | ${(mean(xs) / one).toFixed(2)}× |`);
const a = new pg.Client({ connectionString: admin });
await a.connect();
await a.query(`DROP DATABASE IF EXISTS ${DB} WITH (FORCE)`);
await a.end();

/**
 * How fast a backlog of staged rows drains (issue 12: "1M staged rows after an outage drained in
 * < 60 s"), by pg_cron's merge lanes (sql/019) and by startMerger(), side by side in one run.
 * A database holding N agents gets one staged heartbeat per agent, of two kinds:
 *   live       every agent was connected a moment ago (a short outage of the merge): no status changes;
 *   reconnect  every agent timed out an hour ago (a long outage, or a fleet-wide reconnect): every
 *              row changes a status and records an event (the costliest merge there is).
 * The inactive timeout is 10 minutes here, so that no agent times out while its backlog drains (no live
 * heartbeats come meanwhile): otherwise the sweep at the end of the drain records a timeout for every agent.
 * Each backlog is drained by `CALL heartbeat.merge_loop(every => '59 seconds', run_for => '0', lane => k,
 * lanes => L)` in L sessions at once (what L pg_cron jobs do at one grid instant), for L = 1, 2 and 4,
 * starting from the backlog their parts' merge_state shows (one bounded merge of every part first);
 * then by startMerger() with its defaults (interval 5 s, fan-out over the parts on up to 4
 * connections), timed from its first tick. Reported: the wall time until staging is empty.
 *
 *   node --import tsx bench/experiments/cron-lanes.ts [DATABASE_URL] [agents=1000000] [repeats=2]
 * (DATABASE_URL: a superuser on a server on this machine, with autovacuum on, e.g. the one
 * bench/experiments/cluster.ts starts; default postgresql://postgres@127.0.0.1:5432/postgres)
 */
import pg from 'pg';
import { silentLogger } from '../../src/logger.ts';
import { startMerger } from '../../src/merger.ts';
import { migrate } from '../../src/migrate.ts';

const admin = process.argv[2] ?? 'postgresql://postgres@127.0.0.1:5432/postgres';
const agents = Number(process.argv[3] ?? 1_000_000);
const repeats = Number(process.argv[4] ?? 2);
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
  await a.end();
  await migrate({ connectionString: urlFor(DB) }, { logger: silentLogger });
  const c = new pg.Client({ connectionString: urlFor(DB) });
  await c.connect();
  await c.query(`INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at)
                 SELECT gen_random_uuid(), now() - interval '1 minute', now() - interval '1 minute', now() - interval '1 minute'
                   FROM generate_series(1, $1)`, [agents]);
  // no agent times out while a backlog drains (there are no live heartbeats here): a sweep at its end would
  // otherwise record a timeout for every agent the drain took longer than the timeout for, inside the last merge
  await c.query(`UPDATE heartbeat.settings SET inactive_timeout = '10 minutes'`);
  await c.query('VACUUM ANALYZE public.workspace_agents');
  await c.query('SELECT heartbeat.sweep_status()');
  await c.end();
}

type Kind = 'live' | 'reconnect';

async function stageBacklog(c: pg.Client, kind: Kind): Promise<void> {
  // every agent's row as the kind wants it, the status sweep's view of it recorded, the dead rows gone
  const ago = kind === 'live' ? '5 seconds' : '1 hour';
  await c.query(`UPDATE public.workspace_agents SET last_connected_at = now() - $1::interval, updated_at = now() - $1::interval,
                        disconnected_at = NULL`, [ago]);
  await c.query('SELECT heartbeat.sweep_status()');
  await c.query('VACUUM ANALYZE public.workspace_agents');
  await c.query('VACUUM heartbeat.status_events_pending');
  await c.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
                 SELECT id, now(), now() FROM public.workspace_agents`);
  // one bounded merge of every part: merge_state now says each part left rows (as after an outage)
  await c.query('SELECT * FROM heartbeat.merge_agent_connections(max_rows => 4)');
  await c.query('VACUUM ANALYZE heartbeat.agent_connection_staging');
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
const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
for (const kind of ['live', 'reconnect'] as const) {
  const times = new Map<string, number[]>();
  const record = (key: string, ms: number): void => void times.set(key, [...(times.get(key) ?? []), ms]);
  for (let r = 0; r < repeats; r++) {
    for (const lanes of [1, 2, 4]) {
      await stageBacklog(c, kind);
      const ms = await drain(lanes);
      record(`${lanes} lane(s)`, ms);
      console.log(`  ${kind}, round ${r + 1}: ${lanes} lane(s) drained ${agents} staged rows in ${(ms / 1000).toFixed(2)} s`);
    }
    await stageBacklog(c, kind);
    const t0 = performance.now();
    let firstTick = 0;
    const merger = startMerger({ connectionString: urlFor(DB) }, {
      logger: silentLogger, jitter: 0, onMerge: (report) => { firstTick ||= performance.now() - report.durationMs; },
    });
    for (;;) {
      const { rows } = await c.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging');
      if (Number(rows[0]!.n) === 0) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    const done = performance.now();
    await merger.close();
    record('startMerger() (defaults)', done - firstTick);
    console.log(`  ${kind}, round ${r + 1}: startMerger() drained ${agents} staged rows ${((done - t0) / 1000).toFixed(2)} s after its start, ` +
      `${((done - firstTick) / 1000).toFixed(2)} s from its first tick`);
  }
  const one = mean(times.get('1 lane(s)')!);
  console.log(`\n${kind}:\n| merged by | drain of ${agents} staged rows (mean s) | vs 1 lane |\n|---|---:|---:|`);
  for (const [key, xs] of times) console.log(`| ${key} | ${(mean(xs) / 1000).toFixed(2)} | ${(mean(xs) / one).toFixed(2)}× |`);
}
await c.end();
const a = new pg.Client({ connectionString: admin });
await a.connect();
await a.query(`DROP DATABASE IF EXISTS ${DB} WITH (FORCE)`);
await a.end();

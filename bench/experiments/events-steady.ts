/**
 * What status events cost (issue 13), measured side by side in one run:
 *
 * 1. Steady state: two databases on one server, A with pg-heartbeat before events (sql/001-014),
 *    B with them (001-017). Both hold N connected agents; each round stages a third of them (one
 *    merge interval of a fleet heartbeating every 15 s, merged every 5 s) and merges, A and B
 *    interleaved. Reported: the merging backend's CPU time (utime + stime from /proc/<pid>/stat,
 *    so the server's work only), per 100k heartbeats, for the merge alone and for merge + sweep
 *    (what a merger tick does in B), and the ratio B / A (means: /proc counts in 10 ms ticks).
 * 2. A connect wave: the same two databases, every agent disconnected, then a heartbeat for a third of them
 *    merged at once (what a mass reconnect after an outage looks like): in B every row is a status change
 *    (the merge's second step and one event each). Same measure.
 * 3. A disconnect storm in B: 10,000 agents connected through one replica, one
 *    disconnect_replica(); the time until a LISTENing reader has read all 10,000 events.
 *
 *   node --import tsx bench/experiments/events-steady.ts [DATABASE_URL] [agents=100000] [rounds=8]
 * (DATABASE_URL: a superuser on a server on this machine; default postgresql://postgres@127.0.0.1:5432/postgres)
 */
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

const admin = process.argv[2] ?? 'postgresql://postgres@127.0.0.1:5432/postgres';
const agents = Number(process.argv[3] ?? 100_000);
const rounds = Number(process.argv[4] ?? 8);
const SQL_DIR = fileURLToPath(new URL('../../sql/', import.meta.url));
const files = readdirSync(SQL_DIR).filter((f) => /^\d{3}_.*\.sql$/.test(f)).sort();

const urlFor = (db: string): string => {
  const u = new URL(admin);
  u.pathname = `/${db}`;
  return u.toString();
};

async function install(db: string, upTo: number): Promise<void> {
  const a = new pg.Client({ connectionString: admin });
  await a.connect();
  await a.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
  await a.query(`CREATE DATABASE ${db}`);
  await a.query(readFileSync(`${SQL_DIR}roles.sql`, 'utf8')).catch(() => {});   // once per cluster
  await a.end();
  const c = new pg.Client({ connectionString: urlFor(db) });
  await c.connect();
  await c.query('CREATE SCHEMA heartbeat');
  for (const f of files.filter((f) => Number(f.slice(0, 3)) <= upTo)) {
    await c.query('BEGIN');
    await c.query(readFileSync(SQL_DIR + f, 'utf8'));
    await c.query('COMMIT');
  }
  await c.query(`INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at)
                 SELECT gen_random_uuid(), now(), now(), now() FROM generate_series(1, $1)`, [agents]);
  await c.query('VACUUM ANALYZE public.workspace_agents');
  if (upTo >= 15) await c.query('SELECT heartbeat.sweep_status()');
  await c.end();
}

function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return ((Number(f[11]) + Number(f[12])) * 1000) / 100;   // utime + stime, in clock ticks of 10 ms
}

interface Side { name: string; db: string; client: pg.Client; pid: number; events: boolean; merge: number[]; tick: number[]; rows: number }

async function side(name: string, db: string, events: boolean): Promise<Side> {
  const client = new pg.Client({ connectionString: urlFor(db) });
  await client.connect();
  const pid = (await client.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
  return { name, db, client, pid, events, merge: [], tick: [], rows: 0 };
}

async function round(s: Side, offset: number): Promise<void> {
  const c = s.client;
  // a third of the fleet heartbeats (staged as a COPY would: one INSERT, no index)
  await c.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
                 SELECT id, first_connected_at, clock_timestamp(), clock_timestamp()
                   FROM (SELECT id, first_connected_at, row_number() OVER (ORDER BY id) AS n FROM public.workspace_agents) w
                  WHERE n % 3 = $1`, [offset % 3]);
  const before = cpuMs(s.pid);
  const r = await c.query<{ rows_consumed: string }>('SELECT rows_consumed FROM heartbeat.merge_agent_connections()');
  const merged = cpuMs(s.pid);
  if (s.events) {
    await c.query('UPDATE heartbeat.event_state SET last_sweep_at = NULL');   // a sweep every round, as every tick would
    const b2 = cpuMs(s.pid);
    await c.query('SELECT heartbeat.sweep_status()');
    s.tick.push(merged - before + (cpuMs(s.pid) - b2));
  } else s.tick.push(merged - before);
  s.merge.push(merged - before);
  s.rows = Number(r.rows[0]!.rows_consumed);
}

// the mean: /proc counts CPU in 10 ms ticks, a large share of one merge; the mean over many rounds averages that out
const median = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
const per100k = (ms: number, rows: number): string => ((ms / rows) * 100_000).toFixed(0);

async function storm(db: string): Promise<void> {
  const c = new pg.Client({ connectionString: urlFor(db) });
  await c.connect();
  const replica = '5e1f6a2b-1c3d-4e5f-8a9b-0c1d2e3f4a5b';
  await c.query(`INSERT INTO public.workspace_agents (id, updated_at) SELECT gen_random_uuid(), '-infinity' FROM generate_series(1, 10000)`);
  await c.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, updated_at)
                 SELECT id, now(), now(), $1, now() FROM public.workspace_agents WHERE updated_at = '-infinity'`, [replica]);
  await c.query('SELECT * FROM heartbeat.merge_agent_connections()');
  const reader = new pg.Client({ connectionString: urlFor(db) });
  await reader.connect();
  let last = Number((await reader.query('SELECT heartbeat.status_events_head() AS h')).rows[0].h);
  await reader.query('LISTEN pg_heartbeat_status_events');
  let got = 0;
  let resolveDone: () => void;
  const done = new Promise<void>((r) => { resolveDone = r; });
  let reading = false;
  const read = async (): Promise<void> => {
    if (reading) return;
    reading = true;
    for (;;) {
      const { rows } = await reader.query<{ id: string }>('SELECT id FROM heartbeat.status_events_after($1, 5000)', [last]);
      if (rows.length === 0) break;
      got += rows.length;
      last = Number(rows[rows.length - 1]!.id);
    }
    reading = false;
    if (got >= 10_000) resolveDone();
  };
  reader.on('notification', () => void read());
  if (process.env.EXPLAIN_STORM) {
    const plan = await c.query(`EXPLAIN SELECT wa.id FROM public.workspace_agents wa WHERE wa.last_connected_replica_id = $1
      AND NOT EXISTS (SELECT 1 FROM heartbeat.agent_connection_staging s WHERE s.agent_id = wa.id
                       AND s.last_connected_replica_id IS DISTINCT FROM $1 AND s.last_connected_at > wa.last_connected_at)`, [replica]);
    console.log(plan.rows.map((r) => r['QUERY PLAN']).join('\n'));
    console.log((await c.query(`SELECT relname, reltuples, relpages, pg_relation_size(oid) / 8192 AS pages FROM pg_class WHERE relname LIKE 'agent_connection_staging_p%'`)).rows);
  }
  const t0 = performance.now();
  const n = (await c.query('SELECT heartbeat.disconnect_replica($1, clock_timestamp(), clock_timestamp()) AS n', [replica])).rows[0].n;
  const tWrite = performance.now() - t0;
  await done;
  const tAll = performance.now() - t0;
  console.log(`disconnect storm: disconnect_replica() of ${n} agents took ${tWrite.toFixed(0)} ms; a LISTENing reader had all ${got} events ${tAll.toFixed(0)} ms after the call began`);
  await reader.end();
  await c.end();
}

await install('hb_bench_before_events', 14);
await install('hb_bench_events', 17);
const a = await side('before events (sql 001-014)', 'hb_bench_before_events', false);
const b = await side('with events (sql 001-017)', 'hb_bench_events', true);
for (let i = 0; i < 2; i++) { await round(a, i); await round(b, i); }   // warm-up
a.merge.length = a.tick.length = b.merge.length = b.tick.length = 0;
for (let i = 0; i < rounds; i++) {
  const [first, second] = i % 2 === 0 ? [a, b] : [b, a];
  await round(first, i);
  await round(second, i);
}
console.log(`${agents} agents, ${a.rows} heartbeats per merge, ${rounds} rounds each, interleaved; backend CPU ms per 100k heartbeats (mean):`);
for (const s of [a, b]) console.log(`  ${s.name}: merge ${per100k(median(s.merge), s.rows)}, merge + sweep ${per100k(median(s.tick), s.rows)}`);
console.log(`  ratio with / before: merge ${(median(b.merge) / median(a.merge)).toFixed(3)}, merge + sweep ${(median(b.tick) / median(a.tick)).toFixed(3)}`);
// 2. the connect wave: every agent disconnected (a direct UPDATE, as after an outage), then merged back
const wave = async (sd: Side): Promise<number> => {
  await sd.client.query(`UPDATE public.workspace_agents SET disconnected_at = clock_timestamp(), updated_at = clock_timestamp()`);
  if (sd.events) {
    await sd.client.query('UPDATE heartbeat.event_state SET last_sweep_at = NULL');
    await sd.client.query('SELECT heartbeat.sweep_status()');
  }
  await sd.client.query('VACUUM public.workspace_agents');
  const before = sd.merge.length;
  await round(sd, 0);
  return sd.merge[before]!;
};
const waveA: number[] = [];
const waveB: number[] = [];
for (let i = 0; i < Math.max(2, Math.floor(rounds / 4)); i++) {
  waveA.push(await wave(a));
  waveB.push(await wave(b));
}
console.log(`connect wave (every merged agent disconnected -> connected; ${a.rows} per merge), backend CPU ms per 100k heartbeats (mean):`);
console.log(`  before events ${per100k(median(waveA), a.rows)}, with events ${per100k(median(waveB), b.rows)}, ratio ${(median(waveB) / median(waveA)).toFixed(3)}`);
await a.client.end();
await b.client.end();
await storm('hb_bench_events');
const c = new pg.Client({ connectionString: admin });
await c.connect();
for (const db of ['hb_bench_before_events', 'hb_bench_events']) await c.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
await c.end();

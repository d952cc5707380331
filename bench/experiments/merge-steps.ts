/**
 * What each step of the part merge's fast path costs per staged row, and the reference batcher's
 * UPDATE ... FROM unnest in 500-row batches over the same rows: each variant runs over every part
 * in one transaction that is rolled back (VACUUM before each), variants interleaved, on-CPU time of
 * the backend (/proc/<pid>/schedstat). Steps, each including the ones before: delete_only (the
 * DELETE ... RETURNING by ctid), delete_plain (a DELETE of the whole part instead), sort (newest per
 * agent: DISTINCT ON and the window), update_plain (the steady UPDATE without the status check),
 * full (sql/016's statement as merged), ref500 (the reference's statement).
 *   node --import tsx bench/experiments/merge-steps.ts <db-url> [repeats] [variants,...]
 * The database: migrated, agents connected, rows staged (e.g. 100,000 agents, a third staged).
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';
import { BATCH_UPDATE_SQL } from '../reference-batcher.ts';
const url = process.argv[2]; const reps = Number(process.argv[3] ?? 5);
const c = new pg.Client({ connectionString: url }); await c.connect();
const pid = (await c.query('SELECT pg_backend_pid() p')).rows[0].p;
const ns = () => Number(readFileSync(`/proc/${pid}/schedstat`, 'utf8').split(' ')[0]);
const src = readFileSync(new URL('../../sql/016_event_producers.sql', import.meta.url), 'utf8');
const a = src.indexOf('        WITH consumed AS (', src.indexOf('Fast path'));
const b = src.indexOf('        $fast$, relname)', a);
const full = src.slice(a, b);
const CONSUMED = full.slice(0, full.indexOf('), newest AS ('));
const NEWEST = full.slice(0, full.indexOf('), updated AS ('));
const V: Record<string, string> = {
  full,
  delete_only: CONSUMED + ') SELECT count(*) FROM consumed',
  delete_plain: CONSUMED.replace(/WHERE s\.ctid = ANY \(ARRAY\(SELECT t\.ctid FROM heartbeat\.%1\$I AS t LIMIT \$2\)\)/, 'WHERE $2 > 0') + ') SELECT count(*) FROM consumed',
  sort: NEWEST + ') SELECT count(*) FROM newest',
  update_plain: NEWEST + `), updated AS (UPDATE public.workspace_agents AS wa
               SET first_connected_at = LEAST(wa.first_connected_at, n.first_connected_at), last_connected_at = n.last_connected_at,
                   last_connected_replica_id = n.last_connected_replica_id, disconnected_at = n.disconnected_at, updated_at = n.updated_at
              FROM newest n WHERE wa.id = n.agent_id AND wa.updated_at < n.updated_at RETURNING wa.id) SELECT count(*) FROM updated`,
};
const stagedRows = (await c.query('SELECT agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at FROM heartbeat.agent_connection_staging')).rows;
V.ref500 = 'REF';
const only = process.argv[4]?.split(',');
const names = Object.keys(V).filter((k) => !only || only.includes(k));
const parts = (await c.query(`SELECT relname FROM heartbeat.staging_parts() ORDER BY part`)).rows.map((r) => r.relname as string);
const staged = (await c.query('SELECT count(*)::int n FROM heartbeat.agent_connection_staging')).rows[0].n;
const res: Record<string, number[]> = {};
for (let r = 0; r < reps; r++) for (const name of names) {
  await c.query('VACUUM public.workspace_agents'); for (const p of parts) await c.query(`VACUUM heartbeat.${p}`);
  await c.query('BEGIN');
  const clk = (await c.query('SELECT at, inactive_timeout, horizon FROM heartbeat.event_clock()')).rows[0];
  const t0 = ns(); let rows = 0;
  if (V[name] === 'REF') {
    const Z = new Date('0001-01-01T00:00:00Z');
    for (let i = 0; i < stagedRows.length; i += 500) {
      const b = stagedRows.slice(i, i + 500);
      const q = await c.query(BATCH_UPDATE_SQL, [b.map((x) => x.agent_id), b.map((x) => x.first_connected_at ?? Z), b.map((x) => x.last_connected_at ?? Z), b.map((x) => x.last_connected_replica_id ?? '00000000-0000-0000-0000-000000000000'), b.map((x) => x.disconnected_at ?? Z), b.map((x) => x.updated_at)]);
      rows += q.rowCount ?? 0;
    }
  } else for (const p of parts) {
    const sql = V[name]!.replaceAll('%1$I', `"${p}"`);
    const params = [new Date(Date.now() + 300000), 1000000, clk.at, clk.inactive_timeout, clk.horizon, new Date(clk.at.getTime() - 60000)];
    const n = (sql.match(/\$(\d)/g) ?? []).reduce((m, x) => Math.max(m, Number(x.slice(1))), 0);
    const q = await c.query({ text: sql, values: params.slice(0, n) });
    rows += Number(Object.values(q.rows[0])[0]);
  }
  const dt = (ns() - t0) / 1e6;
  await c.query('ROLLBACK');
  (res[name] ??= []).push(dt);
  if (r === 0) console.log(name, 'rows', rows);
}
for (const name of names) {
  const s = res[name]!.sort((x, y) => x - y);
  const median = s[s.length >> 1]!;
  console.log(`${name.padEnd(14)} median ${median.toFixed(1)} ms  (${((median * 1000) / staged).toFixed(2)} µs/staged row) all ${s.map((x) => x.toFixed(0)).join(' ')}`);
}
await c.end();

/**
 * The on-CPU time of one backend (/proc/<pid>/schedstat, ns; other processes' load disturbs it
 * far less than wall time) over each merge call, for two merge statements alternately on
 * the same kind of staged rows: every agent of the database connected, a random `fraction`
 * of them staged anew before each call (10,000 agents at 33 % = one 5 s merge interval).
 *   node --import tsx bench/experiments/merge-instructions.ts <db-url> <rounds> <fraction%> '<sql A>' '<sql B>'
 * Needs a database on this machine (the backend's pid is read from the server).
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';

const [url, roundsArg = '10', fracArg = '33.3', ...variants] = process.argv.slice(2);
if (!url || variants.length === 0) throw new Error("usage: merge-instructions.ts <db-url> <rounds> <fraction%> '<sql A>' ['<sql B>' ...]");
const c = new pg.Client({ connectionString: url });
await c.connect();
const pid = (await c.query('SELECT pg_backend_pid() AS p')).rows[0].p as number;
const onCpuNs = (): number => Number(readFileSync(`/proc/${pid}/schedstat`, 'utf8').split(' ')[0]);

async function counted(sql: string): Promise<{ ms: number; rows: number }> {
  const t0 = onCpuNs();
  const r = await c.query(sql);
  return { ms: (onCpuNs() - t0) / 1e6, rows: Number(Object.values(r.rows[0] ?? {})[0]) };
}

const results: { ms: number[]; rows: number[] }[] = variants.map(() => ({ ms: [], rows: [] }));
for (const v of variants) await c.query(v); // compile and cache once per variant before counting
for (let round = 0; round < Number(roundsArg); round++) {
  for (const [i, v] of variants.entries()) {
    await c.query(`INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
                   SELECT id, now() - interval '1 hour', now(), now() FROM public.workspace_agents TABLESAMPLE BERNOULLI (${Number(fracArg)})`);
    await new Promise((r) => setTimeout(r, 1100)); // past the sweep's 1 s gap, as between real merges
    const m = await counted(v);
    results[i]!.rows.push(m.rows);
    results[i]!.ms.push(m.ms);
  }
}
const median = (x: number[]): number => [...x].sort((a, b) => a - b)[x.length >> 1]!;
const q1 = (x: number[]): number => [...x].sort((a, b) => a - b)[x.length >> 2]!;
for (const [i, v] of variants.entries()) {
  const r = results[i]!;
  console.log(`${String.fromCharCode(65 + i)}: ${median(r.ms).toFixed(1)} ms on CPU (median of ${roundsArg}; lower quartile ${q1(r.ms).toFixed(1)}), ${median(r.rows)} rows  ${v.slice(0, 90)}`);
}
if (variants.length > 1) console.log(`B/A on-CPU time, medians: ${(median(results[1]!.ms) / median(results[0]!.ms)).toFixed(3)}`);
await c.end();

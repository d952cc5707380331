/**
 * Side-by-side merge cost on a shared machine: wall time and the merging
 * backends' own CPU time (/proc/<pid>/stat utime+stime, which other
 * processes' load disturbs far less than wall time), variants interleaved
 * and repeated.
 *   node --import tsx bench/experiments/merge-cpu.ts <url-of-db> <url-of-partitioned-db> [rows] [repeats]
 * The first database has merge-v2.sql applied, the second staging-partitioned.sql.
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';

const [url, partUrl, rowsArg = '333333', repeatsArg = '3'] = process.argv.slice(2);
if (!url || !partUrl) throw new Error('usage: merge-cpu.ts <db-url> <partitioned-db-url> [rows] [repeats]');
const rows = Number(rowsArg);
const repeats = Number(repeatsArg);
const stageSql = readFileSync(new URL('./stage-sample.sql', import.meta.url), 'utf8').replace(/:rows/g, String(rows));

function cpu(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const x = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(x[11]) + Number(x[12])) / 100;
}

async function connect(u: string): Promise<{ c: pg.Client; pid: number }> {
  const c = new pg.Client({ connectionString: u });
  await c.connect();
  const pid = (await c.query('SELECT pg_backend_pid() AS p')).rows[0].p as number;
  return { c, pid };
}

interface Variant {
  name: string;
  url: string;
  merges: string[];
  setup?: string;
}

const variants: Variant[] = [
  { name: 'original (sql/004)', url, merges: ['SELECT * FROM heartbeat.merge_agent_connections()'] },
  { name: 'v2', url, merges: ['SELECT * FROM heartbeat.merge_agent_connections_v2()'] },
  { name: 'v2 + enable_nestloop=off', url, merges: ['SELECT * FROM heartbeat.merge_agent_connections_v2()'], setup: 'SET enable_nestloop = off' },
  { name: '2 partitions, 2 parallel v2 merges', url: partUrl, merges: ['SELECT * FROM heartbeat.merge_agent_connections_p0()', 'SELECT * FROM heartbeat.merge_agent_connections_p1()'] },
];

const results = new Map<string, Array<{ wall: number; cpu: number; rows: number }>>();
for (let r = 0; r < repeats; r++) {
  for (const v of variants) {
    const admin = await connect(v.url);
    await admin.c.query(stageSql);
    await admin.c.query('VACUUM heartbeat.agent_connection_staging');
    await admin.c.end();
    const conns = await Promise.all(v.merges.map(() => connect(v.url)));
    for (const k of conns) if (v.setup) await k.c.query(v.setup);
    const cpu0 = conns.map((k) => cpu(k.pid));
    const t0 = performance.now();
    const out = await Promise.all(conns.map((k, i) => k.c.query(v.merges[i]!)));
    const wall = (performance.now() - t0) / 1000;
    const used = conns.reduce((s, k, i) => s + cpu(k.pid) - cpu0[i]!, 0);
    const consumed = out.reduce((s, o) => s + Number(o.rows[0].rows_consumed), 0);
    await Promise.all(conns.map((k) => k.c.end()));
    const list = results.get(v.name) ?? [];
    list.push({ wall, cpu: used, rows: consumed });
    results.set(v.name, list);
    console.error(`${v.name}: ${consumed} rows, ${wall.toFixed(2)} s wall, ${used.toFixed(2)} s CPU`);
  }
}
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
console.log(`\nrows staged per merge: ${rows}; median of ${repeats}`);
console.log('variant'.padEnd(38) + 'wall s'.padStart(8) + 'CPU s'.padStart(8) + 'rows/s wall'.padStart(14) + 'CPU us/row'.padStart(12));
for (const [name, list] of results) {
  const w = median(list.map((x) => x.wall));
  const c = median(list.map((x) => x.cpu));
  console.log(name.padEnd(38) + w.toFixed(2).padStart(8) + c.toFixed(2).padStart(8) + Math.round(rows / w).toLocaleString('en-US').padStart(14) + ((c / rows) * 1e6).toFixed(2).padStart(12));
}

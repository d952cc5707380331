/**
 * What the database did during a phase: counters read before and after it.
 * Every query the bench itself sends carries a /*bench*\/ comment so
 * pg_stat_statements can leave it out of the statement counts.
 */
import { readdirSync, readFileSync } from 'node:fs';
import type pg from 'pg';

export interface DbCounters {
  at: number;
  walLsn: string;
  walRecords: number;
  walFpi: number;
  walBytes: number;
  xactCommit: number;
  /** Top-level statements of this database other than the bench's own (pg_stat_statements), or NaN without it. */
  statements: number;
  statementsByQuery: Record<string, number>;
  tupUpd: number;
  tupHotUpd: number;
  deadTup: number;
  liveTup: number;
  autovacuums: number;
  stagingDeadTup: number;
  /** CPU seconds of the whole cluster (postmaster, its children, and exited children), or NaN when not readable. */
  dbCpuSeconds: number;
}

const CLK_TCK = 100;

/** CPU seconds (user + system) of the postmaster `pid` and all its processes, including exited ones. */
export function clusterCpuSeconds(postmasterPid: number): number {
  try {
    const stat = (pid: number | string): string[] => {
      const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
      return text.slice(text.lastIndexOf(')') + 2).split(' ');
    };
    // fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    const pm = stat(postmasterPid);
    let ticks = Number(pm[11]) + Number(pm[12]) + Number(pm[13]) + Number(pm[14]);
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      let f: string[];
      try {
        f = stat(entry);
      } catch {
        continue;
      }
      if (Number(f[1]) === postmasterPid) ticks += Number(f[11]) + Number(f[12]);
    }
    return ticks / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** CPU seconds (user + system) of one process, or NaN. */
export function processCpuSeconds(pid: number): number {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}

export async function backendPid(client: pg.ClientBase): Promise<number> {
  const { rows } = await client.query<{ pid: number }>('/*bench*/ SELECT pg_backend_pid() AS pid');
  return rows[0]!.pid;
}

/** The postmaster's pid when the server runs on this machine and /proc is readable, else undefined. */
export async function findPostmaster(client: pg.ClientBase): Promise<number | undefined> {
  const { rows } = await client.query<{ pid: number }>('/*bench*/ SELECT pg_backend_pid() AS pid');
  try {
    const text = readFileSync(`/proc/${rows[0]!.pid}/stat`, 'utf8');
    const ppid = Number(text.slice(text.lastIndexOf(')') + 2).split(' ')[1]);
    const cmd = readFileSync(`/proc/${ppid}/cmdline`, 'utf8');
    return /postgres|postmaster/.test(cmd) ? ppid : undefined;
  } catch {
    return undefined;
  }
}

export async function hasPgStatStatements(client: pg.ClientBase): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>(
    "/*bench*/ SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements') " +
      "AND current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%' AS ok",
  );
  return rows[0]!.ok;
}

export async function readCounters(client: pg.ClientBase, pgss: boolean, postmasterPid: number | undefined): Promise<DbCounters> {
  const dbCpuSeconds = postmasterPid ? clusterCpuSeconds(postmasterPid) : NaN;
  const wal = await client.query(
    '/*bench*/ SELECT pg_current_wal_lsn()::text AS lsn, wal_records::float8 AS records, wal_fpi::float8 AS fpi, wal_bytes::float8 AS bytes FROM pg_stat_wal',
  );
  const db = await client.query(
    '/*bench*/ SELECT xact_commit::float8 AS commits FROM pg_stat_database WHERE datname = current_database()',
  );
  const t = await client.query(
    `/*bench*/ SELECT relid::regclass::text AS rel, n_tup_upd::float8 AS upd, n_tup_hot_upd::float8 AS hot,
            n_dead_tup::float8 AS dead, n_live_tup::float8 AS live, autovacuum_count::float8 AS av
       FROM pg_stat_all_tables
      WHERE relid IN ('public.workspace_agents'::regclass, 'heartbeat.agent_connection_staging'::regclass)`,
  );
  const wa = t.rows.find((r) => r.rel === 'workspace_agents' || r.rel === 'public.workspace_agents');
  const st = t.rows.find((r) => r.rel.endsWith('agent_connection_staging'));
  let statements = NaN;
  const statementsByQuery: Record<string, number> = {};
  if (pgss) {
    const s = await client.query<{ query: string; calls: number }>(
      `/*bench*/ SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS query, sum(calls)::float8 AS calls
         FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND query NOT LIKE '%/*bench*/%'
        GROUP BY 1`,
    );
    statements = 0;
    for (const r of s.rows) {
      statements += r.calls;
      statementsByQuery[r.query] = (statementsByQuery[r.query] ?? 0) + r.calls;
    }
  }
  return {
    at: performance.now(),
    walLsn: wal.rows[0].lsn,
    walRecords: wal.rows[0].records,
    walFpi: wal.rows[0].fpi,
    walBytes: wal.rows[0].bytes,
    xactCommit: db.rows[0].commits,
    statements,
    statementsByQuery,
    tupUpd: wa?.upd ?? NaN,
    tupHotUpd: wa?.hot ?? NaN,
    deadTup: wa?.dead ?? NaN,
    liveTup: wa?.live ?? NaN,
    autovacuums: wa?.av ?? NaN,
    stagingDeadTup: st?.dead ?? NaN,
    dbCpuSeconds,
  };
}

/** Bytes of WAL between two LSNs. */
export async function walDiff(client: pg.ClientBase, from: string, to: string): Promise<number> {
  const { rows } = await client.query<{ d: number }>('/*bench*/ SELECT pg_wal_lsn_diff($1, $2)::float8 AS d', [to, from]);
  return rows[0]!.d;
}

/** Least-squares slope of y over x (per unit of x). */
export function slope(points: Array<[number, number]>): number {
  const n = points.length;
  if (n < 2) return 0;
  let sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const [x, y] of points) {
    sx += x; sy += y; sxx += x * x; sxy += x * y;
  }
  const d = n * sxx - sx * sx;
  return d === 0 ? 0 : (n * sxy - sx * sy) / d;
}

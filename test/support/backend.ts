/**
 * Killing one PostgreSQL backend process, and waiting for the server to come
 * back, for fault tests that need a real crash.
 *
 *   const victim = new pg.Client(url); await victim.connect();      // any idle connection will do
 *   const pid = (await victim.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
 *   await killBackend(pid);            // SIGKILL; returns once the postmaster has reaped it
 *   const ms = await waitForRecovery(url);   // accepts connections again
 *
 * or simply `await crashServer(url); await waitForRecovery(url)`.
 *
 * What SIGKILL (or SIGSEGV, SIGABRT: any abnormal exit) of any backend does: the
 * postmaster assumes shared memory may be corrupt, SIGQUITs every other
 * backend (their clients get "terminating connection because of crash of
 * another server process" and lose the connection), refuses new connections
 * ("the database system is in recovery mode"), then runs crash recovery from
 * the last checkpoint. Crash recovery resets every UNLOGGED table to empty (and
 * drops what only sat in wal_buffers: on a cluster with synchronous_commit=off,
 * as startCluster()'s default, the last few hundred ms of LOGGED commits can be
 * lost too; pass settings { synchronous_commit: 'on' } when a test asserts
 * that committed rows survive). The postmaster itself keeps running (same pid,
 * same pg_postmaster_start_time()). SIGTERM instead is pg_terminate_backend():
 * only that backend exits, no crash, nothing reset.
 *
 * The crash takes the whole cluster down, so use a cluster of the test file's
 * own (privateCluster() or startCluster()), never the shared one of test/run.ts.
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';
import { waitFor } from './wait.ts';

function procStat(pid: number): { comm: string; ppid: number } | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // "<pid> (<comm>) <state> <ppid> ...": comm may contain spaces and parentheses
  const open = stat.indexOf('(');
  const close = stat.lastIndexOf(')');
  const rest = stat.slice(close + 2).split(' ');
  return { comm: stat.slice(open + 1, close), ppid: Number(rest[1]) };
}

/** True while `pid` exists (a zombie that its parent has not reaped yet counts). */
export function processExists(pid: number): boolean {
  return procStat(pid) !== undefined;
}

/**
 * Sends `signal` to the PostgreSQL backend `pid` (from pg_backend_pid() or
 * pg_stat_activity) and waits until the postmaster has reaped it. Refuses a
 * pid that is not a child of a postgres process (so not the postmaster, not
 * some unrelated process). After a SIGKILL has been reaped, the postmaster is
 * already in its crash cycle: a connection made from then on is refused until
 * recovery is over, so waitForRecovery() cannot mistake the old server for
 * the recovered one.
 */
export async function killBackend(pid: number, signal: NodeJS.Signals = 'SIGKILL', timeoutMs = 30_000): Promise<void> {
  if (!Number.isInteger(pid) || pid <= 1) throw new Error(`killBackend: not a pid: ${pid}`);
  const proc = procStat(pid);
  if (!proc) throw new Error(`killBackend: no process ${pid}`);
  const parent = procStat(proc.ppid);
  if (proc.comm !== 'postgres' || parent?.comm !== 'postgres') {
    throw new Error(`killBackend: ${pid} (${proc.comm}, parent ${proc.ppid} ${parent?.comm ?? '?'}) is not a PostgreSQL backend`);
  }
  process.kill(pid, signal);
  await waitFor(() => !processExists(pid), `backend ${pid} to exit and be reaped after ${signal}`, timeoutMs, 10);
}

/**
 * Polls until the server at `url` accepts a connection and answers a query
 * (e.g. after a crash-restart cycle); returns how long that took in ms.
 */
export async function waitForRecovery(url: string, timeoutMs = 60_000): Promise<number> {
  const started = Date.now();
  await waitFor(
    async () => {
      const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 });
      client.on('error', () => {});
      try {
        await client.connect();
        await client.query('SELECT 1');
        return true;
      } finally {
        await client.end().catch(() => {});
      }
    },
    `${new URL(url).host} to accept connections again`,
    timeoutMs,
    50,
  );
  return Date.now() - started;
}

/** Crashes the server at `url` the way a backend segfault would: opens a connection and SIGKILLs its backend. Returns the killed pid. */
export async function crashServer(url: string): Promise<number> {
  const victim = new pg.Client({ connectionString: url });
  victim.on('error', () => {});
  await victim.connect();
  const { rows } = await victim.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
  const pid = rows[0]!.pid;
  try {
    await killBackend(pid, 'SIGKILL');
  } finally {
    await victim.end().catch(() => {});
  }
  return pid;
}

/**
 * scheduleMerge()/unscheduleMerge(): put the merge in pg_cron, so it runs
 * inside the database with no client-side merger at all. What is scheduled
 * (job name, schedule, command) comes from heartbeat.merge_job() (sql/007).
 * When pg_cron lives in this database, heartbeat.schedule_merge() does the
 * work; when it lives in another one (cron.database_name), this connects there
 * with the same credentials and uses cron.schedule_in_database, which a
 * function in this database cannot do.
 */
import pg from 'pg';
import { deadline, destroyClient, POOL_DEFAULTS, resolvePool, withClient, type ConnectionOptions } from './connection.ts';
import { toHeartbeatError } from './errors.ts';
import { countOption } from './options.ts';
import { safeLogger } from './safe-logger.ts';
import { toLogger, type Logger } from './logger.ts';

/** The pg_cron job that runs the merge. */
export interface MergeJob {
  /** cron.job's jobid (null when only described, not scheduled). */
  jobId: number | null;
  jobName: string;
  schedule: string;
  command: string;
  /** The database the job runs in (the one with the heartbeat schema). */
  database: string;
  /** The database pg_cron lives in (cron.database_name). */
  cronDatabase: string;
  pgCronVersion: string;
  /** True with pg_cron >= 1.5 (a '5 seconds' schedule); false: once a minute, looping inside. */
  secondsSchedule: boolean;
  /**
   * Every lane's job, lane 0 (this one) first: with `lanes` > 1, lane k's job (`<jobName>-lane-k`)
   * merges the parts numbered k modulo lanes when they have a backlog (sql/019).
   */
  lanes: MergeLaneJob[];
}

/** One lane's pg_cron job. */
export interface MergeLaneJob {
  lane: number;
  jobId: number | null;
  jobName: string;
  command: string;
}

export interface ScheduleOptions {
  /** How often to merge, as a PostgreSQL interval of whole seconds from 1 to 59 (default '5 seconds'). */
  every?: string;
  /**
   * How many pg_cron jobs merge the parts of staging in parallel (default 1, at most 64): each holds
   * a pg_cron background worker; lanes beyond the first merge only parts with a backlog (sql/019).
   */
  lanes?: number;
  logger?: Logger;
}

interface JobRow {
  job_name: string;
  schedule: string;
  command: string;
  database: string;
  cron_database: string;
  pg_cron_version: string;
  seconds_schedule: boolean;
  lane: number;
}

const toJob = (rows: JobRow[], jobIds: (number | null)[]): MergeJob => {
  const row = rows[0]!;
  return {
    jobId: jobIds[0] ?? null,
    jobName: row.job_name,
    schedule: row.schedule,
    command: row.command,
    database: row.database,
    cronDatabase: row.cron_database,
    pgCronVersion: row.pg_cron_version,
    secondsSchedule: row.seconds_schedule,
    lanes: rows.map((r, i) => ({ lane: r.lane, jobId: jobIds[i] ?? null, jobName: r.job_name, command: r.command })),
  };
};

/** Connection settings of `pool` with the database replaced (for reaching pg_cron's database). */
export function clientConfigFor(pool: pg.Pool, database: string): pg.ClientConfig {
  const { connectionString, ...rest } = pool.options as pg.PoolConfig;
  if (connectionString) {
    const url = new URL(connectionString);
    url.pathname = `/${encodeURIComponent(database)}`;
    return { ...rest, connectionString: url.toString(), application_name: 'pg-heartbeat schedule' };
  }
  return { ...rest, database, application_name: 'pg-heartbeat schedule' };
}

/** Runs `fn` with a client connected to pg_cron's database. */
export async function withCronDatabase<T>(pool: pg.Pool, database: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({
    ...clientConfigFor(pool, database),
    connectionTimeoutMillis: POOL_DEFAULTS.connectionTimeoutMillis,
    keepAlive: true,
  });
  client.on('error', () => {});
  let ok = false;
  try {
    await client.connect();
    const result = await deadline(fn(client), OPERATION_DEADLINE_MS, `pg_cron in database ${JSON.stringify(database)}`);
    ok = true;
    return result;
  } catch (err) {
    throw toHeartbeatError(err, `pg_cron in database ${JSON.stringify(database)}`);
  } finally {
    if (ok) await deadline(client.end(), 5000, 'closing the connection').catch(() => destroyClient(client));
    else destroyClient(client);
  }
}

/** Deadline of each scheduling operation (they are a few catalog queries). */
const OPERATION_DEADLINE_MS = 30_000;

async function describeJob(pool: pg.Pool, every: string, lanes = 1): Promise<JobRow[]> {
  const { rows } = await pool.query<JobRow>('SELECT * FROM heartbeat.merge_job($1::interval, $2::int) ORDER BY lane', [every, lanes]);
  return rows;
}

/** In pg_cron's database: unschedules this database's lane jobs that are not in `keep` (all of them with `keep` empty). */
const UNSCHEDULE_LANES_SQL =
  'SELECT count(cron.unschedule(j.jobid)) AS n FROM cron.job j WHERE starts_with(j.jobname, $1) AND j.database = $2 ' +
  'AND NOT (j.jobname = ANY ($3::text[]))';

/**
 * Schedules the merge in pg_cron every `every` (default '5 seconds'), in `lanes` jobs (default 1).
 * Scheduling again updates the jobs (fixed names) and removes lanes left over from a larger
 * `lanes`. Fails with a message naming the postgresql.conf lines when pg_cron is not loaded.
 */
export async function scheduleMerge(connection: ConnectionOptions, options: ScheduleOptions = {}): Promise<MergeJob> {
  const logger = safeLogger(toLogger(options.logger));
  const every = options.every ?? '5 seconds';
  const lanes = countOption(options.lanes, 'lanes', 1, 1, 64);
  const { pool, owned } = resolvePool(connection, logger, 'pg-heartbeat schedule');
  try {
    const rows = await describeJob(pool, every, lanes);
    const first = rows[0]!;
    if (first.cron_database === first.database) {
      const { rows: scheduled } = await pool.query<{ job_id: string }>(
        'SELECT job_id FROM heartbeat.schedule_merge($1::interval, $2::int) ORDER BY lane', [every, lanes]);
      return toJob(rows, scheduled.map((r) => Number(r.job_id)));
    }
    const jobIds = await withCronDatabase(pool, first.cron_database, async (client) => {
      const ids: number[] = [];
      for (const row of rows) {
        const { rows: r } = await client.query<{ job_id: string }>(
          'SELECT cron.schedule_in_database($1, $2, $3, $4) AS job_id',
          [row.job_name, row.schedule, row.command, row.database],
        );
        ids.push(Number(r[0]!.job_id));
      }
      await client.query(UNSCHEDULE_LANES_SQL, [`${first.job_name}-lane-`, first.database, rows.map((r) => r.job_name)]);
      return ids;
    });
    return toJob(rows, jobIds);
  } catch (err) {
    throw toHeartbeatError(err, 'schedule the merge');
  } finally {
    if (owned) await pool.end().catch(() => {});
  }
}

/** Removes the merge job (every lane's) from pg_cron; resolves to whether there was one. */
export async function unscheduleMerge(connection: ConnectionOptions, options: { logger?: Logger } = {}): Promise<boolean> {
  const logger = safeLogger(toLogger(options.logger));
  const { pool, owned } = resolvePool(connection, logger, 'pg-heartbeat unschedule');
  try {
    let row: JobRow;
    try {
      row = (await describeJob(pool, '5 seconds'))[0]!;
    } catch (err) {
      // 55000 from heartbeat.merge_job(): pg_cron is not loaded, so no job can exist
      if ((err as { code?: unknown }).code === '55000') return false;
      throw err;
    }
    if (row.cron_database === row.database) {
      const { rows } = await pool.query<{ removed: boolean }>('SELECT heartbeat.unschedule_merge() AS removed');
      return rows[0]!.removed;
    }
    const removed = await withCronDatabase(pool, row.cron_database, async (client) => {
      const { rows } = await client.query<{ n: string }>(
        'SELECT count(*) AS n FROM cron.job j WHERE j.jobname = $1 AND cron.unschedule(j.jobid)',
        [row.job_name],
      );
      const lanes = await client.query<{ n: string }>(UNSCHEDULE_LANES_SQL, [`${row.job_name}-lane-`, row.database, []]);
      return Number(rows[0]!.n) + Number(lanes.rows[0]!.n) > 0;
    });
    // and the loops that are running (in this database) return before their next merge
    await pool.query('SELECT heartbeat.stop_merge_loops()');
    return removed;
  } catch (err) {
    throw toHeartbeatError(err, 'unschedule the merge');
  } finally {
    if (owned) await pool.end().catch(() => {});
  }
}

/** Looks up the merge job in pg_cron's database (which may be another one); null when not scheduled. */
export async function findMergeJob(db: pg.Pool, job: { jobName: string; cronDatabase: string }): Promise<{ schedule: string; active: boolean } | null> {
  const query = async (client: pg.ClientBase): Promise<{ schedule: string; active: boolean } | null> => {
    const { rows } = await client.query<{ schedule: string; active: boolean }>(
      'SELECT schedule, active FROM cron.job WHERE jobname = $1 ORDER BY jobid LIMIT 1',
      [job.jobName],
    );
    return rows[0] ?? null;
  };
  const { rows } = await db.query<{ here: string }>('SELECT current_database() AS here');
  if (rows[0]!.here === job.cronDatabase) return withClient(db, query, { deadlineMs: OPERATION_DEADLINE_MS, what: 'read cron.job' });
  return withCronDatabase(db, job.cronDatabase, query);
}

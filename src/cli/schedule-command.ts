import { checkTimingInvariant } from '../invariant.ts';
import { consoleLogger } from '../logger.ts';
import { scheduleMerge } from '../schedule.ts';
import { type Command, UsageError, withPool } from './command.ts';

/** Seconds in a simple interval such as '5 seconds', '5s' or '5'; undefined for anything else. */
export function intervalSeconds(every: string): number | undefined {
  const m = /^\s*(\d+)\s*(s|secs?|seconds?)?\s*$/i.exec(every);
  return m ? Number(m[1]) : undefined;
}

export const scheduleCommand: Command = {
  name: 'schedule',
  summary: 'merge inside the database with pg_cron (needs pg_cron preloaded); scheduling again updates the one job',
  usage: "[--every '5 seconds'] [--lanes N]",
  help: {
    every: "how often to merge: whole seconds from 1 to 59 (default '5 seconds')",
    lanes: 'pg_cron jobs merging the parts of staging in parallel (default 1; each holds a background worker)',
  },
  options: { every: { type: 'string' }, lanes: { type: 'string' } },
  async run(ctx) {
    const every = (ctx.values.every as string | undefined) ?? '5 seconds';
    const lanesText = ctx.values.lanes as string | undefined;
    const lanes = lanesText === undefined ? undefined : Number(lanesText);
    if (lanesText !== undefined && (!/^\d+$/.test(lanesText) || lanes! < 1 || lanes! > 64)) {
      throw new UsageError(`--lanes must be a whole number from 1 to 64, not ${JSON.stringify(lanesText)}`);
    }
    const job = await withPool(ctx.database(), 'pg-heartbeat schedule', (conn) => scheduleMerge(conn, { every, lanes, logger: consoleLogger }));
    for (const lane of job.lanes) {
      ctx.out(`scheduled pg_cron job ${JSON.stringify(lane.jobName)} (jobid ${lane.jobId}) in database ${job.cronDatabase}, running in ${job.database}: ${job.schedule}  ${lane.command}`);
    }
    if (!job.secondsSchedule) {
      ctx.out(`pg_cron ${job.pgCronVersion} has no seconds schedules: the job starts once a minute and merges every ${every} inside it (the first merge at the next full minute)`);
    }
    const secs = intervalSeconds(every);
    const check = secs === undefined ? undefined : checkTimingInvariant({ mergeIntervalMs: secs * 1000 });
    if (check && !check.ok) process.stderr.write(`pg-heartbeat schedule: warning: ${check.message}\n`);
  },
};

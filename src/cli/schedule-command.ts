import { checkTimingInvariant } from '../invariant.ts';
import { consoleLogger } from '../logger.ts';
import { scheduleMerge } from '../schedule.ts';
import { type Command, withPool } from './command.ts';

/** Seconds in a simple interval such as '5 seconds', '5s' or '5'; undefined for anything else. */
export function intervalSeconds(every: string): number | undefined {
  const m = /^\s*(\d+)\s*(s|secs?|seconds?)?\s*$/i.exec(every);
  return m ? Number(m[1]) : undefined;
}

export const scheduleCommand: Command = {
  name: 'schedule',
  summary: 'merge inside the database with pg_cron (needs pg_cron preloaded); scheduling again updates the one job',
  usage: "[--every '5 seconds']",
  help: { every: "how often to merge: whole seconds from 1 to 59 (default '5 seconds')" },
  options: { every: { type: 'string' } },
  async run(ctx) {
    const every = (ctx.values.every as string | undefined) ?? '5 seconds';
    const job = await withPool(ctx.database(), 'pg-heartbeat schedule', (conn) => scheduleMerge(conn, { every, logger: consoleLogger }));
    ctx.out(`scheduled pg_cron job ${JSON.stringify(job.jobName)} (jobid ${job.jobId}) in database ${job.cronDatabase}, running in ${job.database}: ${job.schedule}  ${job.command}`);
    if (!job.secondsSchedule) {
      ctx.out(`pg_cron ${job.pgCronVersion} has no seconds schedules: the job starts once a minute and merges every ${every} inside it (the first merge at the next full minute)`);
    }
    const secs = intervalSeconds(every);
    const check = secs === undefined ? undefined : checkTimingInvariant({ mergeIntervalMs: secs * 1000 });
    if (check && !check.ok) process.stderr.write(`pg-heartbeat schedule: warning: ${check.message}\n`);
  },
};

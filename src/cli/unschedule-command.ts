import { consoleLogger } from '../logger.ts';
import { unscheduleMerge } from '../schedule.ts';
import { type Command, withPool } from './command.ts';

export const unscheduleCommand: Command = {
  name: 'unschedule',
  summary: 'remove the pg_cron merge job (start a merger elsewhere, or merges stop)',
  async run(ctx) {
    const removed = await withPool(ctx.database(), 'pg-heartbeat unschedule', (conn) => unscheduleMerge(conn, { logger: consoleLogger }));
    ctx.out(removed ? 'unscheduled the pg_cron merge job' : 'no pg_cron merge job was scheduled');
  },
};

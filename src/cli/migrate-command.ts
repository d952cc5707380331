import { migrate } from '../migrate.ts';
import { consoleLogger } from '../logger.ts';
import { type Command, UsageError, withPool } from './command.ts';

export const migrateCommand: Command = {
  name: 'migrate',
  summary: 'apply pg-heartbeat\'s migrations (needs a direct connection, not a transaction pooler)',
  usage: '[--durable-staging | --no-durable-staging]',
  help: {
    'durable-staging': 'make the staging table LOGGED: staged rows survive a crash (costs WAL per COPY and merge)',
    'no-durable-staging': 'make the staging table UNLOGGED again (the default layout)',
  },
  options: { 'durable-staging': { type: 'boolean' }, 'no-durable-staging': { type: 'boolean' } },
  async run(ctx) {
    if (ctx.values['durable-staging'] && ctx.values['no-durable-staging']) {
      throw new UsageError('--durable-staging and --no-durable-staging contradict each other');
    }
    const durableStaging = ctx.values['durable-staging'] ? true : ctx.values['no-durable-staging'] ? false : undefined;
    const ran = await withPool(ctx.database(), 'pg-heartbeat migrate', (conn) => migrate(conn, { logger: consoleLogger, durableStaging }), 1);
    ctx.out(ran.length ? `applied ${ran.length} migration(s): ${ran.join(', ')}` : 'already up to date');
    if (durableStaging !== undefined) ctx.out(`staging table is ${durableStaging ? 'LOGGED (durable)' : 'UNLOGGED'}`);
  },
};

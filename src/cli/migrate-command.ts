import { migrate } from '../migrate.ts';
import { consoleLogger } from '../logger.ts';
import { type Command, UsageError, withPool } from './command.ts';

export const migrateCommand: Command = {
  name: 'migrate',
  summary: 'apply pg-heartbeat\'s migrations (needs a direct connection, not a transaction pooler)',
  usage: '[--durable-staging | --no-durable-staging] [--staging-parts N]',
  help: {
    'durable-staging': 'make the staging table LOGGED: staged rows survive a crash (costs WAL per COPY and merge)',
    'no-durable-staging': 'make the staging table UNLOGGED again (the default layout)',
    'staging-parts': 'split staging into N hash parts, merged in parallel (1 to 64; 4 on a new install); safe while stagers COPY',
  },
  options: { 'durable-staging': { type: 'boolean' }, 'no-durable-staging': { type: 'boolean' }, 'staging-parts': { type: 'string' } },
  async run(ctx) {
    if (ctx.values['durable-staging'] && ctx.values['no-durable-staging']) {
      throw new UsageError('--durable-staging and --no-durable-staging contradict each other');
    }
    const durableStaging = ctx.values['durable-staging'] ? true : ctx.values['no-durable-staging'] ? false : undefined;
    const partsArg = ctx.values['staging-parts'];
    let stagingParts: number | undefined;
    if (partsArg !== undefined) {
      stagingParts = Number(partsArg);
      if (!/^\d+$/.test(String(partsArg)) || stagingParts < 1 || stagingParts > 64) {
        throw new UsageError(`--staging-parts must be a whole number from 1 to 64, not ${JSON.stringify(partsArg)}`);
      }
    }
    const ran = await withPool(ctx.database(), 'pg-heartbeat migrate', (conn) => migrate(conn, { logger: consoleLogger, durableStaging, stagingParts }), 1);
    ctx.out(ran.length ? `applied ${ran.length} migration(s): ${ran.join(', ')}` : 'already up to date');
    if (durableStaging !== undefined) ctx.out(`staging table is ${durableStaging ? 'LOGGED (durable)' : 'UNLOGGED'}`);
    if (stagingParts !== undefined) ctx.out(`staging has ${stagingParts} part(s)`);
  },
};

import { migrate } from '../migrate.ts';
import { consoleLogger } from '../logger.ts';
import type { Command } from './command.ts';

export const migrateCommand: Command = {
  name: 'migrate',
  summary: 'apply pg-heartbeat\'s migrations (needs a direct connection, not a transaction pooler)',
  async run(ctx) {
    const ran = await migrate({ connectionString: ctx.databaseUrl() }, { logger: consoleLogger });
    ctx.out(ran.length ? `applied ${ran.length} migration(s): ${ran.join(', ')}` : 'already up to date');
  },
};

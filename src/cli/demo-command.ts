import { runDemo } from '../demo/run-demo.ts';
import { guardInterrupts } from '../demo/interrupt.ts';
import { checkDatabaseUrl, type Command, redact, UsageError } from './command.ts';

export const demoCommand: Command = {
  name: 'demo',
  summary: 'simulated fleet: heartbeats, a disconnect storm, statements vs one UPDATE per heartbeat (embedded PostgreSQL unless a database is given)',
  usage: '[--agents N] [--seconds S]',
  help: {
    agents: 'simulated agents, each heartbeating every 15 s (default 10000)',
    seconds: 'how long the fleet heartbeats before the disconnect storm (default 30)',
  },
  options: { agents: { type: 'string' }, seconds: { type: 'string' } },
  async run(ctx) {
    const agents = Number(ctx.values.agents ?? 10_000);
    const seconds = Number(ctx.values.seconds ?? 30);
    if (!Number.isInteger(agents) || agents < 1 || agents > 1_000_000) throw new UsageError('--agents must be an integer from 1 to 1000000');
    if (!(seconds > 0 && seconds <= 3600)) throw new UsageError('--seconds must be a number of seconds from 0 to 3600');
    const given = (ctx.values['database-url'] as string | undefined) ?? process.env.DATABASE_URL;
    const url = given ? checkDatabaseUrl(given) : undefined;
    const guard = guardInterrupts((signal) => {
      process.stderr.write(`\npg-heartbeat demo: second ${signal}: exiting without cleaning up\n`);
      process.exit(130);
    });
    try {
      await runDemo({
        agents,
        seconds,
        databaseUrl: url,
        shownUrl: url && redact(url),
        write: (text) => process.stdout.write(text),
        tty: process.stdout.isTTY === true,
        signal: guard.signal,
      });
    } finally {
      guard.release();
    }
  },
};

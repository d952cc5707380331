import pg from 'pg';
import { mergeNow } from '../merge.ts';
import type { Command } from './command.ts';

export const mergeCommand: Command = {
  name: 'merge',
  summary: 'run heartbeat.merge_agent_connections() once and print its counts',
  usage: '[--json]',
  help: { json: 'print the counts as JSON' },
  options: { json: { type: 'boolean' } },
  async run(ctx) {
    const client = new pg.Client({ ...ctx.database().config, application_name: 'pg-heartbeat merge' });
    client.on('error', () => {});
    await client.connect();
    try {
      const started = performance.now();
      const result = await mergeNow(client);
      const ms = Math.round(performance.now() - started);
      if (ctx.values.json) ctx.out(JSON.stringify({ ...result, durationMs: ms }));
      else if (result.skippedConcurrent) ctx.out('another merge is running; skipped');
      else {
        ctx.out(
          `merged ${result.rowsConsumed} staged row(s) in ${ms} ms: ${result.agentsUpdated} agent(s) updated, ` +
            `${result.skippedStale} stale, ${result.skippedUnknown} unknown, ${result.skippedInvalid} invalid, ` +
            `${result.deferredLocked} deferred (row locked); ${result.statusEvents} status change(s) recorded`,
        );
      }
    } finally {
      await client.end().catch(() => {});
    }
  },
};

import { consoleLogger } from '../logger.ts';
import { readStatus, type MergeStatus } from '../status.ts';
import { type Command, UsageError, withPool } from './command.ts';
import { runHealthCheck } from './health-check.ts';

const seconds = (ms: number): string => (ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`);

/** heartbeat.status as a two-column table. */
export function statusTable(s: MergeStatus): string[] {
  const rows: [string, string][] = [
    ['checked at', s.checkedAt.toISOString()],
    ['staged rows', String(s.stagedRows)],
    ['merge lag', s.mergeLagMs === null ? '- (nothing staged)' : `${seconds(s.mergeLagMs)} (oldest staged ${s.oldestStagedAt!.toISOString()})`],
  ];
  const m = s.lastMerge;
  if (m === null) rows.push(['last merge', 'none since the server started']);
  else {
    rows.push(
      ['last merge', `${m.at.toISOString()} (${seconds(m.sinceMs)} ago), took ${seconds(m.durationMs)}`],
      ['  consumed', `${m.rowsConsumed} staged row(s)`],
      ['  updated', `${m.agentsUpdated} agent(s)`],
      ['  skipped', `${m.skippedStale} stale, ${m.skippedUnknown} unknown, ${m.skippedInvalid} invalid`],
      ['  deferred', `${m.deferredLocked} (row locked)`],
    );
  }
  rows.push(['merges', `${s.mergesTotal} since the server started`]);
  const c = s.cron;
  rows.push([
    'pg_cron',
    c.database === null
      ? 'not loaded'
      : c.scheduled === null
        ? `in database ${c.database}; merge job unknown (cannot read cron.job)`
        : c.scheduled
          ? `job ${JSON.stringify(c.jobName)} in database ${c.database}: ${c.schedule}`
          : `in database ${c.database}; no merge job scheduled`,
  ]);
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`);
}

export const statusCommand: Command = {
  name: 'status',
  summary: 'show heartbeat.status: staged rows, merge lag, the last merge, the pg_cron job',
  usage: '[--json] | --check [--max-lag 30s] [--timeout 5s]',
  help: {
    json: 'print the status as JSON',
    check: 'health check: exit 0 healthy, 1 when the last merge or the oldest staged row is older than --max-lag, 2 when the database cannot be reached; one line',
    'max-lag': 'with --check: the bound, e.g. 30s, 500ms, 2m (default 30s)',
    timeout: 'with --check: connect and read deadline (default 5s)',
  },
  options: { json: { type: 'boolean' }, check: { type: 'boolean' }, 'max-lag': { type: 'string' }, timeout: { type: 'string' } },
  async run(ctx) {
    if (ctx.values.check) {
      if (ctx.values.json) throw new UsageError('--check and --json do not go together');
      return runHealthCheck(ctx);
    }
    if (ctx.values['max-lag'] !== undefined || ctx.values.timeout !== undefined) throw new UsageError('--max-lag and --timeout go with --check');
    const status = await withPool(ctx.database(), 'pg-heartbeat status', (conn) => readStatus(conn, { logger: consoleLogger }));
    if (ctx.values.json) ctx.out(JSON.stringify(status));
    else for (const line of statusTable(status)) ctx.out(line);
  },
};
